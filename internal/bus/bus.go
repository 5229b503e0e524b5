package bus

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Config sets up the streams and buckets.
type Config struct {
	// Replicas is the replication factor of streams and buckets (1, or 3 on a
	// three-node cluster).
	Replicas int
	// Retention is how long turn events, snapshots and tombstones are kept;
	// 0 keeps them for good. JetStream needs at least 100ms.
	Retention time.Duration
	// AckWait is how long a worker may go silent on a job before it is
	// redelivered to another worker.
	AckWait time.Duration
	// Local, when set, carries live events inside the process (see Local).
	Local *Local
	// Journal, when set (with Local only), makes deltas published through
	// this Bus live once written to it, before the stream stores them (see
	// Journal). The caller has started it and closes it after the Bus's
	// last delta.
	Journal *Journal
	// Log, when set, is told when Open changes the replicas or retention
	// of a stream or bucket that other processes share.
	Log *slog.Logger
}

func (c *Config) defaults() {
	if c.Replicas <= 0 {
		c.Replicas = 1
	}
	if c.AckWait <= 0 {
		c.AckWait = 4 * time.Second
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
}

// dupWindow is how long a stream remembers the Nats-Msg-Id of a message it
// stored: two minutes, or the retention when that is shorter (a stream
// cannot remember an id past the message).
func dupWindow(retention time.Duration) time.Duration {
	if retention > 0 && retention < 2*time.Minute {
		return retention
	}
	return 2 * time.Minute
}

// Bus is tokenrelay's view of NATS. It is safe for concurrent use. It does
// not own the connection: the caller closes it after the Bus is done.
type Bus struct {
	nc      *nats.Conn
	js      jetstream.JetStream
	events  jetstream.Stream
	jobs    jetstream.Stream
	turns   jetstream.KeyValue
	cancels jetstream.KeyValue
	acks    *acks
	cfg     Config
}

// Open creates (or updates) the streams, the job consumer and the KV buckets
// tokenrelay needs, idempotently, and returns a Bus using them.
func Open(ctx context.Context, nc *nats.Conn, cfg Config) (*Bus, error) {
	cfg.defaults()
	if cfg.Journal != nil && cfg.Local == nil {
		return nil, errors.New("open bus: a delta journal needs an in-process bus (Local)")
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("open bus: %w", err)
	}
	b := &Bus{nc: nc, js: js, cfg: cfg}
	b.acks = newAcks(b)
	b.events, err = ensureStream(ctx, js, cfg.Log, jetstream.StreamConfig{
		Name:        EventsStream,
		Description: "tokenrelay turn events (start, deltas, end)",
		Subjects:    []string{storedPrefix + ">"},
		Storage:     jetstream.FileStorage,
		Retention:   jetstream.LimitsPolicy,
		MaxAge:      cfg.Retention,
		Duplicates:  dupWindow(cfg.Retention),
		Replicas:    cfg.Replicas,
		Discard:     jetstream.DiscardOld,
		// Reads of a turn's events (resumes, gap repairs, recovery) may be
		// answered by any replica, so they go on while a new leader is
		// elected; a replica a moment behind only makes a repair wait and
		// read again.
		AllowDirect: true,
	})
	if err != nil {
		return nil, fmt.Errorf("open bus: events stream: %w", needServers(err, cfg.Replicas))
	}
	b.jobs, err = ensureStream(ctx, js, cfg.Log, jetstream.StreamConfig{
		Name:        JobsStream,
		Description: "tokenrelay turn jobs, one per turn",
		Subjects:    []string{JobSubject},
		Storage:     jetstream.FileStorage,
		Retention:   jetstream.WorkQueuePolicy,
		MaxAge:      cfg.Retention,
		Duplicates:  dupWindow(cfg.Retention),
		Replicas:    cfg.Replicas,
	})
	if err != nil {
		return nil, fmt.Errorf("open bus: jobs stream: %w", needServers(err, cfg.Replicas))
	}
	// The consumer is given the replicas its stream was just given. When
	// that raised the stream's, the server refuses the consumer's until
	// the stream's new peers are in place (about 10 s on nats-server 2.15;
	// 2.9 places them at once): wait for them. A new nats-server 2.9
	// cluster may also answer that the stream it has just confirmed is not
	// found, while another process's creation of it is still applied.
	err = retrying(ctx, "creating or updating consumer "+JobsConsumer, func(err error) string {
		switch apiErrorCode(err) {
		case errCodeConsumerReplicasExceedStream:
			return "stream " + JobsStream + " did not take its new replicas"
		case jetstream.JSErrCodeStreamNotFound:
			return "stream " + JobsStream + " was not found"
		}
		return unanswered(err)
	}, func(ctx context.Context) error {
		_, err := b.jobs.CreateOrUpdateConsumer(ctx, jetstream.ConsumerConfig{
			Durable:       JobsConsumer,
			Description:   "tokenrelay workers share this consumer",
			AckPolicy:     jetstream.AckExplicitPolicy,
			AckWait:       cfg.AckWait,
			MaxDeliver:    -1,
			MaxAckPending: 100000,
			FilterSubject: JobSubject,
			Replicas:      cfg.Replicas,
		})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("open bus: jobs consumer: %w", needServers(err, cfg.Replicas))
	}
	b.turns, err = ensureKeyValue(ctx, js, cfg.Log, jetstream.KeyValueConfig{
		Bucket:      TurnsBucket,
		Description: "tokenrelay turn snapshots (text so far, seq)",
		History:     1,
		TTL:         cfg.Retention,
		Storage:     jetstream.FileStorage,
		Replicas:    cfg.Replicas,
	})
	if err != nil {
		return nil, fmt.Errorf("open bus: turns bucket: %w", needServers(err, cfg.Replicas))
	}
	b.cancels, err = ensureKeyValue(ctx, js, cfg.Log, jetstream.KeyValueConfig{
		Bucket:      CancelBucket,
		Description: "tokenrelay cancel tombstones",
		History:     1,
		TTL:         cfg.Retention,
		Storage:     jetstream.FileStorage,
		Replicas:    cfg.Replicas,
	})
	if err != nil {
		return nil, fmt.Errorf("open bus: cancel bucket: %w", needServers(err, cfg.Replicas))
	}
	return b, nil
}

// ensureStream creates the stream, or updates it when it exists with
// another config, retrying while JetStream does not answer (see
// unanswered). Create comes first because it is idempotent: gateways and
// workers starting together on a new cluster all create the same streams,
// and jetstream's CreateOrUpdateStream, which tries an update first, then
// gets no answer (an update of a stream whose creation is still in flight)
// and every process fails to start. An update that changes the replicas or
// retention is logged (see warnChanges).
func ensureStream(ctx context.Context, js jetstream.JetStream, log *slog.Logger, cfg jetstream.StreamConfig) (s jetstream.Stream, err error) {
	err = retrying(ctx, "creating or updating stream "+cfg.Name, unanswered, func(ctx context.Context) error {
		s, err = js.CreateStream(ctx, cfg)
		if !errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			return err
		}
		if err := warnChanges(ctx, js, log, cfg.Name, cfg.Replicas, cfg.MaxAge); err != nil {
			return err
		}
		s, err = js.UpdateStream(ctx, cfg)
		return err
	})
	return s, err
}

// warnChanges logs the replicas and retention of existing stream name that
// differ from the ones about to be set. Every process sets them when it
// starts, so one started with another --replicas or --retention changes
// them for all, and a change of replicas from 3 to 1 loses the cluster's
// tolerance of a node's loss.
func warnChanges(ctx context.Context, js jetstream.JetStream, log *slog.Logger, name string, replicas int, maxAge time.Duration) error {
	s, err := js.Stream(ctx, name)
	if err != nil {
		return err
	}
	old := s.CachedInfo().Config
	if old.Replicas != replicas {
		log.Warn("changing the replicas of a shared stream to this process's --replicas; give every process the same",
			"stream", name, "from", old.Replicas, "to", replicas)
	}
	if old.MaxAge != maxAge {
		log.Warn("changing the retention of a shared stream to this process's --retention; give every process the same",
			"stream", name, "from", old.MaxAge, "to", maxAge)
	}
	return nil
}

// errCodeConsumerReplicasExceedStream is JetStream's error code for a
// consumer given more replicas than its stream has.
const errCodeConsumerReplicasExceedStream = 10126

// JetStream's error codes for replicas it cannot place: too few servers
// in the cluster (or too few with room), or a server not in a cluster.
const (
	errCodeNoSuitablePeers      = 10005
	errCodeReplicasNotSupported = 10074
)

// needServers adds to err, when JetStream refused to place the replicas,
// what --replicas asks of the cluster: the server's words do not name the
// setting to change.
func needServers(err error, replicas int) error {
	switch apiErrorCode(err) {
	case errCodeNoSuitablePeers:
		if replicas > 1 {
			return fmt.Errorf("--replicas %d needs at least %d JetStream servers up in the cluster: %w", replicas, replicas, err)
		}
	case errCodeReplicasNotSupported:
		return fmt.Errorf("--replicas %d needs a cluster of at least %d JetStream servers: %w", replicas, replicas, err)
	}
	return err
}

// apiErrorCode returns the JetStream error code of err, or 0.
func apiErrorCode(err error) jetstream.ErrorCode {
	var api *jetstream.APIError
	if errors.As(err, &api) {
		return api.ErrorCode
	}
	return 0
}

// errCodeClusterNotAvailable is JetStream's error code for a cluster
// without a meta leader, as while a new cluster elects its first one.
const errCodeClusterNotAvailable = 10008

// unanswered names the cause of err when it is one that waiting may cure
// in a cluster that is busy or electing a leader: no answer to an API
// request (a new nats-server 2.9 cluster leaves some unanswered while it
// creates streams for several processes at once), or no meta leader. It
// returns "" otherwise. No responders is not among them: a server enables
// JetStream before it accepts clients, so it means no JetStream at all.
func unanswered(err error) string {
	switch {
	case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout):
		return "JetStream did not answer"
	case apiErrorCode(err) == errCodeClusterNotAvailable:
		return "JetStream was unavailable"
	}
	return ""
}

// openAttempt bounds one attempt of a step of Open (jetstream's default
// for an API request), and openRetryFor the attempts of the step.
var (
	openAttempt  = 5 * time.Second
	openRetryFor = 30 * time.Second
)

// retrying runs op, one step of Open described by what, until it succeeds,
// fails with an error that transient does not describe (with the cause it
// names), ctx ends or openRetryFor has passed. Each attempt is given at
// most openAttempt; the pause between attempts grows from 50ms to 1s. The
// first attempt starts at once, so a healthy server sees no delay.
func retrying(ctx context.Context, what string, transient func(error) string, op func(context.Context) error) error {
	start := time.Now()
	pause := 50 * time.Millisecond
	for {
		actx, cancel := context.WithTimeout(ctx, openAttempt)
		err := op(actx)
		cancel()
		if err == nil {
			return nil
		}
		cause := transient(err)
		if cause == "" || ctx.Err() != nil {
			return err
		}
		if time.Since(start)+pause > openRetryFor {
			return fmt.Errorf("%s: %s (tried for %v): %w", what, cause, roundElapsed(time.Since(start)), err)
		}
		t := time.NewTimer(pause)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
		pause = min(2*pause, time.Second)
	}
}

// roundElapsed rounds d for an error message: to the second, or to the
// millisecond under a second.
func roundElapsed(d time.Duration) time.Duration {
	if d < time.Second {
		return d.Round(time.Millisecond)
	}
	return d.Round(time.Second)
}

// ensureKeyValue is ensureStream for a bucket.
func ensureKeyValue(ctx context.Context, js jetstream.JetStream, log *slog.Logger, cfg jetstream.KeyValueConfig) (kv jetstream.KeyValue, err error) {
	err = retrying(ctx, "creating or updating bucket "+cfg.Bucket, unanswered, func(ctx context.Context) error {
		kv, err = js.CreateKeyValue(ctx, cfg)
		if !errors.Is(err, jetstream.ErrBucketExists) {
			return err
		}
		if err := warnChanges(ctx, js, log, "KV_"+cfg.Bucket, cfg.Replicas, cfg.TTL); err != nil {
			return err
		}
		kv, err = js.UpdateKeyValue(ctx, cfg)
		return err
	})
	return kv, err
}

// Conn returns the underlying connection.
func (b *Bus) Conn() *nats.Conn { return b.nc }

// AckWait is the configured job ack deadline.
func (b *Bus) AckWait() time.Duration { return b.cfg.AckWait }

// Ping checks that the broker and JetStream answer.
func (b *Bus) Ping(ctx context.Context) error {
	if !b.nc.IsConnected() {
		return errors.New("not connected to nats")
	}
	if _, err := b.js.AccountInfo(ctx); err != nil {
		return fmt.Errorf("jetstream: %w", err)
	}
	return nil
}

// PublishEvent stores e in the events stream and announces it to the live
// subscribers of its conversation (a start once stored, an end at once:
// see below), and returns its stream sequence. A start
// or end repeated within two minutes is not stored twice; a delta carries
// no Nats-Msg-Id (deduplicating every delta would cost the stream a map
// entry per delta for two minutes), and readers drop a repeated delta by
// its seq instead. Under a Local a start is announced and not stored (see
// PublishEnd).
func (b *Bus) PublishEvent(ctx context.Context, e *Event) (uint64, error) {
	return b.PublishEnd(ctx, e, nil)
}

// InProcess reports whether b has a Local: its process holds the only
// gateway and the only worker that can reach its NATS server, so every
// job, cancel and live event of b's turns is made in this process.
func (b *Bus) InProcess() bool { return b.cfg.Local != nil }

// Journaled reports whether deltas published through b are announced once
// journaled, before the stream has stored them (see Journal).
func (b *Bus) Journaled() bool { return b.cfg.Journal != nil }

// PublishEnd is PublishEvent, with settled, when not nil, called after an
// end is announced and before it is stored; when it fails the end is not
// stored. A reader that finds a turn's end in the stream must find every
// delta before it in the turn's snapshot or the stream, and under a Journal
// the last ones may be kept only in the journal when the end can already
// go live: settled saves them.
func (b *Bus) PublishEnd(ctx context.Context, e *Event, settled func() error) (uint64, error) {
	if e.Kind == KindStart && b.cfg.Local != nil {
		// A start is stored so that no subscriber in another process is
		// told of a turn before the stream holds its start; no reader of
		// the stream uses it, and the chat store holds the message and
		// the turn before their start is published. Under a Local no
		// subscriber is in another process, and its start is announced
		// before its job is enqueued, so before any delta exists: stored
		// or not, it comes first. It is only announced, with stream
		// sequence 0.
		b.cfg.Local.deliver(e)
		return 0, nil
	}
	data, err := e.encode()
	if err != nil {
		return 0, fmt.Errorf("publish event: %w", err)
	}
	subj := e.StoredSubject()
	announced := false
	if e.Kind == KindEnd {
		// An end is announced before it is stored. Every end is published
		// after the chat store has recorded the turn's final status and
		// text (FinishTurn), so the live end shows nothing a crash could
		// take back, and the turn's deltas were all announced before it
		// (and stored, or journaled and saved by settled). This saves the
		// end, and so every cancel, a stream round trip. While the
		// connection is being re-established the announce is refused at
		// once: the end is then stored (publish waits for the connection)
		// and announced after, rather than lost to live subscribers and
		// to the stream alike.
		switch err := b.announce(e, data); {
		case err == nil:
			announced = true
		case !disconnected(err):
			return 0, fmt.Errorf("announce event: %w", err)
		}
		if settled != nil {
			if err := settled(); err != nil {
				return 0, fmt.Errorf("publish event: %w", err)
			}
		}
	}
	ack, err := b.publish(ctx, subj, data, e.MsgID())
	if err != nil {
		return 0, fmt.Errorf("publish event: %w", err)
	}
	if !announced {
		if err := b.announce(e, data); err != nil {
			return 0, fmt.Errorf("announce event: %w", err)
		}
	}
	return ack.Sequence, nil
}

// PublishDeltaAsync publishes a delta and returns at once; it is announced
// live once the stream has acknowledged it (see acks). Deltas of one turn
// published this way reach the stream in order; the caller checks each with
// Result and, when one failed, republishes it and every later one in order
// with Republish, so that the stream again holds the turn's deltas
// contiguously after the failure (readers drop the repeats).
//
// Under a Journal the delta is instead journaled and announced before this
// returns, settled with stream sequence 0, and not stored in the stream at
// all: the caller saves it in the turn's snapshot and then calls Release
// (see Journal). Only when the journal cannot take it is it stored, then
// announced, before this returns, with its stream sequence.
//
// beforeLive, when not nil, runs once just before the delta is announced,
// on the goroutine that announces it: under a Journal the caller's, before
// this returns without error. It must not block. A producer that answers
// joins from memory (LiveTurn) adds the delta's text there, so that no
// subscriber is ever given a delta that a join reading LiveText would miss.
func (b *Bus) PublishDeltaAsync(e *Event, beforeLive func()) (*PendingDelta, error) {
	if e.Kind != KindDelta {
		return nil, fmt.Errorf("publish delta: event of kind %q", e.Kind)
	}
	pd := b.acks.newPending(e)
	pd.beforeLive = beforeLive
	if b.cfg.Journal != nil {
		if err := b.cfg.Journal.append(pd); err != nil {
			return nil, err
		}
		return pd, nil
	}
	if err := b.acks.trySend(pd); err != nil {
		if !disconnected(err) {
			return nil, err
		}
		// Not sent: the connection is being re-established. The delta
		// fails as one whose answer was lost does, and its publisher
		// stores it again, waiting for the connection (see Republish).
		pd.settle(0, err)
	}
	return pd, nil
}

// disconnected reports whether err is a publish refused because the
// connection is down and being re-established: nothing was sent, and an
// attempt once it is back may succeed.
func disconnected(err error) bool {
	return errors.Is(err, nats.ErrReconnectBufExceeded) || errors.Is(err, nats.ErrConnectionReconnecting) || errors.Is(err, nats.ErrDisconnected)
}

// storeNow stores pd in the stream, then announces and settles it.
func (b *Bus) storeNow(pd *PendingDelta) error {
	subj, data := pd.stored()
	ack, err := b.publish(context.Background(), subj, data, "")
	if err != nil {
		return fmt.Errorf("publish delta: %w", err)
	}
	if err := pd.announce(); err != nil {
		return fmt.Errorf("announce delta: %w", err)
	}
	pd.settle(ack.Sequence, nil)
	return nil
}

// Republish stores the delta again, synchronously, retrying as PublishEvent
// does, and returns its stream sequence. A delta not yet announced (its
// first storing failed) is announced; a journaled one was already, and is
// released (see PendingDelta.Release).
func (b *Bus) Republish(ctx context.Context, p *PendingDelta) (uint64, error) {
	subj, data := p.stored()
	ack, err := b.publish(ctx, subj, data, "")
	if err != nil {
		return 0, fmt.Errorf("republish delta: %w", err)
	}
	if p.journaled {
		p.Release()
		return ack.Sequence, nil
	}
	if err := p.announce(); err != nil {
		return 0, fmt.Errorf("announce delta: %w", err)
	}
	return ack.Sequence, nil
}

// StoreJournaled stores journaled delta e in the events stream, without
// announcing it again: what a publisher does with the deltas it holds in
// Unsaved when their snapshot cannot be written.
func (b *Bus) StoreJournaled(ctx context.Context, e *Event) (uint64, error) {
	if e.Kind != KindDelta {
		return 0, fmt.Errorf("store delta: event of kind %q", e.Kind)
	}
	ack, err := b.publish(ctx, e.StoredSubject(), e.encodeDelta(), "")
	if err != nil {
		return 0, fmt.Errorf("store delta: %w", err)
	}
	return ack.Sequence, nil
}

// A stream whose leader is lost (its node stopped or cut off) answers no
// publish until the other replicas have elected a new leader, which takes
// a few seconds; a publish sent meanwhile gets no answer at all. (One made
// while the connection is re-established fails at once: it has no
// reconnect buffer, see disconnected; it is retried the same way.) So one
// attempt waits at most publishAttempt and is then repeated with the same
// Nats-Msg-Id, which the stream deduplicates: a message stored by an
// attempt whose answer was lost is not stored twice. Attempts go on while
// the caller's ctx allows, or for publishRetryFor when it has no deadline.
const (
	publishAttempt  = time.Second
	publishRetryFor = 30 * time.Second
)

// publish stores data in a stream under msgID, retrying as described above.
func (b *Bus) publish(ctx context.Context, subj string, data []byte, msgID string) (*jetstream.PubAck, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, publishRetryFor)
		defer cancel()
	}
	for {
		actx, cancel := context.WithTimeout(ctx, publishAttempt)
		var opts []jetstream.PublishOpt
		if msgID != "" {
			opts = append(opts, jetstream.WithMsgID(msgID))
		}
		ack, err := b.js.Publish(actx, subj, data, opts...)
		cancel()
		if err == nil {
			return ack, nil
		}
		retry := errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) ||
			errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, nats.ErrNoResponders) || disconnected(err)
		if !retry || ctx.Err() != nil {
			return nil, err
		}
		t := time.NewTimer(100 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, err
		case <-t.C:
		}
	}
}

// Subscription is a live subscription; Unsubscribe ends it.
type Subscription interface {
	Unsubscribe() error
}

// SubscribeConversation calls fn, from one goroutine and in publish order,
// with each live event of the conversation. Undecodable messages are
// skipped. Live delivery may lose events (a slow subscriber); callers repair
// gaps with ReadTurn.
func (b *Bus) SubscribeConversation(conversationID string, fn func(Event)) (Subscription, error) {
	sub, err := b.nc.Subscribe(ConversationSubject(conversationID), func(m *nats.Msg) {
		e, err := DecodeEvent(m.Subject, m.Data)
		if err != nil {
			return
		}
		fn(e)
	})
	if err != nil {
		return nil, fmt.Errorf("subscribe conversation: %w", err)
	}
	// Live deltas are small and frequent; let the client buffer generously
	// rather than drop (a drop is repaired, but costs a read).
	_ = sub.SetPendingLimits(1<<20, 256<<20)
	return sub, nil
}

// SubscribeTurnEnd calls fn with the end event of one turn, whatever its
// conversation: a caller can listen before it has read the turn, so that an
// end stored after that read cannot go unseen. Under a Local, fn runs on the
// goroutine announcing the end and must not block. Over NATS it returns once
// the server this process is connected to has the subscription (one round
// trip), so that an end published through that server after the call is
// delivered; in a cluster, an end published through another server
// meanwhile can still be missed while the interest spreads, which a caller
// waiting for the end must bound with a timeout.
func (b *Bus) SubscribeTurnEnd(ctx context.Context, turnID string, fn func(Event)) (Subscription, error) {
	if b.cfg.Local != nil {
		return b.cfg.Local.subscribeTurnEnd(turnID, fn), nil
	}
	sub, err := b.nc.Subscribe(anyTurnEndSubject(turnID), func(m *nats.Msg) {
		e, err := DecodeEvent(m.Subject, m.Data)
		if err != nil {
			return
		}
		fn(e)
	})
	if err != nil {
		return nil, fmt.Errorf("subscribe turn end: %w", err)
	}
	flush := b.nc.Flush // waits at most nats.go's default, 10 s
	if _, ok := ctx.Deadline(); ok {
		flush = func() error { return b.nc.FlushWithContext(ctx) }
	}
	if err := flush(); err != nil {
		_ = sub.Unsubscribe()
		return nil, fmt.Errorf("subscribe turn end: %w", err)
	}
	return sub, nil
}

// ReadTurn calls fn with the stored events of one turn whose stream sequence
// is at least from (1 = from the start), in order, until fn returns false or
// no event is left. It sees every event acknowledged before the call (the
// stream allows direct gets; in a cluster a replica a moment behind only
// makes a repair read again).
//
// The events come readBatch at a time, each batch one direct-get request:
// a resume's tail of a second of deltas is one round trip, not one per
// delta. A server older than 2.11 ignores the batch and answers one event
// per request, which still works, one round trip each.
func (b *Bus) ReadTurn(ctx context.Context, conversationID, turnID string, from uint64, fn func(Event) bool) error {
	if from == 0 {
		from = 1
	}
	subj := TurnSubject(conversationID, turnID)
	for {
		next, more, err := b.readBatch(ctx, subj, from, fn)
		if err != nil {
			return fmt.Errorf("read turn: %w", err)
		}
		if !more {
			return nil
		}
		from = next
	}
}

// readBatch is the size of one direct get of ReadTurn.
const readBatch = 256

// readBatch hands fn the events of subj from stream sequence from on, up to
// readBatch of them, and reports where to go on (next) when more may be
// left.
func (b *Bus) readBatch(ctx context.Context, subj string, from uint64, fn func(Event) bool) (next uint64, more bool, err error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, publishRetryFor)
		defer cancel()
	}
	inbox := b.nc.NewInbox()
	sub, err := b.nc.SubscribeSync(inbox)
	if err != nil {
		return 0, false, err
	}
	defer sub.Unsubscribe()
	req := fmt.Appendf(nil, `{"seq":%d,"next_by_subj":%q,"batch":%d}`, from, subj, readBatch)
	if err := b.nc.PublishRequest("$JS.API.DIRECT.GET."+EventsStream, inbox, req); err != nil {
		return 0, false, err
	}
	for {
		m, err := sub.NextMsgWithContext(ctx)
		if err != nil {
			return 0, false, err
		}
		switch status := m.Header.Get("Status"); status {
		case "":
		case "204": // end of the batch; Nats-Num-Pending events are left
			return next, m.Header.Get("Nats-Num-Pending") != "0", nil
		case "404": // nothing from there on
			return 0, false, nil
		case "503":
			return 0, false, nats.ErrNoResponders
		default:
			return 0, false, fmt.Errorf("direct get: %s %s", status, m.Header.Get("Description"))
		}
		seq, err := strconv.ParseUint(m.Header.Get("Nats-Sequence"), 10, 64)
		if err != nil {
			return 0, false, fmt.Errorf("direct get: bad sequence %q", m.Header.Get("Nats-Sequence"))
		}
		e, err := DecodeEvent(m.Header.Get("Nats-Subject"), m.Data)
		if err != nil {
			return 0, false, err
		}
		e.StreamSeq = seq
		next = seq + 1
		if !fn(e) {
			return 0, false, nil
		}
		if m.Header.Get("Nats-Num-Pending") == "" {
			return next, true, nil // a server without batched gets: one event per request
		}
	}
}

func splitHostPort(addr string) (string, int, error) {
	host, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, fmt.Errorf("nats listen address %q: %w", addr, err)
	}
	port, err := strconv.Atoi(p)
	if err != nil {
		return "", 0, fmt.Errorf("nats listen address %q: bad port", addr)
	}
	return host, port, nil
}

// Unavailable reports whether err says the message broker cannot be
// reached or cannot answer now (a connection closed or reconnecting, a
// stream without a leader, a request nobody answered): a client should try
// again shortly, as for any unavailable service.
func Unavailable(err error) bool {
	if err == nil {
		return false
	}
	for _, e := range []error{
		nats.ErrConnectionClosed, nats.ErrConnectionDraining, nats.ErrConnectionReconnecting,
		nats.ErrDisconnected, nats.ErrNoServers, nats.ErrTimeout, nats.ErrNoResponders,
		jetstream.ErrNoStreamResponse, jetstream.ErrConnectionClosed, jetstream.ErrJetStreamPublisherClosed,
	} {
		if errors.Is(err, e) {
			return true
		}
	}
	var api *jetstream.APIError
	return errors.As(err, &api) && api.Code == 503
}
