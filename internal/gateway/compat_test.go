package gateway

import (
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/auth"
	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/protocol"
)

var compatTestNow = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func TestCompatFinal(t *testing.T) {
	tests := []struct {
		name   string
		text   string
		status chat.TurnStatus
		want   string
	}{
		{"complete", "hello", chat.StatusComplete, "hello"},
		{"complete empty", "", chat.StatusComplete, ""},
		{"cancelled", "hel", chat.StatusCancelled, "hel\n\n[Đã hủy]"},
		{"cancelled before any text", "", chat.StatusCancelled, "\n\n[Đã hủy]"},
		{"error hides partial text", "half", chat.StatusError, "Xin lỗi, đã có lỗi xảy ra khi xử lý yêu cầu của bạn."},
		{"interrupted keeps its text", "half", chat.StatusInterrupted, "half"},
		{"interrupted with nothing", "", chat.StatusInterrupted, "Xin lỗi, đã có lỗi xảy ra khi xử lý yêu cầu của bạn."},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := string(compatFinal(nil, []byte(tt.text), tt.status)); got != tt.want {
				t.Errorf("compatFinal(%q, %s) = %q, want %q", tt.text, tt.status, got, tt.want)
			}
		})
	}
}

func TestChatMessageJSON(t *testing.T) {
	tests := []struct {
		name string
		m    chatMessage
		want string
	}{
		{
			"streaming",
			chatMessage{MessageID: "t1", SessionID: "s", UserID: "u@x", Role: chat.RoleAssistant, Content: []byte("a \"b\"\n"), Chunk: []byte("\n"), Timestamp: 1700000000123},
			`{"message_id":"t1","session_id":"s","user_id":"u@x","role":"assistant","content":"a \"b\"\n","chunk":"\n","timestamp":1700000000123,"is_complete":false}`,
		},
		{
			"empty fields are null",
			chatMessage{MessageID: "t1", SessionID: "s", Role: chat.RoleAssistant, Timestamp: 1, Complete: true},
			`{"message_id":"t1","session_id":"s","user_id":null,"role":"assistant","content":null,"chunk":null,"timestamp":1,"is_complete":true}`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := json.Marshal(tt.m)
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tt.want {
				t.Errorf("got  %s\nwant %s", got, tt.want)
			}
			frame := appendMessageFrame(nil, &tt.m)
			var f struct {
				Type string         `json:"type"`
				Data map[string]any `json:"data"`
			}
			if err := json.Unmarshal(frame, &f); err != nil || f.Type != "message" || len(f.Data) != 8 {
				t.Errorf("frame %s: %v", frame, err)
			}
		})
	}
}

func TestCompatStored(t *testing.T) {
	at := protocol.FormatTime(compatTestNow)
	tests := []struct {
		name    string
		m       protocol.Message
		keep    bool
		content string
	}{
		{"user", protocol.Message{MessageID: "m1", Role: chat.RoleUser, Content: "hi", Status: chat.StatusComplete, CreatedAt: at}, true, "hi"},
		{"complete reply", protocol.Message{MessageID: "t1", Role: chat.RoleAssistant, Content: "yo", Status: chat.StatusComplete, CreatedAt: at}, true, "yo"},
		{"cancelled reply", protocol.Message{MessageID: "t1", Role: chat.RoleAssistant, Content: "y", Status: chat.StatusCancelled, CreatedAt: at}, true, "y\n\n[Đã hủy]"},
		{"failed reply", protocol.Message{MessageID: "t1", Role: chat.RoleAssistant, Content: "y", Status: chat.StatusError, CreatedAt: at}, true, compatErrorContent},
		{"reply in flight", protocol.Message{MessageID: "t1", Role: chat.RoleAssistant, Content: "y", Status: chat.StatusStreaming, CreatedAt: at}, false, ""},
		{"queued reply", protocol.Message{MessageID: "t1", Role: chat.RoleAssistant, Status: chat.StatusQueued, CreatedAt: at}, false, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := compatStored(tt.m, "alice")
			if ok != tt.keep {
				t.Fatalf("kept = %v, want %v", ok, tt.keep)
			}
			if !ok {
				return
			}
			if string(got.Content) != tt.content || !got.Complete || got.UserID != "alice" || got.Timestamp != compatTestNow.UnixMilli() || got.Chunk != nil {
				t.Errorf("got %+v, want content %q", got, tt.content)
			}
		})
	}
}

func TestSharedTextEncodesOnce(t *testing.T) {
	cp := &compat{texts: make(map[string]*sharedText)}
	a := cp.acquire("t1", "s", "u")
	b := cp.acquire("t1", "s", "u")
	if a != b || cp.sharedTexts() != 1 {
		t.Fatalf("two sockets of one turn got different texts")
	}
	// Socket a, then socket b, get delta 1: one append, one encoding.
	fa, n, err := a.delta(0, "Hel", 1)
	if err != nil || n != 3 {
		t.Fatal(n, err)
	}
	fb, _, _ := b.delta(0, "Hel", 2)
	if &fa[0] != &fb[0] {
		t.Errorf("the same frame was encoded twice")
	}
	f2, n, _ := a.delta(3, "lo", 3)
	if n != 5 || string(a.buf) != "Hello" {
		t.Fatalf("text = %q (n %d)", a.buf, n)
	}
	var msg struct{ Data map[string]any }
	if err := json.Unmarshal(f2, &msg); err != nil || msg.Data["content"] != "Hello" || msg.Data["chunk"] != "lo" {
		t.Errorf("frame %s", f2)
	}
	// A merged delta (a repair) covering text already kept.
	if _, n, err := b.delta(0, "Hello", 4); err != nil || n != 5 || string(b.buf) != "Hello" {
		t.Errorf("overlapping delta: n %d err %v text %q", n, err, b.buf)
	}
	var gap *textGapError
	if _, _, err := a.delta(9, "x", 5); !errors.As(err, &gap) {
		t.Errorf("delta past the text: err %v, want a gap", err)
	}
	a.seed("Hel")
	a.seed("Hello, world")
	if string(a.buf) != "Hello, world" {
		t.Errorf("after seeds: %q", a.buf)
	}
	f1 := a.finalFrame(5, chat.StatusCancelled, 6)
	if f1b := b.finalFrame(5, chat.StatusCancelled, 7); &f1[0] != &f1b[0] {
		t.Errorf("the final frame was encoded twice")
	}
	if err := json.Unmarshal(f1, &msg); err != nil || msg.Data["content"] != "Hello\n\n[Đã hủy]" || msg.Data["is_complete"] != true || msg.Data["chunk"] != nil {
		t.Errorf("final frame %s", f1)
	}
	cp.release(a)
	if cp.sharedTexts() != 1 {
		t.Errorf("text dropped while a socket still holds it")
	}
	cp.release(b)
	if cp.sharedTexts() != 0 {
		t.Errorf("text kept after its last socket let go")
	}
}

func newTestCompatConn(t *testing.T) *compatConn {
	t.Helper()
	s := &Server{cfg: Config{Now: func() time.Time { return compatTestNow }}, m: newMetrics(nil), log: slog.New(slog.DiscardHandler)}
	cp := &compat{s: s, texts: make(map[string]*sharedText)}
	return &compatConn{s: s, cp: cp, user: "u", conv: "s", q: newOutQueue(1 << 20), turns: make(map[string]*compatTurn)}
}

// written returns what the writer would write now, resolving markers.
func written(c *compatConn) []string {
	frames, _, _, _ := c.q.take(nil, nil)
	var out []string
	for _, f := range frames {
		if f = c.resolve(f); f != nil {
			out = append(out, string(f))
		}
	}
	return out
}

func content(t *testing.T, frame string) (string, bool) {
	t.Helper()
	s, _, done := contentAndChunk(t, frame)
	return s, done
}

func contentAndChunk(t *testing.T, frame string) (content, chunk string, complete bool) {
	t.Helper()
	var msg struct {
		Type string
		Data struct {
			Content    *string
			Chunk      *string
			IsComplete bool `json:"is_complete"`
		}
	}
	if err := json.Unmarshal([]byte(frame), &msg); err != nil || msg.Type != "message" {
		t.Fatalf("not a message frame: %s", frame)
	}
	if msg.Data.Content != nil {
		content = *msg.Data.Content
	}
	if msg.Data.Chunk != nil {
		chunk = *msg.Data.Chunk
	}
	return content, chunk, msg.Data.IsComplete
}

func TestCompatConnWritesNewestText(t *testing.T) {
	c := newTestCompatConn(t)
	// A socket that falls behind: many deltas, one queued marker.
	text := ""
	for i := range 1000 {
		piece := string(rune('a'+i%26)) + " "
		c.delta("s", "t1", int64(i+1), int64(i+1), int64(len(text)), piece, 0)
		text += piece
	}
	c.q.mu.Lock()
	queued := c.q.bytes
	c.q.mu.Unlock()
	if queued != 1 {
		t.Errorf("queue holds %d bytes for a turn's streaming frames, want one marker", queued)
	}
	got := written(c)
	if len(got) != 1 {
		t.Fatalf("wrote %d frames, want the newest only", len(got))
	}
	// The frames it skipped were never written: the chunk carries all the
	// client lacks, as the first frame after a reload must.
	if s, ch, done := contentAndChunk(t, got[0]); s != text || ch != text || done {
		t.Errorf("wrote content %q chunk %q complete=%v", s, ch, done)
	}

	// A delta, a pong, another delta: the marker stays in the first place
	// and writes the newest text; then the end supersedes what is staged.
	c.delta("s", "t1", 1001, 1001, int64(len(text)), "x", 0)
	c.push(compatPong)
	c.delta("s", "t1", 1002, 1002, int64(len(text))+1, "y", 0)
	got = written(c)
	if len(got) != 2 || got[1] != string(compatPong) {
		t.Fatalf("wrote %q", got)
	}
	if s, ch, _ := contentAndChunk(t, got[0]); s != text+"xy" || ch != "xy" {
		t.Errorf("wrote %q, chunk %q", s, ch)
	}
	c.delta("s", "t1", 1003, 1003, int64(len(text))+2, "z", 0)
	c.end("s", "t1", 1003, chat.StatusCancelled, "", nil)
	got = written(c)
	if len(got) != 1 {
		t.Fatalf("after the end wrote %d frames, want the final one only", len(got))
	}
	if s, done := content(t, got[0]); s != text+"xyz\n\n[Đã hủy]" || !done {
		t.Errorf("final content %q complete=%v", s, done)
	}
	if c.cp.sharedTexts() != 0 || len(c.turns) != 0 {
		t.Errorf("the ended turn is still kept")
	}
}

// A turn the view drops (deleted before its end was stored) ends on the
// socket as a cancelled one, and the socket keeps nothing of it; a turn the
// socket was given nothing of is dropped without a frame.
func TestCompatConnDroppedTurn(t *testing.T) {
	c := newTestCompatConn(t)
	c.delta("s", "t1", 1, 1, 0, "Hel", 0)
	c.delta("s", "t1", 2, 2, 3, "lo", 0)
	c.dropped(nil, "t1")
	c.dropped(nil, "t2")
	got := written(c)
	if len(got) != 1 {
		t.Fatalf("wrote %q, want the final frame only", got)
	}
	if s, done := content(t, got[0]); s != "Hello\n\n[Đã hủy]" || !done {
		t.Errorf("final content %q complete=%v", s, done)
	}
	if c.cp.sharedTexts() != 0 || len(c.turns) != 0 {
		t.Errorf("the dropped turn is still kept")
	}
}

func TestChunkIndex(t *testing.T) {
	tests := []struct {
		raw  string
		want int64
	}{
		{"", 0}, {"null", 0}, {"7", 7}, {"7.0", 7}, {`"12"`, 12}, {"-3", 0}, {"1e300", 0}, {"{}", 0},
	}
	for _, tt := range tests {
		if got := chunkIndex(json.RawMessage(tt.raw)); got != tt.want {
			t.Errorf("chunkIndex(%s) = %d, want %d", tt.raw, got, tt.want)
		}
	}
}

func TestWriteCompatError(t *testing.T) {
	s := &Server{log: slog.New(slog.DiscardHandler)}
	cp := &compat{s: s}
	tests := []struct {
		name   string
		err    error
		status int
		errStr string
	}{
		{"turn active", &chat.TurnActiveError{TurnID: "t"}, 409, "Conflict"},
		{"forbidden", chat.ErrForbidden, 403, "Forbidden"},
		{"unavailable", protocol.Errorf(protocol.CodeUnavailable, "broker down"), 502, "Communication error with AI service"},
		{"bad request", compatBadRequest("Message cannot be empty"), 400, "Bad request"},
		{"too large", protocol.Errorf(protocol.CodeTooLarge, "too long"), 413, "Payload too large"},
		{"rate limited", &protocol.Error{Code: protocol.CodeRateLimited, Message: "slow down", RetryAfterMS: 1500}, 429, "Too many requests"},
		{"internal", errors.New("disk on fire"), 500, "Internal server error"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := httptest.NewRecorder()
			cp.writeCompatError(w, tt.err)
			var body map[string]string
			if err := json.Unmarshal(w.Body.Bytes(), &body); err != nil {
				t.Fatal(err)
			}
			if w.Code != tt.status || body["error"] != tt.errStr || body["detail"] == "" {
				t.Errorf("got %d %v, want %d %q", w.Code, body, tt.status, tt.errStr)
			}
			if strings.Contains(body["detail"], "disk") {
				t.Errorf("internal cause shown: %v", body)
			}
		})
	}
}

func TestCompatCaller(t *testing.T) {
	a, err := auth.New(auth.Config{Dev: true})
	if err != nil {
		t.Fatal(err)
	}
	cp := &compat{s: &Server{auth: a}}
	tests := []struct {
		name     string
		target   string
		header   string
		userID   string
		wantUser string
		wantCode int // 0: no error
	}{
		{"nobody named: the session's owner", "/api/history/s", "", "", "", 0},
		{"dev token", "/api/history/s?token=dev-token", "", "", "", 0},
		{"user in body", "/api/chat", "", "demo_user", "demo_user", 0},
		{"user in query", "/api/history/s?user_id=bob", "", "", "bob", 0},
		{"bad token", "/api/history/s", "Bearer nope", "", "", 401},
		{"bad token with user", "/api/chat", "Bearer nope", "bob", "", 401},
		{"bad user id", "/api/chat", "", "no spaces", "", 401},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodGet, tt.target, nil)
			if tt.header != "" {
				r.Header.Set("Authorization", tt.header)
			}
			c, err := cp.identify(r, tt.userID)
			var ce *compatError
			switch {
			case tt.wantCode == 0 && err != nil:
				t.Fatalf("err %v", err)
			case tt.wantCode != 0 && (!errors.As(err, &ce) || ce.status != tt.wantCode):
				t.Fatalf("err %v, want status %d", err, tt.wantCode)
			case c.user != tt.wantUser:
				t.Errorf("user %q, want %q", c.user, tt.wantUser)
			}
		})
	}
}

func TestCompatCORSPreflight(t *testing.T) {
	mux := http.NewServeMux()
	cp := &compat{s: &Server{}}
	cp.handle(mux, "POST", "/api/chat", http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(200) }))
	cp.preflight(mux, "/api/chat")
	for _, m := range []string{http.MethodOptions, http.MethodPost} {
		w := httptest.NewRecorder()
		r := httptest.NewRequest(m, "/api/chat", nil)
		r.Header.Set("Origin", "http://localhost:5173")
		mux.ServeHTTP(w, r)
		if w.Header().Get("Access-Control-Allow-Origin") != "*" {
			t.Errorf("%s: no CORS header: %v", m, w.Header())
		}
		if m == http.MethodOptions && (w.Code != 204 || w.Header().Get("Access-Control-Allow-Methods") == "") {
			t.Errorf("preflight = %d %v", w.Code, w.Header())
		}
	}
}

func TestCompatHistoryFrameBudget(t *testing.T) {
	msgs := make([]chatMessage, 10)
	for i := range msgs {
		msgs[i] = chatMessage{MessageID: "m" + string(rune('0'+i)), SessionID: "s", Role: chat.RoleUser, Content: []byte(strings.Repeat("x", 100)), Timestamp: 1, Complete: true}
	}
	decode := func(frame []byte) []string {
		t.Helper()
		var f struct {
			Type     string
			Messages []struct {
				ID string `json:"message_id"`
			}
		}
		if err := json.Unmarshal(frame, &f); err != nil || f.Type != "history" {
			t.Fatalf("frame %s: %v", frame, err)
		}
		var ids []string
		for _, m := range f.Messages {
			ids = append(ids, m.ID)
		}
		return ids
	}
	if got := decode(compatHistoryFrame(msgs, 0)); len(got) != 10 || got[0] != "m0" {
		t.Errorf("unlimited: %v", got)
	}
	one := len(msgs[0].appendJSON(nil)) + 1
	got := decode(compatHistoryFrame(msgs, 3*one+1))
	if strings.Join(got, ",") != "m7,m8,m9" {
		t.Errorf("budget of three: %v, want the newest three", got)
	}
	if got := decode(compatHistoryFrame(msgs, 1)); strings.Join(got, ",") != "m9" {
		t.Errorf("tiny budget: %v, want the newest message anyway", got)
	}
}
