package bus

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenrelay/tokenrelay/internal/chat"
)

// Job asks a worker to produce one turn.
type Job struct {
	TurnID         string `json:"t"`
	ConversationID string `json:"c"`

	// The turn as the send stored it, so that the worker given the job
	// first need not read it back (see QueuedTurn). A job without them, as
	// enqueued by an older gateway, is read from the store.
	Owner     string `json:"o,omitempty"`
	ReplyTo   string `json:"r,omitempty"`
	Model     string `json:"m,omitempty"`
	CreatedAt int64  `json:"at,omitempty"` // Unix ms
}

// JobOf is the job of t, a turn that a send has just stored, queued.
func JobOf(t chat.Turn) Job {
	return Job{
		TurnID: t.ID, ConversationID: t.ConversationID,
		Owner: t.Owner, ReplyTo: t.ReplyTo, Model: t.Model, CreatedAt: t.CreatedAt.UnixMilli(),
	}
}

// QueuedTurn returns the turn the job describes, with status queued, when
// the job carries it and no worker was given it before; false when the
// turn's state must be read from the store: it may have been started, or
// ended by a cancel, since the job was enqueued.
func (m *JobMsg) QueuedTurn() (chat.Turn, bool) {
	if m.Owner == "" || m.Redelivered {
		return chat.Turn{}, false
	}
	return chat.Turn{
		ID: m.TurnID, ConversationID: m.ConversationID, Owner: m.Owner,
		ReplyTo: m.ReplyTo, Model: m.Model, Status: chat.StatusQueued,
		CreatedAt: time.UnixMilli(m.CreatedAt).UTC(),
	}, true
}

// EnqueueJob adds a job to the work queue. Enqueueing the same turn twice
// within two minutes stores it once. Under a Local the job goes to the
// process's own queue instead (see localJobs).
func (b *Bus) EnqueueJob(ctx context.Context, j Job) error {
	if l := b.cfg.Local; l != nil {
		l.jobs.push(j, false)
		return nil
	}
	data, err := json.Marshal(j)
	if err != nil {
		return fmt.Errorf("enqueue job: %w", err)
	}
	if _, err := b.publish(ctx, JobSubject, data, "job:"+j.TurnID); err != nil {
		return fmt.Errorf("enqueue job: %w", err)
	}
	return nil
}

// JobMsg is a job taken from the queue. The worker holding it calls
// InProgress at least every AckWait/2 while it works, then Ack once. A job
// neither acked nor kept in progress is redelivered to another worker.
type JobMsg struct {
	Job
	// Redelivered is true when another worker (or an earlier process) was
	// given this job before.
	Redelivered bool
	msg         jetstream.Msg // nil for a job of a Local's queue
	local       *localJob
}

// InProgress extends the job's ack deadline.
func (m *JobMsg) InProgress() error {
	if m.local != nil {
		m.local.inProgress()
		return nil
	}
	return m.msg.InProgress()
}

// Ack removes the job from the queue.
func (m *JobMsg) Ack() error {
	if m.local != nil {
		m.local.ack()
		return nil
	}
	return m.msg.Ack()
}

// Release hands the job back to the queue for another worker to take at
// once, where leaving it unacked would keep it from them until the ack
// wait. A worker calls it, instead of Ack, for a job it stops before
// starting. Under a Local it does nothing: the process has no other
// worker, and its queue gives the job out again after the ack wait.
func (m *JobMsg) Release() error {
	if m.local != nil {
		return nil
	}
	return m.msg.Nak()
}

// jobPullHeartbeat is how often the server confirms a worker's waiting pull
// request for jobs. A pull request lives on the job consumer's leader; when
// that NATS node stops, the request is lost with it while the worker's own
// connection, to another node, stays up. Two missed heartbeats make the
// worker pull again from the new leader, so it is deaf to new jobs for at
// most twice this long, not for the client's default of 30 s.
const jobPullHeartbeat = time.Second

// ConsumeJobs calls fn with each job, one at a time from one goroutine, until
// ctx is done; fn should hand the job off quickly (it may block to apply
// backpressure). Jobs fetched but not yet given to fn when ctx is done go
// back to the queue for another worker (see handBack). Undecodable jobs
// are acked and dropped. ConsumeJobs returns
// nil when ctx is done and fn has returned, and an error when the pull ends
// before that (the job consumer deleted, the connection closed). Under a
// Local it takes the jobs of the process's own queue, and none from the
// stream.
func (b *Bus) ConsumeJobs(ctx context.Context, batch int, fn func(*JobMsg)) error {
	if l := b.cfg.Local; l != nil {
		for {
			jm, ok := l.jobs.pop(ctx, b.cfg.AckWait)
			if !ok {
				return nil
			}
			fn(jm)
		}
	}
	cons, err := b.jobs.Consumer(ctx, JobsConsumer)
	if err != nil {
		if ctx.Err() != nil {
			return nil // stopped before it pulled
		}
		return fmt.Errorf("consume jobs: %w", err)
	}
	if batch <= 0 {
		batch = 64
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(batch), jetstream.PullHeartbeat(jobPullHeartbeat))
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("consume jobs: %w", err)
	}
	var last error // the iterator's last error, which may have ended it
	for {
		m, err := it.Next(jetstream.NextContext(ctx))
		if err != nil {
			if ctx.Err() != nil {
				handBack(it)
				return nil
			}
			if errors.Is(err, jetstream.ErrMsgIteratorClosed) {
				// The pull ended while ctx lives: the consumer was
				// deleted or the connection closed. A worker that went
				// on would take no job again; its caller stops instead.
				return fmt.Errorf("consume jobs: pulling from %s stopped: %w", JobsConsumer, cmp.Or(last, err))
			}
			// Transient errors (heartbeat missed, leadership change) are
			// retried by the iterator itself: after a missed heartbeat the
			// next call issues a new pull request.
			last = err
			continue
		}
		var j Job
		if err := json.Unmarshal(m.Data(), &j); err != nil || j.TurnID == "" {
			_ = m.Term()
			continue
		}
		jm := &JobMsg{Job: j, msg: m}
		if md, err := m.Metadata(); err == nil {
			jm.Redelivered = md.NumDelivered > 1
		}
		fn(jm)
	}
}

// handBackWait bounds how long a worker that stops taking jobs waits for
// those already on their way to it, so that a broker that does not answer
// cannot hold its stop.
const handBackWait = time.Second

// handBack ends it, handing back to the queue (NAK) the jobs it had
// fetched but not yet given out, and those the server sent before it
// heard that the pull ended: left alone, they would wait for the ack wait
// before another worker got them. It waits for them at most handBackWait.
func handBack(it jetstream.MessagesContext) {
	defer it.Stop()
	it.Drain()
	deadline := time.Now().Add(handBackWait)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return
		}
		m, err := it.Next(jetstream.NextMaxWait(left))
		if err != nil {
			return // drained, or no answer in time
		}
		_ = m.Nak()
	}
}

// ServeWorkerPing answers the readiness probe of gateways until the returned
// subscription is unsubscribed. unreachable (called on the connection's
// goroutine; it must not block) says why the worker's model server cannot
// be reached, or "": the answer then says so (see PingWorkers).
func (b *Bus) ServeWorkerPing(workerID string, unreachable func() string) (Subscription, error) {
	sub, err := b.nc.Subscribe(WorkerPingSubj, func(m *nats.Msg) {
		reply := &nats.Msg{Subject: m.Reply, Data: []byte(workerID)}
		if why := unreachable(); why != "" {
			reply.Header = nats.Header{modelDownHeader: {why}}
		}
		_ = m.RespondMsg(reply)
	})
	if err != nil {
		return nil, fmt.Errorf("serve worker ping: %w", err)
	}
	return sub, nil
}

// ServeProducing answers ProducerAlive for the turns producing reports
// true for, until the returned subscription is unsubscribed. producing is
// called on the connection's goroutine and must not block.
func (b *Bus) ServeProducing(producing func(turnID string) bool) (Subscription, error) {
	sub, err := b.nc.Subscribe(producingPrefix+"*", func(m *nats.Msg) {
		if producing(Untoken(strings.TrimPrefix(m.Subject, producingPrefix))) {
			_ = m.Respond(nil)
		}
	})
	if err != nil {
		return nil, fmt.Errorf("serve producing: %w", err)
	}
	if err := b.nc.Flush(); err != nil {
		_ = sub.Unsubscribe()
		return nil, fmt.Errorf("serve producing: %w", err)
	}
	return sub, nil
}

// ProducerAlive asks the workers whether one of them is producing turnID
// (see ServeProducing), and reports false when none says so within wait.
// It goes over core NATS, which carries it while a JetStream consumer
// changes leader: a job redelivered then does not tell that its producer
// died. The question is asked again every producerAsk, so that a producer
// whose connection is being re-established (its NATS server restarted)
// hears one once it is back.
func (b *Bus) ProducerAlive(parent context.Context, turnID string, wait time.Duration) (bool, error) {
	ctx, cancel := context.WithTimeout(parent, wait)
	defer cancel()
	inbox := b.nc.NewInbox()
	sub, err := b.nc.SubscribeSync(inbox)
	if err != nil {
		return false, fmt.Errorf("ask for the producer of %s: %w", turnID, err)
	}
	defer sub.Unsubscribe()
	answered := make(chan struct{})
	go func() {
		if _, err := sub.NextMsgWithContext(ctx); err == nil {
			close(answered)
		}
	}()
	ask := time.NewTicker(producerAsk)
	defer ask.Stop()
	for {
		// A publish refused while this connection is down is asked
		// again at the next tick.
		_ = b.nc.PublishRequest(producingPrefix+Token(turnID), inbox, nil)
		select {
		case <-answered:
			return true, nil
		case <-ctx.Done():
			return false, parent.Err()
		case <-ask.C:
		}
	}
}

// producerAsk is how often ProducerAlive asks again.
const producerAsk = 250 * time.Millisecond

// modelDownHeader carries, in a worker's answer to a ping, why its model
// server cannot be reached. (A worker of an older version never sets it.)
const modelDownHeader = "Tr-Model-Down"

// ErrProviderUnreachable is wrapped by PingWorkers' error when workers
// answer but none can reach its model server.
var ErrProviderUnreachable = errors.New("no worker can reach its model server")

// modelDownGrace is how long PingWorkers waits, after a worker answered
// that its model server cannot be reached, for another worker that can.
const modelDownGrace = 200 * time.Millisecond

// PingWorkers returns the id of one live worker that can reach its model
// server. When the workers that answer cannot, it returns an error
// wrapping ErrProviderUnreachable (modelDownGrace after the first such
// answer, or when ctx is done); when none answers before ctx is done, or
// none is subscribed, another error.
func (b *Bus) PingWorkers(ctx context.Context) (string, error) {
	inbox := b.nc.NewInbox()
	sub, err := b.nc.SubscribeSync(inbox)
	if err != nil {
		return "", fmt.Errorf("ping workers: %w", err)
	}
	defer sub.Unsubscribe()
	if err := b.nc.PublishRequest(WorkerPingSubj, inbox, nil); err != nil {
		return "", fmt.Errorf("ping workers: %w", err)
	}
	down := ""
	for {
		m, err := sub.NextMsgWithContext(ctx)
		switch {
		case err != nil && down != "":
			return "", fmt.Errorf("%w: %s", ErrProviderUnreachable, down)
		case err != nil:
			return "", fmt.Errorf("no worker answered: %w", err)
		case len(m.Data) == 0 && m.Header.Get("Status") == "503":
			return "", fmt.Errorf("no worker answered: %w", nats.ErrNoResponders)
		}
		why := m.Header.Get(modelDownHeader)
		if why == "" {
			return string(m.Data), nil
		}
		if down == "" {
			down = why
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, modelDownGrace)
			defer cancel()
		}
	}
}
