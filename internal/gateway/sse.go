package gateway

import (
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"sync"

	"github.com/tokenrelay/tokenrelay/internal/chat"
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
func (k *sseSink) fail(error) { k.add(sseItem{failed: true}) }

func writeSSEDelta(w http.ResponseWriter, seq int64, text string) {
	data, _ := json.Marshal(map[string]string{"text": text})
	w.Write([]byte("event: delta\nid: " + strconv.FormatInt(seq, 10) + "\ndata: "))
	w.Write(data)
	w.Write([]byte("\n\n"))
}

func writeSSEEnd(w http.ResponseWriter, seq int64, status chat.TurnStatus, errMsg string) {
	body := map[string]any{"status": status, "seq": seq}
	if errMsg != "" {
		body["error"] = errMsg
	}
	data, _ := json.Marshal(body)
	w.Write([]byte("event: end\ndata: "))
	w.Write(data)
	w.Write([]byte("\n\n"))
}

// handleSSE streams one turn as Server-Sent Events: a finished turn is
// replayed and ended; a running one continues live. Last-Event-ID (or
// ?after=) resumes after that seq.
func (s *Server) handleSSE() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		turnID, err := s.pathID(r, "turn")
		if err != nil {
			writeError(w, err)
			return
		}
		afterStr := r.Header.Get("Last-Event-ID")
		if q := r.URL.Query().Get("after"); q != "" {
			afterStr = q
		}
		after, ok := ParseLastEventID(afterStr)
		if !ok {
			writeError(w, badRequest("Last-Event-ID / after must be a delta seq"))
			return
		}
		ctx, cancel := s.reqCtx(r)
		t, err := s.store.Turn(ctx, turnID)
		cancel()
		if err != nil {
			writeError(w, err)
			return
		}
		if t.Owner != userOf(r) {
			writeError(w, chat.ErrForbidden)
			return
		}
		flusher, _ := w.(http.Flusher)
		flush := func() {
			if flusher != nil {
				flusher.Flush()
			}
		}
		sink := &sseSink{turn: turnID, limit: s.cfg.Limits.OutboundBytes, notify: make(chan struct{}, 1)}
		rctx, rcancel := contextWithCancel(r, s)
		defer rcancel()
		var wg sync.WaitGroup
		defer wg.Wait()
		v := newView(s, rctx, &wg, t.ConversationID, sink)
		if !t.Status.Terminal() {
			if err := s.hub.add(t.ConversationID, v); err != nil {
				writeError(w, err)
				return
			}
			defer func() {
				s.hub.remove(t.ConversationID, v)
				v.close()
			}()
			// Re-read: the turn may have ended before the subscription.
			ctx, cancel := s.reqCtx(r)
			t2, err := s.store.Turn(ctx, turnID)
			cancel()
			if err == nil {
				t = t2
			}
		}
		ctx, cancel = s.reqCtx(r)
		cu, err := s.catchUp(ctx, t.ConversationID, turnID, after, -1)
		cancel()
		if err != nil {
			writeError(w, err)
			return
		}
		if t.Status.Terminal() && after < t.Seq && cu.To < t.Seq {
			// A finished turn whose events are gone (past --retention):
			// the store holds its whole text, but not where its deltas
			// began, so only a replay from the start can be served.
			if after > 0 {
				writeError(w, &protocol.Error{Code: protocol.CodeNotFound, Message: "the deltas of turn " + quote(turnID) + " are no longer kept (--retention); replay it from the start, or read its message"})
				return
			}
			cu = catchUpResult{From: 1, To: t.Seq, Text: []byte(t.Content)}
		}
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("Cache-Control", "no-cache")
		w.Header().Set("X-Accel-Buffering", "no")
		w.WriteHeader(http.StatusOK)
		s.m.sseStreams.Inc()
		defer s.m.sseStreams.Dec()
		seq := after
		if cu.To >= cu.From {
			writeSSEDelta(w, cu.To, string(cu.Text))
			seq = cu.To
		}
		switch {
		case cu.End != nil:
			writeSSEEnd(w, max(seq, cu.End.Seq), cu.End.Status, cu.End.Error)
			flush()
			return
		case t.Status.Terminal():
			writeSSEEnd(w, max(seq, t.Seq), t.Status, t.Error)
			flush()
			return
		}
		flush()
		v.ready(map[string]*turnState{turnID: {started: true, seq: seq, len: cu.ToLen}})
		for {
			select {
			case <-rctx.Done():
				return
			case <-sink.notify:
			}
			sink.mu.Lock()
			items, overflow := sink.items, sink.overflow
			sink.items, sink.bytes = nil, 0
			sink.mu.Unlock()
			if overflow {
				return // the client resumes with Last-Event-ID
			}
			for _, it := range items {
				switch {
				case it.failed:
					return
				case it.end:
					writeSSEEnd(w, it.seq, it.status, it.errMsg)
					flush()
					return
				default:
					writeSSEDelta(w, it.seq, it.text)
				}
			}
			flush()
		}
	})
}
