package e2e_test

import (
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/store/postgres/pgtest"
	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// fakeModel is an OpenAI-compatible Chat Completions server that streams a
// fixed answer per request in the real wire format, records every request
// and reports when a request's connection closes.
type fakeModel struct {
	mu       sync.Mutex
	requests []chatRequest
	closed   chan time.Time
	answer   func(n int) []string // the pieces of the n-th answer
	delay    time.Duration        // between pieces
	finish   string               // the answers' finish_reason; "" is "stop"
}

type chatRequest struct {
	Model    string `json:"model"`
	Stream   bool   `json:"stream"`
	Messages []struct {
		Role    string `json:"role"`
		Content string `json:"content"`
	} `json:"messages"`
}

func (f *fakeModel) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/v1/models" {
		w.Write([]byte(`{"object":"list","data":[{"id":"m1","object":"model"}]}`))
		return
	}
	if r.URL.Path != "/v1/chat/completions" || r.Header.Get("Authorization") != "Bearer sk-test-secret" {
		http.Error(w, `{"error":{"message":"bad request"}}`, 400)
		return
	}
	var req chatRequest
	json.NewDecoder(r.Body).Decode(&req)
	f.mu.Lock()
	f.requests = append(f.requests, req)
	n := len(f.requests)
	f.mu.Unlock()
	w.Header().Set("Content-Type", "text/event-stream")
	fl := w.(http.Flusher)
	chunk := func(delta, finish string) {
		fin := "null"
		if finish != "" {
			fin = `"` + finish + `"`
		}
		fmt.Fprintf(w, "data: {\"id\":\"chatcmpl-%d\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":%q,\"choices\":[{\"index\":0,\"delta\":%s,\"finish_reason\":%s}]}\n\n", n, req.Model, delta, fin)
		fl.Flush()
	}
	chunk(`{"role":"assistant","content":""}`, "")
	for _, p := range f.answer(n) {
		b, _ := json.Marshal(p)
		chunk(`{"content":`+string(b)+`}`, "")
		select {
		case <-r.Context().Done():
			f.closed <- time.Now()
			return
		case <-time.After(f.delay):
		}
	}
	finish := f.finish
	if finish == "" {
		finish = "stop"
	}
	chunk(`{}`, finish)
	fmt.Fprintf(w, "data: {\"id\":\"chatcmpl-%d\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":%q,\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":%d,\"total_tokens\":%d}}\n\n", n, req.Model, len(f.answer(n)), 11+len(f.answer(n)))
	fmt.Fprint(w, "data: [DONE]\n\n")
	fl.Flush()
}

func TestOpenAIProviderEndToEnd(t *testing.T) {
	fm := &fakeModel{closed: make(chan time.Time, 4), answer: func(n int) []string {
		return []string{"Answer", " number", fmt.Sprintf(" %d", n), "."}
	}}
	srv := httptest.NewServer(fm)
	defer srv.Close()
	p := trtest.Serve(t, "--provider", "openai", "--openai-base-url", srv.URL+"/v1", "--openai-api-key", "sk-test-secret",
		"--model", "m1", "--system-prompt", "Be brief.")
	var ready map[string]any
	if code := trtest.Get(t, p.URL+"/readyz", &ready); code != 200 || ready["checks"].(map[string]any)["provider"] != "ok" {
		t.Fatalf("readyz %d %v", code, ready)
	}
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("oa", nil)
	first := runTurn(t, c, "oa", "What is one?", nil)
	if first.Text.String() != "Answer number 1." || first.Status != "complete" {
		t.Fatalf("first turn %s %q", first.Status, first.Text.String())
	}
	second := runTurn(t, c, "oa", "And two?", nil)
	if second.Text.String() != "Answer number 2." {
		t.Fatalf("second turn %q", second.Text.String())
	}
	fm.mu.Lock()
	req := fm.requests[1]
	fm.mu.Unlock()
	var got []string
	for _, m := range req.Messages {
		got = append(got, m.Role+":"+m.Content)
	}
	want := []string{"system:Be brief.", "user:What is one?", "assistant:Answer number 1.", "user:And two?"}
	if strings.Join(got, "|") != strings.Join(want, "|") || req.Model != "m1" || !req.Stream {
		t.Fatalf("second request carried %v (model %q, stream %v), want %v", got, req.Model, req.Stream, want)
	}
	m := storedTurn(t, p.URL, "oa", second.ID)
	if m.Content != "Answer number 2." {
		t.Fatalf("stored %q", m.Content)
	}
	// Usage reaches turn.end and the store.
	var body struct {
		Messages []struct {
			MessageID string         `json:"message_id"`
			Usage     map[string]int `json:"usage"`
		} `json:"messages"`
	}
	trtest.Get(t, p.URL+"/v1/conversations/oa/messages", &body)
	last := body.Messages[len(body.Messages)-1]
	if last.Usage["prompt_tokens"] != 11 || last.Usage["completion_tokens"] != 4 {
		t.Fatalf("stored usage %v", last.Usage)
	}
	// A model outside the allow-list is refused.
	c.Send(`{"type":"send","conversation_id":"oa","text":"x","model":"gpt-huge","id":"bad"}`)
	if f := ackOf(t, c, "bad"); f.Type() != "error" || f.Str("code") != "bad_request" {
		t.Fatalf("unknown model answered %v", f)
	}
}

// An answer the model server broke off (vLLM's finish_reason "abort",
// OpenRouter's "error") ends the turn with an error and the text so far,
// and the usage the server reported after it reaches turn.end and the
// store: its tokens were spent.
func TestOpenAIBrokenOffAnswerKeepsItsUsage(t *testing.T) {
	for _, reason := range []string{"abort", "error"} {
		t.Run(reason, func(t *testing.T) {
			fm := &fakeModel{closed: make(chan time.Time, 4), finish: reason, answer: func(int) []string { return []string{"Half", " an"} }}
			srv := httptest.NewServer(fm)
			defer srv.Close()
			p := trtest.Serve(t, "--provider", "openai", "--openai-base-url", srv.URL+"/v1", "--openai-api-key", "sk-test-secret", "--model", "m1")
			c := trtest.Dial(t, p.WSURL(), nil)
			c.Join("cut", nil)
			c.Send(map[string]any{"type": "send", "conversation_id": "cut", "text": "Tell me.", "id": "s"})
			fs := c.Until(wait, func(f trtest.Frame) bool { return f.Type() == "turn.end" || f.Type() == "error" })
			end := fs[len(fs)-1]
			if end.Str("status") != "error" || !strings.Contains(end.Str("error"), reason) {
				t.Fatalf("turn ended with %v, want an error naming %q", end, reason)
			}
			want := map[string]int{"prompt_tokens": 11, "completion_tokens": 2}
			got := map[string]int{}
			for k, v := range end.Obj("usage") {
				n, _ := v.(float64)
				got[k] = int(n)
			}
			if !maps.Equal(got, want) {
				t.Errorf("turn.end usage %v, want %v", end["usage"], want)
			}
			var body struct {
				Messages []struct {
					Content string         `json:"content"`
					Status  string         `json:"status"`
					Usage   map[string]int `json:"usage"`
				} `json:"messages"`
			}
			trtest.Get(t, p.URL+"/v1/conversations/cut/messages", &body)
			m := body.Messages[len(body.Messages)-1]
			if m.Status != "error" || m.Content != "Half an" {
				t.Errorf("stored %s %q, want error %q", m.Status, m.Content, "Half an")
			}
			if !maps.Equal(m.Usage, want) {
				t.Errorf("stored usage %v, want %v", m.Usage, want)
			}
		})
	}
}

func TestOpenAICancelClosesUpstream(t *testing.T) {
	fm := &fakeModel{closed: make(chan time.Time, 4), delay: 20 * time.Millisecond, answer: func(int) []string {
		return strings.Split(strings.Repeat("tok ", 1000), " ")
	}}
	srv := httptest.NewServer(fm)
	defer srv.Close()
	p := trtest.Serve(t, "--provider", "openai", "--openai-base-url", srv.URL+"/v1", "--openai-api-key", "sk-test-secret", "--model", "m1")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("oc", nil)
	tr := startTurn(t, c, "oc", "go", 5)
	sent := time.Now()
	c.Send(map[string]any{"type": "cancel", "turn_id": tr.ID, "id": "x"})
	select {
	case at := <-fm.closed:
		t.Logf("the model server saw its request closed %v after the cancel was sent", at.Sub(sent))
		if d := at.Sub(sent); d > 2*time.Second {
			t.Fatalf("upstream closed %v after the cancel", d)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the model server never saw the request closed")
	}
	finish(t, c, tr)
	if tr.Status != "cancelled" {
		t.Fatalf("turn ended %s", tr.Status)
	}
	if strings.Contains(p.Stderr(), "sk-test-secret") {
		t.Fatal("the API key appears in the server's log")
	}
}

// TestOpenAITokenBudgetClosesUpstream: a turn that reaches
// --limit-tokens-per-hour while it streams closes the model's request and
// ends with status error after exactly the budget's pieces, keeping them.
func TestOpenAITokenBudgetClosesUpstream(t *testing.T) {
	fm := &fakeModel{closed: make(chan time.Time, 4), delay: 5 * time.Millisecond, answer: func(int) []string {
		return strings.Split(strings.Repeat("tok ", 1000), " ")
	}}
	srv := httptest.NewServer(fm)
	defer srv.Close()
	p := trtest.Serve(t, "--provider", "openai", "--openai-base-url", srv.URL+"/v1", "--openai-api-key", "sk-test-secret", "--model", "m1",
		"--limit-tokens-per-hour", "20")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("ob", nil)
	tr := startTurn(t, c, "ob", "go", 1)
	select {
	case <-fm.closed:
	case <-time.After(10 * time.Second):
		t.Fatal("the model server never saw the request closed")
	}
	fs := finish(t, c, tr)
	end := fs[len(fs)-1]
	if tr.Status != "error" || tr.Seq != 20 || !strings.Contains(end.Str("error"), "budget") {
		t.Fatalf("turn ended %s after %d deltas, error %q; want error after 20", tr.Status, tr.Seq, end.Str("error"))
	}
	if tr.Text.String() != strings.Repeat("tok", 20) {
		t.Fatalf("text %q", tr.Text.String())
	}
}

// downModelServer returns the base URL of a model server nobody answers
// at (a port that was free a moment ago) and its address.
func downModelServer(t *testing.T) (url, addr string) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr = ln.Addr().String()
	ln.Close()
	return "http://" + addr + "/v1", addr
}

// /readyz answers whoever asks, without a token: a failing check is named,
// and its cause, which gives addresses away, goes to the log instead.
func TestReadyzKeepsCausesInTheLog(t *testing.T) {
	down, addr := downModelServer(t)
	p := trtest.Start(t, "serve", "--addr", "127.0.0.1:0", "--data-dir", t.TempDir(),
		"--provider", "openai", "--openai-base-url", down, "--openai-api-key", "sk-test-secret", "--model", "m1")
	var ready map[string]any
	code := trtest.Get(t, p.URL+"/readyz", &ready)
	checks, _ := ready["checks"].(map[string]any)
	if code != http.StatusServiceUnavailable || ready["failing"] != "provider" || checks["provider"] != "failing" {
		t.Fatalf("readyz %d %v, want 503 naming the provider", code, ready)
	}
	if b, _ := json.Marshal(ready); strings.Contains(string(b), addr) {
		t.Fatalf("readyz gives the model server's address away: %s", b)
	}
	// Stopped, its log has been read to the end.
	if err := p.Stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if !strings.Contains(p.Stderr(), `msg="readiness check failing" check=provider`) {
		t.Fatalf("the cause is not in the log:\n%s", p.Stderr())
	}
}

// While the model server cannot be reached, a send is refused with
// unavailable (HTTP 503) rather than accepted to end in an error at once;
// the compatibility paths answer 502 and ai-health 503 "unreachable", as
// the service they replace did when its AI service was down. Nothing is
// stored.
func TestUnreachableModelServerRefusesSends(t *testing.T) {
	down, _ := downModelServer(t)
	p := trtest.Start(t, "serve", "--addr", "127.0.0.1:0", "--data-dir", t.TempDir(),
		"--provider", "openai", "--openai-base-url", down, "--model", "m1")

	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("c1", nil)
	c.Send(map[string]any{"type": "send", "conversation_id": "c1", "text": "hello", "id": "s"})
	f := c.Until(wait, func(f trtest.Frame) bool { return f.Str("id") == "s" })
	if last := f[len(f)-1]; last.Type() != "error" || last.Str("code") != "unavailable" {
		t.Fatalf("WS send: %v, want an unavailable error", last)
	}
	var httpErr struct {
		Error struct{ Code, Message string } `json:"error"`
	}
	if code := trtest.Do(t, "POST", p.URL+"/v1/conversations/c1/messages", "", map[string]any{"text": "hello"}, &httpErr); code != http.StatusServiceUnavailable || httpErr.Error.Code != "unavailable" {
		t.Fatalf("HTTP send: %d %+v, want 503 unavailable", code, httpErr)
	}
	var compat map[string]any
	if code := trtest.Do(t, "POST", p.URL+"/api/chat", "", map[string]any{"session_id": "c1", "message": "hello"}, &compat); code != http.StatusBadGateway || compat["error"] != "Communication error with AI service" {
		t.Fatalf("compat chat: %d %v, want 502", code, compat)
	}
	if code := trtest.Get(t, p.URL+"/api/ai-health", &compat); code != http.StatusServiceUnavailable || compat["ai_service"] != "unreachable" {
		t.Fatalf("ai-health: %d %v, want 503 unreachable", code, compat)
	}
	var page struct{ Messages []any }
	if code := trtest.Get(t, p.URL+"/v1/conversations/c1/messages", &page); code != http.StatusOK || len(page.Messages) != 0 {
		t.Fatalf("messages: %d %v, want none stored", code, page.Messages)
	}
}

// A NUL character (U+0000), which PostgreSQL's text cannot hold, becomes
// U+FFFD in a model's answer (in its deltas and its stored content alike)
// and in a user's message, on either store: the turn ends, and its
// conversation takes the next message.
func TestNULCharactersAreStored(t *testing.T) {
	for _, store := range []string{"sqlite", "postgres"} {
		t.Run(store, func(t *testing.T) {
			args := []string{}
			if store == "postgres" {
				args = append(args, "--store-url", pgtest.SchemaURL(t))
			}
			fm := &fakeModel{closed: make(chan time.Time, 4), answer: func(int) []string { return []string{"wor\x00ld", "!"} }}
			srv := httptest.NewServer(fm)
			defer srv.Close()
			p := trtest.Serve(t, append(args, "--provider", "openai", "--openai-base-url", srv.URL+"/v1",
				"--openai-api-key", "sk-test-secret", "--model", "m1")...)
			c := trtest.Dial(t, p.WSURL(), nil)
			c.Join("nul", nil)
			tr := runTurn(t, c, "nul", "say \x00 it", nil)
			if tr.Status != "complete" || tr.Text.String() != "wor\uFFFDld!" {
				t.Fatalf("turn %s %q, want complete %q", tr.Status, tr.Text.String(), "wor\uFFFDld!")
			}
			msgs := messages(t, p.URL, "nul", "")
			if len(msgs) != 2 || msgs[0].Content != "say \uFFFD it" || msgs[1].Content != tr.Text.String() {
				t.Fatalf("stored %+v", msgs)
			}
			if next := runTurn(t, c, "nul", "again", nil); next.Status != "complete" {
				t.Fatalf("next turn %s", next.Status)
			}
		})
	}
}
