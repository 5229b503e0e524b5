package gateway

import (
	"context"
	"errors"
	"runtime"
	"strings"
	"sync/atomic"
	"time"

	"github.com/google/uuid"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/protocol"
	"github.com/tokenrelay/tokenrelay/internal/store"
)

// sendRequest is a send from any front end (WebSocket, HTTP, compat).
type sendRequest struct {
	User           string
	ConversationID string
	MessageID      string
	TurnID         string
	Text           string
	Model          string

	// hold, when set, is offered the turn's job before it is enqueued,
	// and reports whether it takes it: a WebSocket connection takes it
	// when frames sent right behind the message have already arrived, and
	// enqueues it once it has handled them (see conn.hold).
	hold func(enqueue func()) bool
}

// send stores the user message and its turn, announces both and enqueues
// the job. A repeated message id returns the existing message and turn and
// starts nothing.
func (s *Server) send(ctx context.Context, r sendRequest) (store.SendResult, error) {
	// The limit counts what is stored: a NUL is the 3 bytes of U+FFFD.
	r.Text = chat.StorableText(r.Text)
	if s.cfg.Limits.TextBytes > 0 && len(r.Text) > s.cfg.Limits.TextBytes {
		s.m.limitHits.WithLabelValues("text_bytes").Inc()
		return store.SendResult{}, protocol.Errorf(protocol.CodeTooLarge, "the message is longer than the limit of "+itoa(s.cfg.Limits.TextBytes)+" bytes")
	}
	if strings.TrimSpace(r.Text) == "" {
		return store.SendResult{}, protocol.Errorf(protocol.CodeBadRequest, "text is empty")
	}
	if r.Model != "" && s.cfg.ModelAllowed != nil && !s.cfg.ModelAllowed(r.Model) {
		return store.SendResult{}, protocol.Errorf(protocol.CodeBadRequest, "model "+quote(r.Model)+" is not available")
	}
	refund := func() {}
	if s.limits != nil {
		wait, ok, undo := s.limits.allowSend(r.User)
		if !ok {
			if res, ok := s.retried(ctx, r); ok {
				return res, nil
			}
			s.m.limitHits.WithLabelValues("sends").Inc()
			return store.SendResult{}, &protocol.Error{Code: protocol.CodeRateLimited, Message: "too many messages; slow down", RetryAfterMS: wait.Milliseconds() + 1}
		}
		refund = undo
	}
	s.sendGate.RLock()
	defer s.sendGate.RUnlock()
	if s.sendsStopped.Load() {
		refund()
		if res, ok := s.retried(ctx, r); ok {
			return res, nil
		}
		return store.SendResult{}, protocol.Errorf(protocol.CodeUnavailable, "the server is shutting down; send again once it is back")
	}
	if err := s.workerReady(ctx); err != nil {
		refund()
		if res, ok := s.retried(ctx, r); ok {
			return res, nil
		}
		return store.SendResult{}, err
	}
	if r.MessageID == "" {
		r.MessageID = newID()
	}
	if r.TurnID == "" {
		r.TurnID = newID()
	}
	if r.Model == "" {
		r.Model = s.cfg.DefaultModel
	}
	res, err := s.store.Send(ctx, store.SendRequest{
		ConversationID: r.ConversationID, Owner: r.User, MessageID: r.MessageID, TurnID: r.TurnID,
		Text: r.Text, Model: r.Model, Now: s.now(), MaxActiveTurns: s.cfg.Limits.Turns,
	})
	if err != nil {
		if errors.Is(err, chat.ErrTooManyTurns) {
			s.m.limitHits.WithLabelValues("turns").Inc()
		}
		return res, err
	}
	if res.Duplicate {
		refund() // a retry costs the sender nothing
		return res, nil
	}
	// The message is stored: its turn is published and enqueued even when
	// the caller's context ends now (its client went away, or a shutdown
	// began), else the turn would end in an error for a broker that was
	// never down, which the client's retry of the message would then find.
	ctx, cancel := uncancelled(ctx, s.cfg.RequestTimeout)
	defer cancel()
	start := &bus.Event{
		Kind: bus.KindStart, ConversationID: r.ConversationID, TurnID: res.Turn.ID,
		Message: &bus.WireMessage{ID: res.Message.ID, Content: res.Message.Content, CreatedAt: res.Message.CreatedAt.UnixMilli()},
		ReplyTo: res.Message.ID, Model: res.Turn.Model, Owner: r.User,
	}
	// The start is published (stored, except under serve's Local) before
	// the job exists, so every delta a worker publishes comes after it.
	if _, err := s.bus.PublishEvent(ctx, start); err != nil {
		s.failTurn(res.Turn)
		return res, &protocol.Error{Code: protocol.CodeUnavailable, Message: msgBrokerUnavailable, Err: err}
	}
	s.heldJobs.Add(1)
	if r.hold != nil && r.hold(func() { defer s.heldJobs.Done(); s.enqueueHeld(res.Turn) }) {
		s.m.sends.Inc()
		return res, nil
	}
	s.heldJobs.Done()
	if err := s.bus.EnqueueJob(ctx, bus.JobOf(res.Turn)); err != nil {
		s.failTurn(res.Turn)
		return res, &protocol.Error{Code: protocol.CodeUnavailable, Message: msgBrokerUnavailable, Err: err}
	}
	s.m.sends.Inc()
	return res, nil
}

// uncancelled is ctx without its cancellation, within its deadline or
// floor from now, whichever is later: a stored turn must be announced and
// enqueued however little of the request's time the store left (a store
// that found a send stored after the deadline cut off its COMMIT answers
// after it, see store.Send), rather than be ended for a broker that was
// never down.
func uncancelled(ctx context.Context, floor time.Duration) (context.Context, context.CancelFunc) {
	d, ok := ctx.Deadline()
	ctx = context.WithoutCancel(ctx)
	if !ok {
		return ctx, func() {}
	}
	if least := time.Now().Add(floor); d.Before(least) {
		d = least
	}
	return context.WithDeadline(ctx, d)
}

// enqueueHeld enqueues the job of a turn whose send was answered while its
// connection held the job (see sendRequest.hold). The turn is stored and
// announced, so a broker that refuses the job now ends it with an error.
func (s *Server) enqueueHeld(t chat.Turn) {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.RequestTimeout)
	defer cancel()
	if err := s.bus.EnqueueJob(ctx, bus.JobOf(t)); err != nil {
		s.log.Warn("enqueue job", "turn_id", t.ID, "err", err)
		s.failTurn(t)
	}
}

// retried answers a send that was refused before the store saw it (the
// rate limit, no worker) when it is the retry of a message the user has
// already sent: a retry is answered with the stored pair whatever the
// limits say, as the store would have answered it.
func (s *Server) retried(ctx context.Context, r sendRequest) (store.SendResult, bool) {
	if r.MessageID == "" {
		return store.SendResult{}, false
	}
	c, err := s.store.Conversation(ctx, r.ConversationID)
	if err != nil || c.Owner != r.User {
		return store.SendResult{}, false
	}
	m, err := s.store.Message(ctx, r.ConversationID, r.MessageID)
	if err != nil || m.Role != chat.RoleUser || m.TurnID == "" {
		return store.SendResult{}, false
	}
	t, err := s.store.TurnHead(ctx, m.TurnID)
	if err != nil {
		return store.SendResult{}, false
	}
	return store.SendResult{Message: m, Turn: t, Duplicate: true}, true
}

// failTurn ends a turn that could not be enqueued, so it does not block its
// conversation.
func (s *Server) failTurn(t chat.Turn) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	final, won, err := s.store.FinishTurn(ctx, store.TurnResult{TurnID: t.ID, Status: chat.StatusError, Error: msgBrokerUnavailable, Now: s.now()})
	if err != nil || !won {
		return
	}
	s.m.turns.WithLabelValues(string(final)).Inc()
	_, _ = s.bus.PublishEvent(ctx, &bus.Event{Kind: bus.KindEnd, ConversationID: t.ConversationID, TurnID: t.ID, Status: final, Error: msgBrokerUnavailable})
}

// cancelResult is the answer to a cancel.
type cancelResult struct {
	TurnID  string
	Status  chat.TurnStatus
	Already bool
}

// cancel stops a turn, idempotently. It answers with the turn's terminal
// status: it waits (up to CancelWait) for a streaming turn's producer to
// publish the end, so that the status in the answer is the one stored and
// sent to every connection.
func (s *Server) cancel(ctx context.Context, user, turnID string) (cancelResult, error) {
	c, err := s.beginCancel(ctx, user, turnID)
	if err != nil {
		return cancelResult{}, err
	}
	return c.finish(ctx)
}

// pendingCancel is a cancel begun: the turn's producer has been told to stop
// (or the turn has been ended in the store, or it had ended already), and
// finish waits for the outcome.
type pendingCancel struct {
	s        *Server
	t        chat.Turn
	res      cancelResult
	started  time.Time
	done     bool // res is the answer
	ended    chan bus.Event
	sub      bus.Subscription
	final    chat.TurnStatus // of a queued turn, ended in the store here
	won      bool
	owned    atomic.Bool // the turn is the cancelling user's
	observed atomic.Bool // cancelLatency has this cancel's sample
}

// observe records in cancelLatency how long this cancel waited for its
// turn's end, once: at the end's arrival here (the end every connection of
// the turn's conversation gets now), or, when that arrival went unseen (it
// came before the turn was found to be the user's, or was not heard in
// time), at the answer. The answer may come later: it also waits for the
// tombstone's round trip, which no user waits for.
func (c *pendingCancel) observe() {
	if c.observed.CompareAndSwap(false, true) {
		c.s.m.cancelLatency.Observe(c.s.now().Sub(c.started).Seconds())
	}
}

// beginCancel does the part of a cancel that stops the turn: a caller that
// must not wait for the end (a socket's frame loop) calls it first, so that
// the producer stops without waiting for the caller to schedule the rest.
// The caller must call finish.
func (s *Server) beginCancel(ctx context.Context, user, turnID string) (*pendingCancel, error) {
	started := s.now()
	if !chat.ValidID(turnID) {
		s.m.cancels.WithLabelValues("not_found").Inc()
		return nil, chat.ErrNotFound
	}
	// Listen for the end before reading the turn: an end stored after the
	// read is then heard, and one stored before it is in what is read, so
	// that one read of the store tells a cancel all it needs.
	c := &pendingCancel{s: s, started: started, ended: make(chan bus.Event, 1)}
	sub, err := s.bus.SubscribeTurnEnd(ctx, turnID, func(e bus.Event) {
		if e.Status == chat.StatusCancelled && c.owned.Load() {
			c.observe()
		}
		select {
		case c.ended <- e:
		default:
		}
	})
	if err != nil {
		// A turn that has ended needs no broker to answer its cancel.
		if t, terr := s.store.TurnHead(ctx, turnID); terr == nil && t.Owner == user && t.Status.Terminal() {
			s.m.cancels.WithLabelValues("already_ended").Inc()
			c.t, c.res, c.done = t, cancelResult{TurnID: t.ID, Status: t.Status, Already: true}, true
			return c, nil
		}
		return nil, &protocol.Error{Code: protocol.CodeUnavailable, Message: msgBrokerUnavailable, Err: err}
	}
	t, err := s.store.TurnHead(ctx, turnID)
	if err != nil {
		_ = sub.Unsubscribe()
		// A store that cannot answer says nothing of the turn: such a
		// cancel is refused (unavailable), as one whose broker failed.
		if errors.Is(err, chat.ErrNotFound) {
			s.m.cancels.WithLabelValues("not_found").Inc()
		}
		return nil, err
	}
	if t.Owner != user {
		_ = sub.Unsubscribe()
		s.m.cancels.WithLabelValues("forbidden").Inc()
		return nil, chat.ErrForbidden
	}
	c.owned.Store(true)
	c.t, c.res = t, cancelResult{TurnID: t.ID, Status: t.Status}
	if t.Status.Terminal() {
		_ = sub.Unsubscribe()
		c.res.Already, c.done = true, true
		s.m.cancels.WithLabelValues("already_ended").Inc()
		return c, nil
	}
	c.sub = sub
	// A turn no worker has started is ended in the store first: a worker's
	// start and this update are both conditional on "queued", so exactly
	// one wins, and a worker that loses never calls the model, however
	// long the rest of this cancel takes.
	if t.Status == chat.StatusQueued {
		c.final, c.won, err = s.store.FinishTurn(ctx, store.TurnResult{TurnID: t.ID, Status: chat.StatusCancelled, Now: s.now()}, chat.StatusQueued)
		if err != nil {
			_ = c.sub.Unsubscribe()
			return nil, err
		}
		if c.won {
			s.m.turns.WithLabelValues(string(c.final)).Inc()
		}
	}
	if t.Status == chat.StatusStreaming {
		s.bus.SignalCancel(t.ID) // its worker stops at once (see SignalCancel)
		// In this process the signal has just woken the turn's producer,
		// or a goroutine that wakes it, and the scheduler would run that
		// next. Yield so that it does: the caller's next steps (the
		// socket's next read, the goroutine that finishes this cancel,
		// the tombstone's round trip) wake goroutines of their own, each
		// of which would push the producer to the back of the run queue,
		// behind every other turn's timer.
		runtime.Gosched()
	}
	return c, nil
}

// finish completes a begun cancel and answers it.
func (c *pendingCancel) finish(ctx context.Context) (res cancelResult, err error) {
	s, t := c.s, c.t
	if c.sub != nil {
		defer c.sub.Unsubscribe()
	}
	res = c.res
	defer func() {
		if !res.Already && res.Status == chat.StatusCancelled {
			c.observe()
		}
	}()
	if c.done {
		return res, nil
	}
	final, won := c.final, c.won
	if t.Status == chat.StatusQueued && !won && final.Terminal() {
		// Another cancel, or the turn's own end, came first.
		res.Status, res.Already = final, true
		s.observeCancel(res)
		return res, nil
	}
	if won {
		// The store has ended the turn: its tombstone and its end must
		// follow even when the cancelling connection goes away now.
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(context.WithoutCancel(ctx), s.cfg.RequestTimeout)
		defer cancel()
	}
	created, err := s.bus.MarkCancelled(ctx, t.ID)
	if won {
		if err != nil {
			// The store has ended the turn; no worker will start it.
			s.log.Warn("write tombstone of cancelled queued turn", "turn_id", t.ID, "err", err)
		}
		if _, err := s.bus.PublishEvent(ctx, &bus.Event{Kind: bus.KindEnd, ConversationID: t.ConversationID, TurnID: t.ID, Status: final}); err != nil {
			s.log.Warn("publish end of cancelled queued turn", "turn_id", t.ID, "err", err)
		}
		res.Status = final
		s.observeCancel(res)
		return res, nil
	}
	tombstone := err
	if tombstone != nil {
		// No tombstone (for a few seconds after a NATS node is lost, its
		// bucket may have no leader), and so no signal from MarkCancelled,
		// which signals after writing it: signal here. The turn's worker
		// hears it over any live route and stops; the answer waits for
		// the end as ever, and is unavailable only when the end is not
		// heard and the tombstone still cannot be written.
		s.bus.SignalCancel(t.ID)
		created = true // not known: the end tells
	}
	res.Already = !created
	// Streaming when read (or started by a worker since, which sees the
	// tombstone), and listened for since before that read: the end,
	// whoever stores it (the producer, another cancel, a recovery), comes
	// as an event carrying the status stored.
	wait := time.NewTimer(s.cfg.CancelWait)
	defer wait.Stop()
	select {
	case e := <-c.ended:
		res.Status = e.Status
	case <-wait.C:
		// Not heard in time (in a NATS cluster, an end published through
		// another server before this one's interest reached it): read it.
		if t, err := s.store.TurnHead(ctx, t.ID); err == nil {
			res.Status = t.Status
		}
		if tombstone != nil && !res.Status.Terminal() {
			created, err := s.bus.MarkCancelled(ctx, t.ID)
			if err != nil {
				return res, &protocol.Error{Code: protocol.CodeUnavailable, Message: msgBrokerUnavailable, Err: err}
			}
			res.Already = !created
		}
	case <-ctx.Done():
		return res, ctx.Err()
	}
	res.Already = res.Already || (res.Status.Terminal() && res.Status != chat.StatusCancelled)
	s.observeCancel(res)
	return res, nil
}

func (s *Server) observeCancel(r cancelResult) {
	switch {
	case r.Already:
		s.m.cancels.WithLabelValues("already").Inc()
	case r.Status == chat.StatusCancelled:
		s.m.cancels.WithLabelValues("cancelled").Inc()
	default:
		s.m.cancels.WithLabelValues("lost_race").Inc()
	}
}

// catchUpResult is a turn's text from one seq on, as stored on the bus.
type catchUpResult struct {
	Text   []byte
	From   int64 // first seq covered (have+1)
	To     int64 // last seq covered; To < From means no new text
	ToLen  int64 // text length after delta To
	End    *bus.Event
	Missed bool // the events needed have expired from the stream
}

// catchUp reads what follows delta have of a turn: from the snapshot when it
// is ahead, then the tail of the stream. haveLen is the text length after
// delta have, or -1 when unknown (a client's resume point), in which case it
// is located through the snapshot's index.
func (s *Server) catchUp(ctx context.Context, conv, turn string, have, haveLen int64) (catchUpResult, error) {
	res := catchUpResult{From: have + 1, To: have, ToLen: haveLen}
	if have == 0 {
		haveLen, res.ToLen = 0, 0
	}
	if text, to, toLen, ok := s.bus.LiveText(conv, turn, have); ok {
		// Produced in this process: its text so far is in memory, ahead of
		// the stream (serve with its delta journal).
		res.Text, res.To, res.ToLen = text, to, toLen
		return res, nil
	}
	for read := 1; ; read++ {
		res, err := s.catchUpStored(ctx, conv, turn, res, have, haveLen)
		if err != nil || res.End == nil || res.End.Seq <= res.To || res.Missed || read == 2 {
			return res, err
		}
		// The stream holds the turn's end but not all the text before
		// it: the turn ended between the reads of its snapshot and of the
		// stream. Under serve's delta journal its deltas are not in the
		// stream; the snapshot saved them before the end was stored, so
		// a second read finds them.
	}
}

// storedEnd completes cu, a catch-up of turn that found no end in the
// stream, from the store when the store has ended the turn: its end was
// stored and never published (the gateway that cancelled the turn before
// it started, or the worker that produced it, died in between, or the
// stream refused the end). A client following the turn would otherwise
// wait for good. t is the turn's head when known already. Text the stream
// lacks is taken from the stored reply. A store that cannot be read leaves
// cu as it is, for the next sweep.
//
// A turn the store no longer has in conversation conv gives
// chat.ErrNotFound: conv was deleted, and the turn with it. Its id may
// since name another conversation's turn (see ForgetDeletedTurns), whose
// reply is not the follower's to see.
func (s *Server) storedEnd(ctx context.Context, conv, turn string, cu catchUpResult, t chat.Turn, known bool) (catchUpResult, error) {
	var err error
	if !known {
		if t, err = s.store.TurnHead(ctx, turn); err != nil {
			return cu, notFoundOnly(err)
		}
	}
	if t.ConversationID != conv {
		return cu, chat.ErrNotFound
	}
	if !t.Status.Terminal() {
		return cu, nil
	}
	if t.Seq > cu.To {
		if cu.ToLen < 0 {
			return cu, nil
		}
		if t, err = s.store.Turn(ctx, turn); err != nil {
			return cu, notFoundOnly(err)
		}
		if t.ConversationID != conv {
			return cu, chat.ErrNotFound
		}
		if int64(len(t.Content)) < cu.ToLen {
			return cu, nil
		}
		cu.Text = append(cu.Text, t.Content[cu.ToLen:]...)
		cu.To, cu.ToLen = t.Seq, int64(len(t.Content))
	}
	s.log.Warn("a turn's end is not in the stream; sending the stored one", "turn_id", turn, "status", t.Status)
	cu.End = &bus.Event{Kind: bus.KindEnd, ConversationID: t.ConversationID, TurnID: turn, Seq: t.Seq, Status: t.Status, Error: t.Error, Usage: t.Usage}
	return cu, nil
}

// notFoundOnly returns err when it is chat.ErrNotFound, else nil: any
// other failure is left for the next try.
func notFoundOnly(err error) error {
	if errors.Is(err, chat.ErrNotFound) {
		return err
	}
	return nil
}

// testHookHeadRead, when set, runs after catchUpStored has read a turn's
// snapshot head.
var testHookHeadRead func()

// catchUpStored is catchUp from the turn's snapshot and the stream, into a
// copy of res.
func (s *Server) catchUpStored(ctx context.Context, conv, turn string, res catchUpResult, have, haveLen int64) (catchUpResult, error) {
	head, err := s.bus.ReadHead(ctx, conv, turn)
	if testHookHeadRead != nil {
		testHookHeadRead()
	}
	if err != nil && !errors.Is(err, bus.ErrNoSnapshot) {
		return res, err
	}
	tailFrom := uint64(1)
	if head.Seq > have {
		// The snapshot is ahead: its text from the end of delta have on,
		// located through the snapshot's index (one read at most).
		if haveLen < 0 {
			end, ok, err := s.bus.EndOf(ctx, head, have)
			if err != nil {
				return res, err
			}
			if !ok {
				// Not indexed: find the delta in the stream.
				err := s.bus.ReadTurn(ctx, conv, turn, 1, func(e bus.Event) bool {
					if e.Kind == bus.KindDelta && e.Seq == have {
						end, ok = e.Off+int64(len(e.Text)), true
						return false
					}
					return e.Kind != bus.KindEnd
				})
				if err != nil {
					return res, err
				}
				if !ok {
					res.Missed = true
					return res, nil
				}
			}
			haveLen = end
		}
		if haveLen > head.Len {
			res.Missed = true
			return res, nil
		}
		text, err := s.bus.ReadText(ctx, head, haveLen)
		if err != nil {
			return res, err
		}
		res.Text = append(res.Text, text...)
		res.To, res.ToLen = head.Seq, head.Len
		tailFrom = head.StreamSeq + 1
	} else if head.Seq > 0 {
		tailFrom = head.StreamSeq + 1
		if head.Seq == have && haveLen < 0 {
			res.ToLen = head.Len
		}
	}
	err = s.bus.ReadTurn(ctx, conv, turn, tailFrom, func(e bus.Event) bool {
		switch e.Kind {
		case bus.KindDelta:
			if e.Seq == res.To+1 {
				res.Text = append(res.Text, e.Text...)
				res.To = e.Seq
				res.ToLen = e.Off + int64(len(e.Text))
			}
		case bus.KindEnd:
			ev := e
			res.End = &ev
			return false
		}
		return true
	})
	return res, err
}

func newID() string {
	id, err := uuid.NewV7()
	if err != nil {
		return uuid.NewString()
	}
	return id.String()
}

// workerReady returns nil when a worker that can reach its model server
// answered recently, else the unavailable error a send gets; see
// workerAlive.
func (s *Server) workerReady(ctx context.Context) error {
	err := s.workerAlive(ctx)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, bus.ErrProviderUnreachable):
		return protocol.Errorf(protocol.CodeUnavailable, "the model server cannot be reached; try again shortly")
	}
	return protocol.Errorf(protocol.CodeUnavailable, "no model worker is running; try again shortly")
}

// workerAlive returns nil when a worker that can reach its model server
// answered recently, asking the bus at most every workerCheckEvery; a send
// with no worker to produce its turn (or none whose turn would not end in
// an error at once) is refused rather than left queued. Sends that find the
// answer stale share one ping: none waits behind another's. The error
// wraps bus.ErrProviderUnreachable when workers answered that their model
// server cannot be reached.
func (s *Server) workerAlive(ctx context.Context) error {
	if s.bus.InProcess() {
		// serve's own worker, in this process, which ends with it: a
		// ping would only time out when the machine is overloaded, and
		// refuse a send for that. It says itself whether it can reach
		// its model server.
		if s.cfg.ModelUnreachable != nil {
			return s.cfg.ModelUnreachable(ctx)
		}
		return nil
	}
	s.workerMu.Lock()
	if s.now().Sub(s.workerSeen) < workerCheckEvery {
		s.workerMu.Unlock()
		return nil
	}
	p := s.workerPing
	if p == nil {
		p = &workerProbe{done: make(chan struct{})}
		s.workerPing = p
		go s.pingWorkers(p)
	}
	s.workerMu.Unlock()
	select {
	case <-p.done:
		return p.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// workerProbe is one ping of the workers; err is set before done closes.
type workerProbe struct {
	done chan struct{}
	err  error
}

func (s *Server) pingWorkers(p *workerProbe) {
	ctx, cancel := context.WithTimeout(s.shutdownCtx, workerPingTimeout)
	_, err := s.bus.PingWorkers(ctx)
	cancel()
	s.workerMu.Lock()
	p.err = err
	if err == nil {
		s.workerSeen = s.now()
	}
	s.workerPing = nil
	s.workerMu.Unlock()
	close(p.done)
}

// workerPingTimeout bounds the wait for a worker's answer. A stopped worker
// leaves no subscriber and is known at once ("no responders"); the wait is
// for a worker on a busy machine, whose send had better wait than fail.
const workerPingTimeout = 2 * time.Second

const workerCheckEvery = 3 * time.Second
