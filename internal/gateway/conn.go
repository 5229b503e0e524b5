package gateway

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/protocol"
)

// Close codes of PROTOCOL.md.
const (
	closeUnauthorized   websocket.StatusCode = 4001
	closeSlowConsumer   websocket.StatusCode = 4008
	closeTooManyConns   websocket.StatusCode = 4009
	closeTooManyBadFrms                      = websocket.StatusPolicyViolation // 1008
)

// conn is one native WebSocket connection. Its read loop handles client
// frames one at a time; its writer goroutine is
// the only one that writes to the socket; everything else enqueues to q.
type conn struct {
	s    *Server
	ws   *websocket.Conn
	raw  *rawSocket
	user string
	q    *outQueue

	ctx    context.Context // the connection's lifetime
	cancel context.CancelFunc
	wg     sync.WaitGroup // repairs and cancels in flight

	mu        sync.Mutex
	views     map[string]*view // joined conversations; guarded by mu
	closeOnce sync.Once
	closing   atomic.Bool // set when the connection is to close: frames are no longer handled

	badFrames int // owned by the read loop
	w         connWriter
	writers   sync.WaitGroup // the queue's running writers
	held      jobHold        // jobs of sends with frames right behind them (see hold)
	answers   sync.WaitGroup // cancels still to be answered; added to by the read loop only
}

var _ sink = (*conn)(nil)

// settle waits, for d at most, until the cancels handled so far are
// answered and the queue is written (see readLoop).
func (c *conn) settle(d time.Duration) {
	deadline := time.Now().Add(d)
	answered := make(chan struct{})
	go func() { // ends with the last cancel, within the request and cancel timeouts
		c.answers.Wait()
		close(answered)
	}()
	wait := time.NewTimer(d)
	defer wait.Stop()
	select {
	case <-answered:
	case <-wait.C:
	}
	waitIdle(c.q, time.Until(deadline))
}

// jobHold is the jobs a connection holds back (see conn.hold).
type jobHold struct {
	any    atomic.Bool // jobs is not empty
	mu     sync.Mutex
	jobs   []func()    // guarded by mu
	busy   bool        // a frame is being handled; guarded by mu
	frames int         // frames handled since the last job was held, its send's included; guarded by mu
	timer  *time.Timer // releases the jobs after holdMax without a frame; guarded by mu
}

// A connection holds jobs back while it handles the frames that arrived
// with their sends: at most holdFrames of them behind the last send, and
// for at most holdMax while it waits for the rest of a frame that has
// arrived only in part.
const (
	holdFrames = 16
	holdMax    = 100 * time.Millisecond
)

// hold takes a send's job (see sendRequest.hold) when a frame sent right
// behind the send has already arrived, and enqueues it only once the
// frames already here have been handled (see frame). A cancel among them
// then ends the turn while it is still queued, before any worker can start
// it, however long the handling takes: a cancel written right behind its
// message never lets the model be called.
func (c *conn) hold(enqueue func()) bool {
	if !c.raw.moreFrames() {
		return false
	}
	h := &c.held
	h.mu.Lock()
	h.jobs = append(h.jobs, enqueue)
	h.frames = 0  // each send gets its frames behind it
	h.busy = true // called while a frame (the send) is handled
	h.any.Store(true)
	h.mu.Unlock()
	return true
}

// handling marks the start of a frame's handling while jobs are held: the
// time it takes does not count against holdMax.
func (c *conn) handling() {
	h := &c.held
	h.mu.Lock()
	h.busy = true
	if h.timer != nil {
		h.timer.Stop()
	}
	h.mu.Unlock()
}

// handled follows a frame's handling while jobs are held: they are
// enqueued when no other frame has arrived, or after holdFrames frames;
// otherwise the wait for the next frame begins, holdMax at most.
func (c *conn) handled() {
	h := &c.held
	h.mu.Lock()
	h.frames++ // the send's own frame first, then those behind it
	if h.frames <= holdFrames && c.raw.moreFrames() {
		h.busy = false
		if h.timer == nil {
			h.timer = time.AfterFunc(holdMax, c.heldTimeout)
		} else {
			h.timer.Reset(holdMax)
		}
		h.mu.Unlock()
		return
	}
	jobs := h.takeLocked()
	h.mu.Unlock()
	runAll(jobs)
}

// heldTimeout enqueues the held jobs when the next frame has not come
// whole within holdMax; a timer that fired as a frame came (and stopped
// it) leaves them.
func (c *conn) heldTimeout() { c.enqueueHeld(false) }

// releaseHeld enqueues the jobs the connection holds, as it ends.
func (c *conn) releaseHeld() { c.enqueueHeld(true) }

// enqueueHeld enqueues the held jobs, unless a frame is being handled and
// evenIfBusy is false.
func (c *conn) enqueueHeld(evenIfBusy bool) {
	h := &c.held
	h.mu.Lock()
	if h.busy && !evenIfBusy {
		h.mu.Unlock()
		return
	}
	jobs := h.takeLocked()
	h.mu.Unlock()
	runAll(jobs)
}

// takeLocked empties the hold and returns its jobs; called with mu held.
func (h *jobHold) takeLocked() []func() {
	jobs := h.jobs
	h.jobs, h.busy, h.frames = nil, false, 0
	h.any.Store(false)
	if h.timer != nil {
		h.timer.Stop()
	}
	return jobs
}

func runAll(fs []func()) {
	for _, f := range fs {
		f()
	}
}

// logger is the connection's logger, made when something is logged: an
// idle connection keeps none.
func (c *conn) logger() *slog.Logger { return c.s.log.With("user", c.user) }

func (c *conn) push(v any) {
	c.q.push(protocol.Encode(v))
}

func (c *conn) message(conv string, m chat.Message) {
	c.push(protocol.MessageFrame{Type: "message", ConversationID: conv, Message: protocol.WireMessage(m)})
}

func (c *conn) start(conv, turn, replyTo, model string) {
	c.push(protocol.TurnStart{Type: "turn.start", ConversationID: conv, TurnID: turn, ReplyTo: replyTo, Model: model})
}

func (c *conn) delta(conv, turn string, from, seq int64, _ int64, text string, ts int64) {
	catchUp := ts == catchUpTS
	if catchUp || !c.s.cfg.DeltaTimestamps {
		ts = 0
	}
	c.q.pushDelta(conv, turn, from, seq, text, ts, catchUp)
}

func (c *conn) end(conv, turn string, seq int64, status chat.TurnStatus, errMsg string, usage *chat.Usage) {
	c.q.forget(turn)
	c.q.pushEnd(protocol.Encode(protocol.TurnEnd{Type: "turn.end", ConversationID: conv, TurnID: turn, Seq: seq, Status: status, Error: errMsg, Usage: usage}))
}

func (c *conn) fail(err error) {
	c.logger().Warn("view failed; closing so the client resumes", "err", err)
	c.closeWith(websocket.StatusInternalError, "resume needed")
}

func (c *conn) closeWith(code websocket.StatusCode, reason string) {
	c.closeAfter(0, code, reason)
}

// closeAfter closes the connection with code, first giving what is queued
// up to drain (at most, then the rest is dropped). From the call on, the
// read loop handles no more client frames.
func (c *conn) closeAfter(drain time.Duration, code websocket.StatusCode, reason string) {
	c.closeOnce.Do(func() {
		c.closing.Store(true)
		go func() {
			if drain > 0 {
				waitIdle(c.q, drain)
			}
			_ = c.raw.close(c.ws, code, reason)
			c.cancel()
		}()
	})
}

func (c *conn) sendError(id string, err error) {
	if errors.Is(err, context.Canceled) && c.ctx.Err() != nil {
		return // the connection has ended: nobody reads the answer
	}
	pe := asError(err)
	if pe.Code == protocol.CodeInternal {
		c.logger().Error("request failed", "err", err)
	}
	c.push(pe.Frame(id))
}

// frame handles one client frame, and tells the jobs the connection holds
// (see hold) that it did.
func (c *conn) frame(typ websocket.MessageType, data []byte) {
	held := c.held.any.Load()
	if held {
		c.handling()
	}
	c.decodeAndHandle(typ, data)
	if held || c.held.any.Load() {
		c.handled()
	}
}

func (c *conn) decodeAndHandle(typ websocket.MessageType, data []byte) {
	if c.closing.Load() || c.q.stopped() {
		// A frame that came after the reason to close, or after the
		// queue overflowed (the client stopped reading what it asked for).
		return
	}
	if typ != websocket.MessageText {
		c.badFrame("", "frames must be text")
		return
	}
	f, err := protocol.DecodeClient(data)
	if err != nil {
		var de *protocol.DecodeError
		id := ""
		if errors.As(err, &de) {
			id = de.ID
		}
		c.badFrame(id, err.Error())
		return
	}
	c.handle(f)
}

func (c *conn) badFrame(id, msg string) {
	c.badFrames++
	c.s.m.badFrames.Inc()
	c.push(protocol.Errorf(protocol.CodeBadRequest, msg).Frame(id))
	if lim := c.s.cfg.Limits.BadFrames; lim > 0 && c.badFrames > lim {
		c.s.m.limitHits.WithLabelValues("bad_frames").Inc()
		// Its error goes out first, and nothing sent after it is handled.
		c.closeAfter(time.Second, closeTooManyBadFrms, "too many bad frames")
	}
}

func (c *conn) handle(f protocol.ClientFrame) {
	ctx, cancel := c.s.requestCtx()
	defer cancel()
	switch f.Type {
	case protocol.TypePing:
		c.push(struct {
			Type string `json:"type"`
			ID   string `json:"id,omitempty"`
		}{"pong", f.ID})
	case protocol.TypeJoin:
		if err := c.join(ctx, f); err != nil {
			c.sendError(f.ID, err)
		}
	case protocol.TypeLeave:
		c.leave(f.ConversationID)
		if f.ID != "" {
			c.push(protocol.Ack{Type: "ack", ID: f.ID, ConversationID: f.ConversationID})
		}
	case protocol.TypeSend:
		res, err := c.s.send(ctx, sendRequest{User: c.user, ConversationID: f.ConversationID, MessageID: f.MessageID, TurnID: f.TurnID, Text: f.Text, Model: f.Model, hold: c.hold})
		if err != nil {
			c.sendError(f.ID, err)
			return
		}
		c.push(protocol.Ack{Type: "ack", ID: f.ID, MessageID: res.Message.ID, TurnID: res.Turn.ID})
	case protocol.TypeCancel:
		// The turn is stopped here, and waiting for its end must not hold
		// up this connection's other frames: that goes on elsewhere.
		pc, err := c.s.beginCancel(ctx, c.user, f.TurnID)
		if err != nil {
			c.sendError(f.ID, named(err, "turn "+quote(f.TurnID)))
			return
		}
		c.wg.Add(1)
		c.answers.Add(1)
		go func() {
			defer c.wg.Done()
			defer c.answers.Done()
			ctx, cancel := context.WithTimeout(c.ctx, c.s.cfg.RequestTimeout+c.s.cfg.CancelWait)
			defer cancel()
			res, err := pc.finish(ctx)
			if err != nil {
				c.sendError(f.ID, err)
				return
			}
			already := res.Already
			c.push(protocol.Ack{Type: "ack", ID: f.ID, TurnID: res.TurnID, Status: res.Status, Already: &already})
		}()
	}
}

// joinRetryAfter is the retry_after_ms of a join refused by --limit-joins.
const joinRetryAfter = time.Second

func (c *conn) join(ctx context.Context, f protocol.ClientFrame) error {
	c.mu.Lock()
	_, rejoin := c.views[f.ConversationID]
	n := len(c.views)
	c.mu.Unlock()
	if lim := c.s.cfg.Limits.Joins; !rejoin && lim > 0 && n >= lim {
		// Refused before the claim: a join that is not carried out
		// creates no conversation.
		c.s.m.limitHits.WithLabelValues("joins").Inc()
		// Every rate_limited error carries retry_after_ms, so that a client
		// that retries by it alone retries slowly; only a leave frees a
		// slot, which the message says.
		return &protocol.Error{Code: protocol.CodeRateLimited, Message: "too many conversations joined on this connection (limit " + itoa(lim) + "); leave one first",
			RetryAfterMS: joinRetryAfter.Milliseconds()}
	}
	if err := c.s.claim(ctx, c.user, f.ConversationID); err != nil {
		return err
	}
	if rejoin {
		c.leave(f.ConversationID)
	}
	v := newView(c.s, c.ctx, &c.wg, f.ConversationID, c.user, c)
	if err := c.s.hub.add(ctx, f.ConversationID, v); err != nil {
		v.close()
		return err
	}
	history := protocol.DefaultHistory
	if f.History != nil {
		history = *f.History
	}
	j, followUps, turns, err := v.join(ctx, history, f.After)
	if err != nil {
		c.s.hub.remove(f.ConversationID, v)
		v.close()
		return err
	}
	c.mu.Lock()
	c.views[f.ConversationID] = v
	c.mu.Unlock()
	j.Type, j.ID, j.ConversationID = "joined", f.ID, f.ConversationID
	if j.Messages == nil {
		j.Messages = []protocol.Message{}
	}
	c.q.pushAsked(protocol.Encode(j))
	if f.ID != "" {
		c.push(protocol.Ack{Type: "ack", ID: f.ID, ConversationID: f.ConversationID})
	}
	for _, fu := range followUps {
		fu()
	}
	v.ready(turns)
	outcome := "fresh"
	if f.After != nil {
		outcome = "after"
	}
	c.s.m.joins.WithLabelValues(outcome).Inc()
	return nil
}

// claim makes conversation conv user's for a join: it is when it exists
// and user owns it (chat.ErrForbidden when another user does); when nobody
// has used its id, it is created for user if --limit-new-conversations
// allows. Each creation leaves a row, so without that limit a client
// joining and leaving new ids in a loop could fill the store.
func (s *Server) claim(ctx context.Context, user, conv string) error {
	c, err := s.store.Conversation(ctx, conv)
	switch {
	case err == nil && c.Owner != user:
		return chat.ErrForbidden
	case err == nil:
		return nil
	case !errors.Is(err, chat.ErrNotFound):
		return err
	}
	wait, ok, refund := s.limits.allowClaim(user)
	if !ok {
		s.m.limitHits.WithLabelValues("new_conversations").Inc()
		return &protocol.Error{Code: protocol.CodeRateLimited, RetryAfterMS: max(wait.Milliseconds(), 1),
			Message: "too many new conversations (limit " + itoa(s.cfg.Limits.NewConversations) + " per minute); join one you have, or wait"}
	}
	if _, err = s.store.ClaimConversation(ctx, conv, user, s.now()); err != nil {
		// Nothing of this user's was created: another user took the id
		// meanwhile, or the store failed.
		refund()
	}
	return err
}

// revoked tells the client that it no longer follows v's conversation (see
// sink), and leaves it on the connection's behalf.
func (c *conn) revoked(v *view) {
	c.push(protocol.ErrorFrame{Type: "error", Code: protocol.CodeForbidden, ConversationID: v.conv,
		Message: "conversation " + v.conv + " was deleted and now belongs to another user; it is no longer joined"})
	if c.ctx.Err() != nil {
		return // the connection is going: its release drops every view
	}
	c.wg.Add(1)
	go func() { // v's lock is held, and the hub may be delivering to v
		defer c.wg.Done()
		c.mu.Lock()
		if c.views[v.conv] == v {
			delete(c.views, v.conv)
		}
		c.mu.Unlock()
		c.s.hub.remove(v.conv, v)
	}()
}

// gone tells the client that v's conversation was deleted (see sink). The
// connection keeps following the id, as a join of it would: what its user
// sends there next (a conversation created afresh) reaches it as before.
func (c *conn) gone(v *view) {
	c.push(protocol.ErrorFrame{Type: "error", Code: protocol.CodeNotFound, ConversationID: v.conv,
		Message: "conversation " + v.conv + " was deleted"})
}

// dropped sends nothing: the client was told of the deletion by gone (or
// learns it from its next join's snapshot), and drops the conversation.
func (c *conn) dropped(*view, string) {}

func (c *conn) leave(conv string) {
	c.mu.Lock()
	v := c.views[conv]
	delete(c.views, conv)
	c.mu.Unlock()
	if v != nil {
		c.s.hub.remove(conv, v)
		v.close()
	}
}

// run serves the connection until it ends, then releases everything.
// Setting up and releasing are calls of their own (see setup): run's frame
// stays on the stack all the while the socket is parked.
func (c *conn) run() {
	c.setup()
	c.s.readLoop(c.ws, c.raw, c.frame, c.settle)
	c.release()
}

// setup wires the writer and starts the keep-alive. It is not inlined
// into run, and neither is release: their locals would otherwise sit in
// run's frame, under the parked reader, and 96 bytes more there took the
// stack past 2 KiB, after which it stays 4 KiB for the connection's life
// (see rawSocket).
//
//go:noinline
func (c *conn) setup() {
	c.w = connWriter{s: c.s, raw: c.raw, q: c.q, ctx: c.ctx, cancel: c.cancel, closeWith: c.closeWith}
	c.q.spawn, c.q.direct, c.q.writers = c.w.drain, c.w.writeNow, &c.writers
	onOwnStack(func() { c.s.keepAlive(c.ctx, c.raw, c.q, c.closeWith) })
}

//go:noinline
func (c *conn) release() {
	c.releaseHeld()
	c.cancel()
	c.q.close()
	c.writers.Wait()
	c.mu.Lock()
	views := c.views
	c.views = nil
	c.mu.Unlock()
	for conv, v := range views {
		c.s.hub.remove(conv, v)
		v.close()
	}
	c.wg.Wait()
	_ = c.ws.CloseNow()
}
