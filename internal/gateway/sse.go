package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/jsonstr"
	"github.com/tokenrelay/tokenrelay/internal/protocol"
)

// ParseLastEventID parses an SSE resume point: a delta seq, a non-negative
// decimal integer. Empty means 0 (from the start).
func ParseLastEventID(s string) (int64, bool) {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, true
	}
	if len(s) > 19 { // the digits of the largest int64
		return 0, false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, false // ParseInt would also take "-0" and "+5"
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, false
	}
	return n, true
}

// sseSink queues one turn's events for an SSE response; the handler's
// goroutine writes them.
type sseSink struct {
	turn  string
	limit int

	mu       sync.Mutex
	items    []sseItem // guarded by mu
	bytes    int       // guarded by mu
	overflow bool      // guarded by mu
	notify   chan struct{}
}

type sseItem struct {
	seq    int64
	text   string
	end    bool
	status chat.TurnStatus
	errMsg string
	failed bool
}

func (k *sseSink) add(it sseItem) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.overflow {
		return
	}
	if it.text != "" && !it.end && len(k.items) > 0 {
		last := &k.items[len(k.items)-1]
		if !last.end && !last.failed && last.seq > 0 {
			last.text += it.text
			last.seq = it.seq
			k.bytes += len(it.text)
			k.check()
			return
		}
	}
	k.items = append(k.items, it)
	k.bytes += len(it.text) + 32
	k.check()
	select {
	case k.notify <- struct{}{}:
	default:
	}
}

func (k *sseSink) check() {
	if k.limit > 0 && k.bytes > k.limit {
		k.overflow = true
		k.items = nil
		select {
		case k.notify <- struct{}{}:
		default:
		}
	}
}

func (k *sseSink) message(string, chat.Message)         {}
func (k *sseSink) start(string, string, string, string) {}
func (k *sseSink) delta(_, turn string, _, seq int64, _ int64, text string, _ int64) {
	if turn == k.turn {
		k.add(sseItem{seq: seq, text: text})
	}
}
func (k *sseSink) end(_, turn string, seq int64, status chat.TurnStatus, errMsg string, _ *chat.Usage) {
	if turn == k.turn {
		k.add(sseItem{seq: seq, end: true, status: status, errMsg: errMsg})
	}
}
func (k *sseSink) fail(error)    { k.add(sseItem{failed: true}) }
func (k *sseSink) revoked(*view) {} // its views follow every turn
func (k *sseSink) gone(*view)    {} // a turn's stream runs to its end

// dropped closes the stream of a turn deleted before its end was stored:
// no end will come, and the client's resume (EventSource's own, with
// Last-Event-ID) is answered 404.
func (k *sseSink) dropped(_ *view, turn string) {
	if turn == k.turn {
		k.add(sseItem{failed: true})
	}
}

// sseWriter writes a stream's events, each write bounded by the server's
// write timeout: a client that stops reading is dropped as a WebSocket
// one is, instead of holding its goroutine and its text for good.
type sseWriter struct {
	w       http.ResponseWriter
	rc      *http.ResponseController
	ctx     context.Context
	timeout time.Duration
	buf     []byte
	err     error
	slow    bool // dropped for lagging past --limit-outbound-bytes
}

// delta writes the text of the deltas up to seq as one event.
func (sw *sseWriter) delta(seq int64, text []byte) {
	sw.buf = append(sw.buf[:0], "event: delta\nid: "...)
	sw.buf = strconv.AppendInt(sw.buf, seq, 10)
	sw.buf = append(sw.buf, "\ndata: {\"text\":"...)
	sw.buf = jsonstr.Append(sw.buf, text)
	sw.buf = append(sw.buf, "}\n\n"...)
	sw.write(sw.buf)
	if cap(sw.buf) > 64<<10 {
		sw.buf = nil // a replay's text: do not keep it for the live deltas
	}
}

// end writes the end event and flushes.
func (sw *sseWriter) end(seq int64, status chat.TurnStatus, errMsg string) {
	body := map[string]any{"status": status, "seq": seq}
	if errMsg != "" {
		body["error"] = errMsg
	}
	data, _ := json.Marshal(body)
	sw.write([]byte("event: end\ndata: " + string(data) + "\n\n"))
	sw.flush()
}

// write writes b in pieces of at most writeChunk, each bounded by the
// write timeout, as a socket's writes are (see rawSocket.writeAll): a
// catch-up of a long answer reaches a client that reads it steadily over
// a slow link, however long it takes as a whole.
func (sw *sseWriter) write(b []byte) {
	for sw.err == nil {
		if sw.err = sw.deadline(); sw.err != nil {
			return
		}
		if sw.err = sw.ctx.Err(); sw.err != nil {
			return // shut down: its deadline may have been set before ours
		}
		n := min(len(b), writeChunk)
		_, sw.err = sw.w.Write(b[:n])
		if b = b[n:]; len(b) == 0 {
			return
		}
	}
}

func (sw *sseWriter) flush() {
	if sw.err != nil {
		return
	}
	if sw.err = sw.deadline(); sw.err == nil {
		if err := sw.rc.Flush(); !errors.Is(err, http.ErrNotSupported) {
			sw.err = err
		}
	}
}

// deadline bounds the next write; a writer without deadlines (a wrapper
// that hides its connection) writes without one.
func (sw *sseWriter) deadline() error {
	if err := sw.rc.SetWriteDeadline(time.Now().Add(sw.timeout)); !errors.Is(err, http.ErrNotSupported) {
		return err
	}
	return nil
}

// countSSEClose counts a stream that ended for its client, as a socket's
// close is counted: dropped as a slow consumer (its writes blocked for the
// write timeout, or it lagged past its limit), or for a failed write. A
// stream that a shutdown ended (its writes cut by a deadline of now) is
// neither, nor is one whose token expired (its writes cut the same way),
// nor one whose client left before a write failed.
func (s *Server) countSSEClose(sw *sseWriter, expired bool) {
	var ne net.Error
	switch {
	case s.shutdownCtx.Err() != nil, expired:
	case sw.slow, errors.As(sw.err, &ne) && ne.Timeout():
		s.m.slowCloses.Inc()
	case sw.err != nil && !errors.Is(sw.err, context.Canceled):
		s.m.writeErrors.Inc()
	}
}

// sseHeaders sets the headers of an SSE stream.
func sseHeaders(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.Header().Set("X-Accel-Buffering", "no")
}

// handleSSE streams one turn as Server-Sent Events: a finished turn is
// replayed and ended; a running one continues live. Last-Event-ID or
// ?after= (the later, when both are given) resumes after that seq.
func (s *Server) handleSSE() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// It has no body to wait for; a read deadline passing while it
		// streams would end its request's context.
		unbound(w, false)
		turnID, err := s.pathID(r, "turn")
		if err != nil {
			s.writeError(w, err)
			return
		}
		// A stream is a connection: it counts against the user's
		// --limit-connections as a WebSocket does.
		user := userOf(r)
		if !s.limits.openConn(user) {
			s.m.limitHits.WithLabelValues("connections").Inc()
			s.writeError(w, &protocol.Error{Code: protocol.CodeRateLimited, RetryAfterMS: time.Second.Milliseconds(),
				Message: "too many connections (limit " + itoa(s.cfg.Limits.Connections) + "); close one first"})
			return
		}
		defer s.limits.closeConn(user)
		// An EventSource opened on ".../events?after=N" reconnects to the
		// same URL with Last-Event-ID set to the last delta it received,
		// which is past N: the later of the two is where the client is.
		after, ok := ParseLastEventID(r.Header.Get("Last-Event-ID"))
		q, qok := ParseLastEventID(r.URL.Query().Get("after"))
		if !ok || !qok {
			s.writeError(w, badRequest("Last-Event-ID / after must be a delta seq"))
			return
		}
		after = min(max(after, q), protocol.MaxSeq)
		// The turn's head: its text is read from the store only when the
		// bus no longer has it (a long answer need not be held twice).
		ctx, cancel := s.reqCtx(r)
		t, err := s.store.TurnHead(ctx, turnID)
		cancel()
		if err != nil {
			s.writeError(w, named(err, "turn "+quote(turnID)))
			return
		}
		if t.Owner != user {
			s.writeError(w, chat.ErrForbidden)
			return
		}
		if r.Method == http.MethodHead {
			// The headers of the stream, and no stream: its body would be
			// dropped, and writing it would hold the connection (and a
			// stream of the user's) until the turn ends.
			sseHeaders(w)
			w.WriteHeader(http.StatusOK)
			return
		}
		sink := &sseSink{turn: turnID, limit: s.cfg.Limits.OutboundBytes, notify: make(chan struct{}, 1)}
		rctx, rcancel := contextWithCancel(r, s)
		defer rcancel()
		var expired atomic.Bool
		if exp := expiresOf(r); !exp.IsZero() {
			// Like a socket (see handleWS), the stream does not outlive
			// its token: it ends, and an EventSource reconnecting with the
			// same token is refused.
			t := time.AfterFunc(time.Until(exp), func() {
				s.m.authFailures.WithLabelValues("expired").Inc()
				expired.Store(true)
				rcancel()
			})
			defer t.Stop()
		}
		var wg sync.WaitGroup
		defer func() {
			rcancel() // the view's repairs stop retrying first
			wg.Wait()
		}()
		// The stream follows one turn, whose owner was checked above.
		v := newView(s, rctx, &wg, t.ConversationID, "", sink)
		if !t.Status.Terminal() {
			if err := s.hub.add(rctx, t.ConversationID, v); err != nil {
				v.close()
				s.writeError(w, err)
				return
			}
			defer func() {
				s.hub.remove(t.ConversationID, v)
				v.close()
			}()
			// Re-read: the turn may have ended before the subscription.
			ctx, cancel := s.reqCtx(r)
			t2, err := s.store.TurnHead(ctx, turnID)
			cancel()
			if err == nil {
				t = t2
			}
		}
		ctx, cancel = s.reqCtx(r)
		cu, err := s.catchUp(ctx, t.ConversationID, turnID, after, -1)
		cancel()
		if err != nil {
			s.writeError(w, err)
			return
		}
		if t.Status.Terminal() && after < t.Seq && cu.To < t.Seq {
			// A finished turn whose events are gone (past --retention):
			// the store holds its whole text, but not where its deltas
			// began, so only a replay from the start can be served.
			if after > 0 {
				s.writeError(w, &protocol.Error{Code: protocol.CodeNotFound, Message: "the deltas of turn " + quote(turnID) + " are no longer kept (--retention); replay it from the start, or read its message"})
				return
			}
			ctx, cancel := s.reqCtx(r)
			full, err := s.store.Turn(ctx, turnID)
			cancel()
			if err != nil {
				s.writeError(w, err)
				return
			}
			cu = catchUpResult{From: 1, To: full.Seq, Text: []byte(full.Content)}
		}
		sseHeaders(w)
		w.WriteHeader(http.StatusOK)
		s.m.sseStreams.Inc()
		defer s.m.sseStreams.Dec()
		sw := &sseWriter{w: w, rc: http.NewResponseController(w), ctx: rctx, timeout: s.cfg.WriteTimeout}
		defer func() { s.countSSEClose(sw, expired.Load()) }()
		// On shutdown a write blocked on a client that does not read ends
		// at once; the deadline is cleared for the connection's next
		// request.
		stopUnblock := context.AfterFunc(rctx, func() { _ = sw.rc.SetWriteDeadline(time.Now()) })
		defer func() {
			if stopUnblock() {
				_ = sw.rc.SetWriteDeadline(time.Time{})
			}
		}()
		seq := after
		if cu.To >= cu.From {
			sw.delta(cu.To, cu.Text)
			seq = cu.To
		}
		cu.Text = nil
		switch {
		case cu.End != nil:
			sw.end(max(seq, cu.End.Seq), cu.End.Status, cu.End.Error)
			return
		case t.Status.Terminal():
			sw.end(max(seq, t.Seq), t.Status, t.Error)
			return
		}
		sw.flush()
		if sw.err != nil {
			return
		}
		v.ready(map[string]*turnState{turnID: {started: true, seq: seq, len: cu.ToLen}})
		// A comment every PingInterval, which EventSource ignores, keeps a
		// stream that waits (a queued turn, a model slow to its first
		// token) from being cut as idle by a proxy, as a socket's pings do.
		var ping <-chan time.Time
		if s.cfg.PingInterval > 0 {
			tk := time.NewTicker(s.cfg.PingInterval)
			defer tk.Stop()
			ping = tk.C
		}
		for {
			select {
			case <-rctx.Done():
				return
			case <-ping:
				sw.write([]byte(": ping\n\n"))
				sw.flush()
				if sw.err != nil {
					return
				}
				continue
			case <-sink.notify:
			}
			sink.mu.Lock()
			items, overflow := sink.items, sink.overflow
			sink.items, sink.bytes = nil, 0
			sink.mu.Unlock()
			if overflow {
				sw.slow = true
				return // the client resumes with Last-Event-ID
			}
			for _, it := range items {
				switch {
				case it.failed:
					return
				case it.end:
					sw.end(it.seq, it.status, it.errMsg)
					return
				default:
					sw.delta(it.seq, []byte(it.text))
				}
			}
			sw.flush()
			if sw.err != nil {
				return // the client stopped reading: it resumes with Last-Event-ID
			}
		}
	})
}
