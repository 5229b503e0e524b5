package gateway

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/coder/websocket"

	"github.com/tokenrelay/tokenrelay/internal/auth"
	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/protocol"
)

// closeCompatRejected is the close code COMPAT.md gives for a socket that
// is refused (bad token): 1003.
const closeCompatRejected = websocket.StatusUnsupportedData

// compatMarker stands in the queue for a turn's newest streaming frame (see
// compatConn). It is never a frame: frames are JSON or the text "pong". It
// is never modified.
var compatMarker = []byte{0}

func isCompatMarker(f []byte) bool { return len(f) == 1 && f[0] == 0 }

// compatConn is one COMPAT.md WebSocket (/ws/chat): a sink over one view of
// its session. Its read loop answers client frames (each on a goroutine of
// its own, see onOwnStack); its writer, started when frames are queued and
// gone when the queue is empty, is the only code that writes to the
// socket; everything else enqueues to q. Like a native connection it idles
// on one small goroutine, and pings from a timer.
//
// A reply's frames carry the whole text so far, so a newer one makes an
// older one useless. They are therefore not queued themselves: the queue
// holds a marker in the place of a turn's first unwritten frame, the turn
// keeps only its newest frame (streaming or final), and the writer writes
// that when it reaches the marker. A socket that falls behind skips
// intermediate frames instead of piling up copies of the text (its queue
// holds one byte per turn, so a long reply never trips the outbound limit);
// the content it shows never goes back.
type compatConn struct {
	s    *Server
	cp   *compat
	ws   *websocket.Conn
	raw  *rawSocket
	user string // the authenticated user, owner of conv
	conv string // the session
	q    *outQueue

	ctx       context.Context // the connection's lifetime
	cancel    context.CancelFunc
	wg        sync.WaitGroup // the view's repairs
	view      *view          // set by join; owned by run
	closeOnce sync.Once
	w         connWriter
	writers   sync.WaitGroup // the queue's running writers

	mu     sync.Mutex
	turns  map[string]*compatTurn // turns being streamed to this socket; guarded by mu
	staged []*compatTurn          // turns whose marker is queued, in queue order; guarded by mu
	closed bool                   // guarded by mu
}

// compatTurn is a turn as far as one compat socket has it. Guarded by the
// connection's mu.
type compatTurn struct {
	st     *sharedText // held until the turn ends or the socket closes
	n      int64       // bytes of the text this socket has been given
	seq    int64       // last delta seq given
	frame  []byte      // newest frame, written at the marker; nil when none
	staged bool        // a marker of this turn is queued
	from   int64       // while staged: the bytes the client had when it was queued
}

var _ sink = (*compatConn)(nil)

// logger is the connection's logger, made when something is logged: an
// idle connection keeps none.
func (c *compatConn) logger() *slog.Logger {
	return c.s.log.With("user", c.user, "conversation_id", c.conv, "compat", true)
}

func (c *compatConn) nowMS() int64 { return c.s.now().UnixMilli() }

// message is not sent: COMPAT.md's page shows its own bubble for a message
// it sent, and would show a live one twice. User messages are in history.
func (c *compatConn) message(string, chat.Message) {}

// start has no frame of its own in COMPAT.md.
func (c *compatConn) start(string, string, string, string) {}

func (c *compatConn) delta(_, turn string, _, seq int64, off int64, text string, _ int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	ct := c.turnLocked(turn)
	frame, n, err := ct.st.delta(off, text, c.nowMS())
	if err != nil {
		c.fail(err)
		return
	}
	if ct.staged && ct.from < off {
		// The frame this one replaces was never written: its chunk goes on
		// in this one, so chunk is all the client has not been given (after
		// a reload, the first frame's chunk is still the whole text).
		frame = ct.st.streamFrame(ct.from, n, c.nowMS())
	}
	ct.n, ct.seq = n, seq
	c.stageLocked(ct, frame, off)
}

func (c *compatConn) end(_, turn string, _ int64, status chat.TurnStatus, _ string, _ *chat.Usage) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.endLocked(c.turnLocked(turn), status)
}

// endLocked queues the final frame of ct, which ended with status, and
// forgets the turn.
func (c *compatConn) endLocked(ct *compatTurn, status chat.TurnStatus) {
	// The final frame supersedes any streaming frame not yet written, and
	// takes its place in the queue.
	c.stageLocked(ct, ct.st.finalFrame(ct.n, status, c.nowMS()), ct.n)
	delete(c.turns, ct.st.turn)
	c.cp.release(ct.st)
}

// dropped ends a reply this socket was given text of, and whose session
// was cleared before its end was stored (the clear's cancel was not
// answered in time: its producer was gone or slow). The page still shows
// it streaming, and would wait for its end for good; it gets the final
// frame a cancelled reply gets, since the clear stopped it, as when the
// cancel is answered in time. A reconnect for it then answers not_found,
// instead of bringing the deleted text back.
func (c *compatConn) dropped(_ *view, turn string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	if ct := c.turns[turn]; ct != nil {
		c.endLocked(ct, chat.StatusCancelled)
	}
}

// revoked closes the socket: the session was deleted and another user has
// taken its id, and COMPAT.md has no frame for that. A reconnect is refused.
func (c *compatConn) revoked(*view) {
	c.closeWith(websocket.StatusPolicyViolation, "session deleted")
}

// gone says nothing: the old system had no word for a deleted session, and
// its page clears its history (which deletes the conversation) and goes on
// chatting in the same session.
func (c *compatConn) gone(*view) {}

func (c *compatConn) fail(err error) {
	c.logger().Warn("compat view failed; closing so the page reconnects", "err", err)
	c.closeWith(websocket.StatusInternalError, "resume needed")
}

// turnLocked returns this socket's state of turn, holding its shared text.
func (c *compatConn) turnLocked(turn string) *compatTurn {
	ct := c.turns[turn]
	if ct == nil {
		ct = &compatTurn{st: c.cp.acquire(turn, c.conv, c.user)}
		c.turns[turn] = ct
	}
	return ct
}

// stageLocked makes frame the turn's newest streaming frame, queueing a
// marker for it unless one is queued already; from is the bytes of text
// the client has before frame.
func (c *compatConn) stageLocked(ct *compatTurn, frame []byte, from int64) {
	ct.frame = frame
	if ct.staged {
		ct.from = min(ct.from, from)
		return
	}
	ct.from = from
	// A push fails once the queue has closed: the writer counts an
	// overflow as a slow consumer, once; any other close is not one.
	if !c.q.push(compatMarker) {
		return
	}
	ct.staged = true
	c.staged = append(c.staged, ct)
}

func (c *compatConn) pushLocked(frame []byte) {
	c.q.push(frame) // a failure is counted as stageLocked's
}

func (c *compatConn) push(frame []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pushLocked(frame)
}

// pushWholeLocked queues a frame the client asked for whole, which the
// backlog limit does not count, as it does not count a native joined
// frame: the history on connect, a finished reply's final frame on
// reconnect. Counted, one reply longer than the limit closed every socket
// of its session with 4008 as it connected, and its reconnect too. As for
// a joined frame, what it asks for has a budget of its own (see
// outQueue.pushAsked): a client that asks for reply after reply without
// reading is closed as a slow consumer. c.mu is held.
func (c *compatConn) pushWholeLocked(frame []byte) {
	c.q.pushAsked(frame)
}

// resolve returns the frame to write for f, a frame taken from the queue:
// f itself, or for a marker its turn's newest frame (nil when a later
// marker of the turn has it).
func (c *compatConn) resolve(f []byte) []byte {
	if !isCompatMarker(f) {
		return f
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.staged) == 0 {
		return nil
	}
	ct := c.staged[0]
	c.staged[0] = nil
	c.staged = c.staged[1:]
	f, ct.frame, ct.staged = ct.frame, nil, false
	return f
}

func (c *compatConn) closeWith(code websocket.StatusCode, reason string) {
	c.closeAfter(0, code, reason)
}

// closeAfter closes the connection with code, first giving what is queued
// up to drain (at most, then the rest is dropped).
func (c *compatConn) closeAfter(drain time.Duration, code websocket.StatusCode, reason string) {
	c.closeOnce.Do(func() {
		go func() {
			if drain > 0 {
				waitIdle(c.q, drain)
			}
			_ = c.raw.close(c.ws, code, reason)
			c.cancel()
		}()
	})
}

// expired closes the socket when its token expires: COMPAT.md's error
// frame says why (a page or script would otherwise see only a close, and
// could not tell it from a refusal at connect), then close 1003 follows
// once the frame is written (a second at most).
func (c *compatConn) expired() {
	c.push(protocol.Encode(compatErrorFrame{Type: "error", Error: "Token expired", Timestamp: protocol.FormatTime(c.s.now())}))
	c.closeAfter(time.Second, closeCompatRejected, "token expired")
}

// resolveAll resolves the frames a writer took from the queue, in place
// and in order (see resolve).
func (c *compatConn) resolveAll(frames [][]byte) [][]byte {
	out := frames[:0]
	for _, f := range frames {
		if f = c.resolve(f); f != nil {
			out = append(out, f)
		}
	}
	clear(frames[len(out):])
	return out
}

// Fixed answers of COMPAT.md.
var (
	compatPong         = []byte(`{"type":"pong"}`)
	compatHeartbeatAck = []byte(`{"type":"heartbeat_ack"}`)
	compatTextPong     = []byte("pong")
)

// compatClientFrame is any client frame of COMPAT.md.
type compatClientFrame struct {
	Type           string          `json:"type"`
	MessageID      string          `json:"messageId"`
	MessageIDSnake string          `json:"message_id"`
	LastChunkIndex json.RawMessage `json:"lastChunkIndex"`
}

// frame answers one client text frame.
func (c *compatConn) frame(data []byte) {
	if c.q.stopped() {
		return // it overflowed: the client stopped reading what it asked for
	}
	if string(bytes.TrimSpace(data)) == "ping" {
		c.push(compatTextPong)
		return
	}
	var f compatClientFrame
	if json.Unmarshal(data, &f) != nil {
		return
	}
	switch f.Type {
	case "ping":
		c.push(compatPong)
	case "heartbeat":
		c.push(compatHeartbeatAck)
	case "reconnect":
		id := f.MessageID
		if id == "" {
			id = f.MessageIDSnake
		}
		ctx, cancel := c.s.requestCtx()
		c.reconnect(ctx, id, chunkIndex(f.LastChunkIndex))
		cancel()
	}
}

// chunkIndex reads lastChunkIndex: a number (0 when absent or not one).
func chunkIndex(raw json.RawMessage) int64 {
	f, err := strconv.ParseFloat(string(bytes.Trim(raw, `" `)), 64)
	if err != nil || !(f >= 0 && f <= 1<<53) { // NaN too
		return 0
	}
	return int64(f)
}

// recoveryStatus is COMPAT.md's answer to reconnect.
type recoveryStatus struct {
	Type            string `json:"type"`
	Status          string `json:"status"`
	ChunksRecovered int64  `json:"chunksRecovered"`
}

// reconnect answers {"type":"reconnect","messageId":id,"lastChunkIndex":k}:
// the reply's text so far as one frame (or its final frame), then
// recovery_status. id is the reply's id or the id of the user message it
// answers; k is read as the last delta seq the page has, so chunksRecovered
// counts the deltas after it.
func (c *compatConn) reconnect(ctx context.Context, id string, k int64) {
	answer := func(status string, seq int64) {
		c.pushLocked(protocol.Encode(recoveryStatus{Type: "recovery_status", Status: status, ChunksRecovered: max(0, seq-k)}))
	}
	if !chat.ValidID(id) {
		c.mu.Lock()
		answer("not_found", 0)
		c.mu.Unlock()
		return
	}
	if c.recoverLive(id, answer) {
		return
	}
	t, err := c.cp.resolveTurn(ctx, c.conv, id)
	if err == nil && c.recoverLive(t.ID, answer) {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case err != nil:
		answer("not_found", 0)
	case t.Status.Terminal():
		c.pushWholeLocked(compatFinalFrame(t.ID, c.conv, c.user, []byte(t.Content), t.Status, c.nowMS()))
		answer("completed", t.Seq)
	default:
		// Running, and this socket has been given nothing of it yet.
		answer("recovered", 0)
	}
}

// recoverLive answers a reconnect for a turn this socket is streaming: its
// newest text as one frame, then the status. It reports false when the
// socket is not streaming turn.
func (c *compatConn) recoverLive(turn string, answer func(string, int64)) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	ct := c.turns[turn]
	if ct == nil {
		return false
	}
	if ct.n > 0 {
		c.stageLocked(ct, ct.st.streamFrame(0, ct.n, c.nowMS()), 0)
	}
	answer("recovered", ct.seq)
	return true
}

// join attaches the socket's view to the session and queues history and
// the reply in flight, so that nothing published meanwhile is lost or
// doubled (see view.join).
func (c *compatConn) join(ctx context.Context) error {
	v := newView(c.s, c.ctx, &c.wg, c.conv, c.user, c)
	if err := c.s.hub.add(ctx, c.conv, v); err != nil {
		v.close()
		return err
	}
	j, followUps, turns, err := v.join(ctx, compatHistory, nil)
	if err != nil {
		c.s.hub.remove(c.conv, v)
		v.close()
		return err
	}
	c.view = v
	hist := make([]chatMessage, 0, len(j.Messages))
	for _, m := range j.Messages {
		if cm, ok := compatStored(m, c.user); ok {
			hist = append(hist, cm)
		}
	}
	if len(hist) > 0 {
		c.mu.Lock()
		c.pushWholeLocked(compatHistoryFrame(hist, c.s.cfg.Limits.OutboundBytes/2))
		c.mu.Unlock()
	}
	if a := j.Active; a != nil {
		c.mu.Lock()
		ct := c.turnLocked(a.TurnID)
		ct.st.seed(a.Text)
		ct.n, ct.seq = int64(len(a.Text)), a.Seq
		if ct.n > 0 {
			c.stageLocked(ct, ct.st.streamFrame(0, ct.n, c.nowMS()), 0)
		}
		c.mu.Unlock()
	}
	for _, fu := range followUps {
		fu()
	}
	v.ready(turns)
	c.s.m.joins.WithLabelValues("fresh").Inc()
	return nil
}

// run serves the connection until it ends, then releases everything.
func (c *compatConn) run() {
	c.setup()
	c.s.readLoop(c.ws, c.raw, c.clientFrame, func(d time.Duration) { waitIdle(c.q, d) })
	c.release()
}

// setup wires the writer, starts the keep-alive and joins the session;
// like release, a call of its own so that run's frame, on the stack while
// the socket is parked, stays small (see conn.setup).
//
//go:noinline
func (c *compatConn) setup() {
	c.w = connWriter{s: c.s, raw: c.raw, q: c.q, ctx: c.ctx, cancel: c.cancel, closeWith: c.closeWith, resolve: c.resolveAll}
	c.q.spawn, c.q.writers = c.w.drain, &c.writers
	onOwnStack(func() {
		c.s.keepAlive(c.ctx, c.raw, c.q, c.closeWith)
		c.push(protocol.Encode(compatWelcome{Type: "welcome", SessionID: c.conv, Timestamp: protocol.FormatTime(c.s.now())}))
		ctx, cancel := c.s.requestCtx()
		err := c.join(ctx)
		cancel()
		if err != nil {
			if c.ctx.Err() == nil {
				c.logger().Error("compat join", "err", err)
			}
			c.closeWith(websocket.StatusInternalError, "cannot load the session")
		}
	})
}

// clientFrame handles one client frame. Frames it does not understand,
// binary ones included, are ignored, as the original server did.
func (c *compatConn) clientFrame(typ websocket.MessageType, data []byte) {
	if typ == websocket.MessageText {
		c.frame(data)
	}
}

//go:noinline
func (c *compatConn) release() {
	c.cancel()
	c.q.close()
	c.writers.Wait()
	if c.view != nil {
		c.s.hub.remove(c.conv, c.view)
		c.view.close()
	}
	c.wg.Wait()
	c.mu.Lock()
	c.closed = true
	for _, ct := range c.turns {
		c.cp.release(ct.st)
	}
	c.turns, c.staged = nil, nil
	c.mu.Unlock()
	_ = c.ws.CloseNow()
}

type compatWelcome struct {
	Type      string `json:"type"`
	SessionID string `json:"sessionId"`
	Timestamp string `json:"timestamp"`
}

type compatErrorFrame struct {
	Type      string `json:"type"`
	Error     string `json:"error"`
	Timestamp string `json:"timestamp"`
}

// reject sends COMPAT.md's error frame on a socket that is refused, then
// closes it with 1003. Nothing else writes to ws yet.
func (cp *compat) reject(ws *websocket.Conn, msg string) {
	cp.rejectWith(ws, closeCompatRejected, msg)
}

// rejectWith is reject with another close code.
func (cp *compat) rejectWith(ws *websocket.Conn, code websocket.StatusCode, msg string) {
	ctx, cancel := context.WithTimeout(cp.s.shutdownCtx, cp.s.cfg.WriteTimeout)
	defer cancel()
	frame := protocol.Encode(compatErrorFrame{Type: "error", Error: msg, Timestamp: protocol.FormatTime(cp.s.now())})
	if err := ws.Write(ctx, websocket.MessageText, frame); err != nil {
		_ = ws.CloseNow()
		return
	}
	_ = ws.Close(code, msg)
}

// claim makes session user's conversation for a socket (see
// Server.claim), or refuses the socket and reports false.
func (cp *compat) claim(ctx context.Context, ws *websocket.Conn, user, session string) bool {
	s := cp.s
	ctx, cancel := context.WithTimeout(ctx, s.cfg.RequestTimeout)
	err := s.claim(ctx, user, session)
	cancel()
	var pe *protocol.Error
	switch {
	case err == nil:
		return true
	case errors.Is(err, chat.ErrForbidden):
		s.m.authFailures.WithLabelValues("forbidden").Inc()
		cp.reject(ws, "Authentication failed")
	case errors.As(err, &pe):
		// --limit-new-conversations: the page retries every 2 s.
		cp.rejectWith(ws, websocket.StatusTryAgainLater, "Too many new sessions; try again later")
	default:
		s.log.Error("compat claim session", "err", err)
		_ = ws.Close(websocket.StatusInternalError, "internal error")
	}
	return false
}

// handleWS serves GET /ws/chat: query session_id (default "default"),
// user_id (default "default_user") and token (COMPAT.md). Any origin is
// accepted: the original page is served from elsewhere, and the token is
// the check.
func (cp *compat) handleWS() http.Handler {
	s := cp.s
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		session, user, token := q.Get("session_id"), q.Get("user_id"), q.Get("token")
		if session == "" {
			session = compatDefaultSession
		}
		if user == "" {
			user = compatDefaultUser
		}
		if token == "" {
			token = r.Header.Get("Authorization") // "Bearer …" is accepted
		}
		if len(s.cfg.CompatOrigins) > 0 && !auth.OriginAllowed(r, s.cfg.CompatOrigins) {
			s.m.authFailures.WithLabelValues("origin").Inc()
			http.Error(w, "origin not allowed", http.StatusForbidden)
			return
		}
		ws, raw, err := acceptWS(w, r, &websocket.AcceptOptions{
			InsecureSkipVerify: true, // COMPAT.md: any origin unless configured (checked above)
			CompressionMode:    websocket.CompressionDisabled,
		})
		if err != nil {
			return
		}
		id, err := s.auth.AuthenticateCompat(user, token)
		if err != nil {
			s.m.authFailures.WithLabelValues("token").Inc()
			cp.reject(ws, "Authentication failed")
			return
		}
		if !chat.ValidID(session) {
			cp.reject(ws, "Invalid session_id: it must match ^[A-Za-z0-9_.:-]{1,128}$")
			return
		}
		oq := newOutQueue(s.cfg.Limits.OutboundBytes)
		oq.onSlow = s.m.slowCloses.Inc
		s.serveSocket(ws, raw, id.UserID, oq, func(ctx context.Context, cancel context.CancelFunc) {
			// The session is claimed once the socket is taken (not refused
			// for --limit-connections, nor by a shutdown): a refused
			// socket creates nothing and spends no new conversation.
			if !cp.claim(ctx, ws, id.UserID, session) {
				return
			}
			c := &compatConn{
				s: s, cp: cp, ws: ws, raw: raw, user: id.UserID, conv: session, q: oq,
				ctx: ctx, cancel: cancel, turns: make(map[string]*compatTurn),
			}
			if !id.Expires.IsZero() {
				// As a native socket: closed when its token expires, with
				// the compat refusal's error frame and code.
				t := time.AfterFunc(time.Until(id.Expires), func() {
					s.m.authFailures.WithLabelValues("expired").Inc()
					c.expired()
				})
				defer t.Stop()
			}
			c.run()
		})
	})
}
