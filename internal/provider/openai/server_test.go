package openai

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/provider"
)

// testKey is the API key of every test provider; no error or log may show it.
const testKey = "sk-test-9f8e7d6c5b4a"

// testNow is the injected clock of every test provider.
var testNow = time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)

// The wire format of OpenAI and vLLM, byte for byte.
const (
	roleChunk   = `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}` + "\n\n"
	finishChunk = `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}` + "\n\n"
	usageChunk  = `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}` + "\n\n"
	doneEvent   = "data: [DONE]\n\n"
)

// contentChunk is a chunk carrying text, as OpenAI sends it.
func contentChunk(text string) string {
	b, _ := json.Marshal(text)
	return `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":` + string(b) + `},"finish_reason":null}]}` + "\n\n"
}

// rawContentChunk is contentChunk with the content's JSON escapes written
// as given, as a server that escapes per token sends them.
func rawContentChunk(escaped string) string {
	return `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"` + escaped + `"},"finish_reason":null}]}` + "\n\n"
}

// fakeServer is an httptest model server. Its handler runs with the request
// body already read (so the server notices at once when the client goes
// away) and kept in r.Body, and with the 1-based number of the request.
type fakeServer struct {
	*httptest.Server
	requests atomic.Int32
}

func newFakeServer(t testing.TB, handle func(n int, w http.ResponseWriter, r *http.Request)) *fakeServer {
	t.Helper()
	s := &fakeServer{}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := int(s.requests.Add(1))
		body, err := io.ReadAll(r.Body)
		if err != nil {
			t.Errorf("read request body: %v", err)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		handle(n, w, r)
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *fakeServer) baseURL() string { return s.URL + "/v1" }

// writeSSE answers 200 with an event stream made of parts, flushing after
// each part so that each reaches the client in its own write.
func writeSSE(t testing.TB, w http.ResponseWriter, parts ...string) {
	t.Helper()
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(http.StatusOK)
	for _, part := range parts {
		if _, err := io.WriteString(w, part); err != nil {
			return // the client went away; the test sees that from its side
		}
		w.(http.Flusher).Flush()
	}
}

// writeError answers status with an OpenAI-style error body.
func writeError(w http.ResponseWriter, status int, message, code string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	b, _ := json.Marshal(map[string]any{"error": map[string]any{"message": message, "type": "invalid_request_error", "code": code}})
	w.Write(b)
}

// resetConn takes the connection over and resets it (RST), as a crashing
// server or a dropped network does.
func resetConn(t testing.TB, w http.ResponseWriter) {
	t.Helper()
	conn, _, err := w.(http.Hijacker).Hijack()
	if err != nil {
		t.Errorf("hijack: %v", err)
		return
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	conn.Close()
}

// fixture is a Provider under test with what it did on the side.
type fixture struct {
	p      *Provider
	sleeps *sleepRecorder
	logs   *syncBuffer
}

// newFixture returns a Provider for baseURL with testKey, model "m", the
// test clock and a Sleep that records and returns at once; edit may change
// the config first.
func newFixture(t testing.TB, baseURL string, edit func(*Config)) fixture {
	t.Helper()
	f := fixture{sleeps: &sleepRecorder{}, logs: &syncBuffer{}}
	cfg := Config{
		BaseURL: baseURL,
		APIKey:  testKey,
		Model:   "m",
		Logger:  slog.New(slog.NewTextHandler(f.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Now:     func() time.Time { return testNow },
		Sleep:   f.sleeps.sleep,
	}
	if edit != nil {
		edit(&cfg)
	}
	p, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	f.p = p
	return f
}

// stream runs f.p.Stream for one user message and returns the pieces emitted.
func (f fixture) stream(t testing.TB, msgs ...string) ([]string, provider.Result, error) {
	t.Helper()
	return f.streamCtx(t.Context(), msgs...)
}

// streamCtx is stream under ctx.
func (f fixture) streamCtx(ctx context.Context, msgs ...string) ([]string, provider.Result, error) {
	req := provider.Request{TurnID: "t1"}
	for _, m := range msgs {
		req.Messages = append(req.Messages, provider.Message{Role: "user", Content: m})
	}
	if len(msgs) == 0 {
		req.Messages = []provider.Message{{Role: "user", Content: "hello"}}
	}
	var got []string
	res, err := f.p.Stream(ctx, req, func(text string) error {
		got = append(got, text)
		return nil
	})
	return got, res, err
}

type sleepRecorder struct {
	mu sync.Mutex
	d  []time.Duration // guarded by mu
}

func (s *sleepRecorder) sleep(ctx context.Context, d time.Duration) error {
	s.mu.Lock()
	s.d = append(s.d, d)
	s.mu.Unlock()
	return ctx.Err()
}

func (s *sleepRecorder) got() []time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]time.Duration(nil), s.d...)
}

// syncBuffer is a bytes.Buffer safe for a logger and a test to share.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer // guarded by mu
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// mustNotLeak fails when s shows the API key.
func mustNotLeak(t testing.TB, what, s string) {
	t.Helper()
	if strings.Contains(s, testKey) || strings.Contains(s, testKey[3:]) {
		t.Errorf("%s shows the API key: %s", what, s)
	}
}
