package openai

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/provider"
)

func TestStreamWire(t *testing.T) {
	crlf := func(s string) string { return strings.ReplaceAll(s, "\n", "\r\n") }
	hel := contentChunk("Hel")
	tests := []struct {
		name      string
		parts     []string // each written and flushed on its own
		want      []string
		wantUsage *chat.Usage
	}{
		{
			name:      "openai",
			parts:     []string{roleChunk, hel, contentChunk("lo"), contentChunk(", wörld"), finishChunk, usageChunk, doneEvent},
			want:      []string{"Hel", "lo", ", wörld"},
			wantUsage: &chat.Usage{PromptTokens: 9, CompletionTokens: 3},
		},
		{
			name:      "CRLF line endings",
			parts:     []string{crlf(roleChunk), crlf(hel), crlf(contentChunk("lo")), crlf(finishChunk), crlf(usageChunk), crlf(doneEvent)},
			want:      []string{"Hel", "lo"},
			wantUsage: &chat.Usage{PromptTokens: 9, CompletionTokens: 3},
		},
		{
			name:  "lone CR line endings",
			parts: []string{strings.ReplaceAll(roleChunk+hel+finishChunk+doneEvent, "\n", "\r")},
			want:  []string{"Hel"},
		},
		{
			name: "comments and ignored fields",
			parts: []string{
				": keep-alive\n\n",
				":\n",
				"event: message\nid: 7\nretry: 1000\n" + hel,
				": OPENROUTER PROCESSING\n\n",
				"event: ping\n\n", // no data: not an event
				finishChunk, doneEvent,
			},
			want: []string{"Hel"},
		},
		{
			name: "event split across writes",
			parts: []string{
				roleChunk,
				hel[:7], hel[7:40], hel[40 : len(hel)-1], // mid-line, then all but the blank line
				"\n",
				contentChunk("lo")[:len(contentChunk("lo"))-2], "\r", // a CR ends one write,
				"\n\r\n", // its LF the next
				finishChunk, "data: [DO", "NE]\n", "\n",
			},
			want: []string{"Hel", "lo"},
		},
		{
			name: "empty deltas",
			parts: []string{
				roleChunk,
				`data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":null}]}` + "\n\n",
				contentChunk(""),
				`data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":null},"finish_reason":null}]}` + "\n\n",
				hel,
				`data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[]}` + "\n\n",
				finishChunk, doneEvent,
			},
			want: []string{"Hel"},
		},
		{
			name: "multi-line data joined with LF",
			parts: []string{
				"data: {\"choices\":[{\"index\":0,\n" + "data: \"delta\":{\"content\":\"a\"}}]}\n\n",
				"data:{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"b\"}}]}\n\n", // no space after the colon
				doneEvent,
			},
			want: []string{"a", "b"},
		},
		{
			name: "ollama",
			parts: []string{
				`data: {"id":"chatcmpl-540","object":"chat.completion.chunk","created":1730000000,"model":"llama3.2","system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}]}` + "\n\n",
				`data: {"id":"chatcmpl-540","object":"chat.completion.chunk","created":1730000000,"model":"llama3.2","system_fingerprint":"fp_ollama","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":"stop"}]}` + "\n\n",
				`data: {"id":"chatcmpl-540","object":"chat.completion.chunk","created":1730000000,"model":"llama3.2","system_fingerprint":"fp_ollama","choices":[],"usage":{"prompt_tokens":26,"completion_tokens":2,"total_tokens":28}}` + "\n\n",
				doneEvent,
			},
			want:      []string{"Hi"},
			wantUsage: &chat.Usage{PromptTokens: 26, CompletionTokens: 2},
		},
		{
			name: "reasoning is not emitted",
			parts: []string{
				roleChunk,
				`data: {"choices":[{"index":0,"delta":{"reasoning_content":"hmm"}}]}` + "\n\n",
				`data: {"choices":[{"index":0,"delta":{"reasoning":"so"}}]}` + "\n\n",
				hel, finishChunk, doneEvent,
			},
			want: []string{"Hel"},
		},
		{
			// Mistral's reasoning models (magistral).
			name: "content as a list of parts",
			parts: []string{
				`data: {"id":"x","object":"chat.completion.chunk","model":"magistral-medium-2509","choices":[{"index":0,"delta":{"role":"assistant","content":[{"type":"thinking","thinking":[{"type":"text","text":"a greeting"}]}]},"finish_reason":null}]}` + "\n\n",
				`data: {"id":"x","object":"chat.completion.chunk","model":"magistral-medium-2509","choices":[{"index":0,"delta":{"content":[{"type":"text","text":"Hel"},{"type":"text","text":"lo"}]},"finish_reason":null}]}` + "\n\n",
				`data: {"id":"x","object":"chat.completion.chunk","model":"magistral-medium-2509","choices":[{"index":0,"delta":{"content":[]},"finish_reason":null}]}` + "\n\n",
				`data: {"id":"x","object":"chat.completion.chunk","model":"magistral-medium-2509","choices":[{"index":0,"delta":{"content":"!"},"finish_reason":"stop"}]}` + "\n\n",
				doneEvent,
			},
			want: []string{"Hello", "!"},
		},
		{
			name:  "a high half before a list of parts",
			parts: []string{rawContentChunk(`a\ud83d`), `data: {"choices":[{"index":0,"delta":{"content":[{"type":"text","text":"b"}]}}]}` + "\n\n", doneEvent},
			want:  []string{"a", "\uFFFDb"},
		},
		{
			name: "usage on every chunk keeps the last",
			parts: []string{
				`data: {"choices":[{"index":0,"delta":{"content":"a"}}],"usage":{"prompt_tokens":5,"completion_tokens":1}}` + "\n\n",
				`data: {"choices":[{"index":0,"delta":{"content":"b"}}],"usage":{"prompt_tokens":5,"completion_tokens":2}}` + "\n\n",
				`data: {"choices":[{"index":0,"delta":{"content":"c"}}],"usage":null}` + "\n\n",
				doneEvent,
			},
			want:      []string{"a", "b", "c"},
			wantUsage: &chat.Usage{PromptTokens: 5, CompletionTokens: 2},
		},
		{
			name:  "finish without [DONE]",
			parts: []string{roleChunk, hel, finishChunk},
			want:  []string{"Hel"},
		},
		{
			// A keep-alive some proxies send in place of a comment.
			name:  "empty data events",
			parts: []string{"data:\n\n", roleChunk, "data: \n\n", hel, "data:  \r\n\r\n", finishChunk, doneEvent},
			want:  []string{"Hel"},
		},
		{
			name:  "[DONE] with white space around it",
			parts: []string{hel, "data:  [DONE] \n\n"},
			want:  []string{"Hel"},
		},
		{
			name:  "[DONE] without blank line at EOF",
			parts: []string{hel, "data: [DONE]\n"},
			want:  []string{"Hel"},
		},
		{
			name: "an emoji's surrogate pair split across chunks",
			parts: []string{
				rawContentChunk(`Hi \ud83d`), rawContentChunk(`\ude00!`),
				rawContentChunk(`\uD83D`), rawContentChunk(`\uDE00`), // a chunk each, upper case
				rawContentChunk(`\\ud83d`), rawContentChunk(`\ude00`), // an escaped backslash, then a lone low half
				rawContentChunk(`\ud83d`), finishChunk, doneEvent, // a high half last
			},
			want: []string{"Hi ", "\U0001F600!", "\U0001F600", `\ud83d`, "\uFFFD", "\uFFFD"},
		},
		{
			name:  "an empty content between an emoji's halves",
			parts: []string{rawContentChunk(`a\ud83d`), rawContentChunk(``), rawContentChunk(`\ude00b`), doneEvent},
			want:  []string{"a", "\U0001F600b"},
		},
		{
			name:  "a high half before a chunk without one",
			parts: []string{rawContentChunk(`a\ud83d`), rawContentChunk(`b`), doneEvent},
			want:  []string{"a", "\uFFFDb"},
		},
		{
			name:  "byte order mark",
			parts: []string{"\xEF\xBB\xBF" + hel, doneEvent},
			want:  []string{"Hel"},
		},
		{
			name:  "a chunk over bufio's 64 KiB",
			parts: []string{contentChunk(strings.Repeat("é", 40<<10)), doneEvent},
			want:  []string{strings.Repeat("é", 40<<10)},
		},
		{
			name: "finish_reason length",
			parts: []string{
				roleChunk, hel,
				`data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}` + "\n\n",
				usageChunk, doneEvent,
			},
			want:      []string{"Hel"},
			wantUsage: &chat.Usage{PromptTokens: 9, CompletionTokens: 3},
		},
		{
			name:  "finish_reason content_filter",
			parts: []string{hel, `data: {"choices":[{"index":0,"delta":{},"finish_reason":"content_filter"}]}` + "\n\n"},
			want:  []string{"Hel"},
		},
		{
			name:  "Azure's prompt_filter_results first",
			parts: []string{`data: {"choices":[],"prompt_filter_results":[{"prompt_index":0}]}` + "\n\n", hel, finishChunk, doneEvent},
			want:  []string{"Hel"},
		},
		{
			name: "tool_calls deltas ignored",
			parts: []string{
				`data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"x","function":{"name":"f","arguments":""}}]}}]}` + "\n\n",
				hel, doneEvent,
			},
			want: []string{"Hel"},
		},
		{
			name:  "an escaped NUL",
			parts: []string{rawContentChunk(`a\u0000b`), doneEvent},
			want:  []string{"a\uFFFDb"},
		},
		{
			name:  "invalid UTF-8",
			parts: []string{"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\xffb\"}}]}\n\n", doneEvent},
			want:  []string{"a\uFFFDb"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := newFakeServer(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
				writeSSE(t, w, tt.parts...)
			})
			f := newFixture(t, srv.baseURL(), nil)
			got, res, err := f.stream(t)
			if err != nil {
				t.Fatalf("Stream: %v", err)
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("emitted %q, want %q", got, tt.want)
			}
			if !equalUsage(res.Usage, tt.wantUsage) {
				t.Errorf("usage %+v, want %+v", res.Usage, tt.wantUsage)
			}
			if n := srv.requests.Load(); n != 1 {
				t.Errorf("%d requests, want 1", n)
			}
		})
	}
}

func equalUsage(a, b *chat.Usage) bool {
	if a == nil || b == nil {
		return a == b
	}
	return *a == *b
}

func TestStreamRequest(t *testing.T) {
	type sent struct {
		header http.Header
		path   string
		body   map[string]any
	}
	tests := []struct {
		name         string
		edit         func(*Config)
		req          provider.Request
		wantModel    any // nil: no model field
		wantMessages []any
	}{
		{
			name: "default model and system prompt",
			edit: func(c *Config) { c.SystemPrompt = "Be brief." },
			req: provider.Request{TurnID: "t1", Messages: []provider.Message{
				{Role: "user", Content: "hi"}, {Role: "assistant", Content: "hello"}, {Role: "user", Content: "why?"},
			}},
			wantModel: "m",
			wantMessages: []any{
				map[string]any{"role": "system", "content": "Be brief."},
				map[string]any{"role": "user", "content": "hi"},
				map[string]any{"role": "assistant", "content": "hello"},
				map[string]any{"role": "user", "content": "why?"},
			},
		},
		{
			name: "a question left without an answer is joined to the next",
			req: provider.Request{TurnID: "t1", Messages: []provider.Message{
				{Role: "assistant", Content: "an answer whose question was not loaded"},
				{Role: "user", Content: "hi"}, {Role: "assistant", Content: "hello"},
				{Role: "user", Content: "failed"}, {Role: "user", Content: "cancelled"}, {Role: "user", Content: "again?"},
			}},
			wantModel: "m",
			wantMessages: []any{
				map[string]any{"role": "user", "content": "hi"},
				map[string]any{"role": "assistant", "content": "hello"},
				map[string]any{"role": "user", "content": "failed\n\ncancelled\n\nagain?"},
			},
		},
		{
			name:      "requested model",
			edit:      func(c *Config) { c.Models = []string{"big"} },
			req:       provider.Request{TurnID: "t1", Model: "big", Messages: []provider.Message{{Role: "user", Content: "hi"}}},
			wantModel: "big",
			wantMessages: []any{
				map[string]any{"role": "user", "content": "hi"},
			},
		},
		{
			name: "no model at all",
			edit: func(c *Config) { c.Model = "" },
			req:  provider.Request{TurnID: "t1", Messages: []provider.Message{{Role: "user", Content: "hi"}}},
			wantMessages: []any{
				map[string]any{"role": "user", "content": "hi"},
			},
		},
		{
			name: "context trimmed to the budget, system prompt counted",
			edit: func(c *Config) { c.SystemPrompt = "0123456789"; c.ContextBudgetBytes = 10 + 12 },
			req: provider.Request{TurnID: "t1", Messages: []provider.Message{
				{Role: "user", Content: "old question"},
				{Role: "assistant", Content: "old answer"},
				{Role: "user", Content: "q2"},
				{Role: "assistant", Content: "answer2"},
				{Role: "user", Content: "q3"},
			}},
			wantModel: "m",
			wantMessages: []any{
				map[string]any{"role": "system", "content": "0123456789"},
				map[string]any{"role": "user", "content": "q2"},
				map[string]any{"role": "assistant", "content": "answer2"},
				map[string]any{"role": "user", "content": "q3"},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := make(chan sent, 1)
			srv := newFakeServer(t, func(_ int, w http.ResponseWriter, r *http.Request) {
				s := sent{header: r.Header.Clone(), path: r.Method + " " + r.URL.Path}
				if err := json.NewDecoder(r.Body).Decode(&s.body); err != nil {
					t.Errorf("decode request: %v", err)
				}
				got <- s
				writeSSE(t, w, roleChunk, contentChunk("ok"), finishChunk, doneEvent)
			})
			f := newFixture(t, srv.baseURL(), func(c *Config) {
				c.Headers = map[string]string{"X-Team": "blue", "OpenAI-Organization": "org-1"}
				if tt.edit != nil {
					tt.edit(c)
				}
			})
			if _, err := f.p.Stream(t.Context(), tt.req, func(string) error { return nil }); err != nil {
				t.Fatalf("Stream: %v", err)
			}
			s := <-got
			if s.path != "POST /v1/chat/completions" {
				t.Errorf("request %s, want POST /v1/chat/completions", s.path)
			}
			for name, want := range map[string]string{
				"Authorization":       "Bearer " + testKey,
				"Content-Type":        "application/json",
				"Accept":              "text/event-stream",
				"X-Team":              "blue",
				"Openai-Organization": "org-1",
			} {
				if got := s.header.Get(name); got != want {
					t.Errorf("header %s = %q, want %q", name, got, want)
				}
			}
			if got := s.body["model"]; got != tt.wantModel {
				t.Errorf("model = %v, want %v", got, tt.wantModel)
			}
			if got := s.body["stream"]; got != true {
				t.Errorf("stream = %v, want true", got)
			}
			if got, _ := json.Marshal(s.body["stream_options"]); string(got) != `{"include_usage":true}` {
				t.Errorf("stream_options = %s", got)
			}
			gotMsgs, _ := json.Marshal(s.body["messages"])
			wantMsgs, _ := json.Marshal(tt.wantMessages)
			if string(gotMsgs) != string(wantMsgs) {
				t.Errorf("messages\n got %s\nwant %s", gotMsgs, wantMsgs)
			}
		})
	}
}

func TestStreamNoAPIKeyNoAuthorization(t *testing.T) {
	got := make(chan string, 1)
	srv := newFakeServer(t, func(_ int, w http.ResponseWriter, r *http.Request) {
		got <- r.Header.Get("Authorization")
		writeSSE(t, w, contentChunk("ok"), doneEvent)
	})
	f := newFixture(t, srv.baseURL(), func(c *Config) { c.APIKey = "" })
	if _, _, err := f.stream(t); err != nil {
		t.Fatalf("Stream: %v", err)
	}
	if auth := <-got; auth != "" {
		t.Errorf("Authorization = %q, want none", auth)
	}
}

func TestStreamModelNotAllowed(t *testing.T) {
	srv := newFakeServer(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
		writeSSE(t, w, contentChunk("ok"), doneEvent)
	})
	f := newFixture(t, srv.baseURL(), func(c *Config) { c.Models = []string{"small"} })
	req := provider.Request{Model: "huge", Messages: []provider.Message{{Role: "user", Content: "hi"}}}
	_, err := f.p.Stream(t.Context(), req, func(string) error { return nil })
	var pe *provider.Error
	if !errors.As(err, &pe) || pe.Message != `model "huge" is not available on this server` {
		t.Fatalf("Stream = %v, want model not available", err)
	}
	if n := srv.requests.Load(); n != 0 {
		t.Errorf("%d requests, want none", n)
	}
}

// TestStreamCancelClosesUpstream checks the contract the cancel button relies
// on: once ctx is cancelled the model server sees its request closed, by the
// cancel itself (the provider has no timeout here that could close it), and
// Stream returns ctx's error.
func TestStreamCancelClosesUpstream(t *testing.T) {
	closed := make(chan time.Time, 1)
	srv := newFakeServer(t, func(_ int, w http.ResponseWriter, r *http.Request) {
		writeSSE(t, w, roleChunk, contentChunk("Hel"))
		<-r.Context().Done()
		closed <- time.Now()
	})
	f := newFixture(t, srv.baseURL(), func(c *Config) { c.FirstTokenTimeout, c.IdleTimeout = -1, -1 })

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	firstToken := make(chan struct{})
	var once sync.Once
	done := make(chan error, 1)
	go func() {
		req := provider.Request{Messages: []provider.Message{{Role: "user", Content: "hi"}}}
		_, err := f.p.Stream(ctx, req, func(string) error {
			once.Do(func() { close(firstToken) })
			return nil
		})
		done <- err
	}()
	select {
	case <-firstToken:
	case <-time.After(10 * time.Second):
		t.Fatal("no token emitted")
	}
	cancelled := time.Now()
	cancel()
	select {
	case at := <-closed:
		t.Logf("the server saw the request closed %v after cancel", at.Sub(cancelled))
	case <-time.After(10 * time.Second):
		t.Fatal("the server never saw the request closed")
	}
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("Stream = %v, want context.Canceled", err)
	}
	if n := srv.requests.Load(); n != 1 {
		t.Errorf("%d requests, want 1", n)
	}
}

// Cancelling while the server has not answered yet (a model loading)
// closes the request too, by the cancel itself (no timeout of the provider's
// could).
func TestStreamCancelBeforeHeaders(t *testing.T) {
	closed := make(chan time.Time, 1)
	inHandler := make(chan struct{})
	srv := newFakeServer(t, func(_ int, w http.ResponseWriter, r *http.Request) {
		close(inHandler)
		<-r.Context().Done()
		closed <- time.Now()
	})
	f := newFixture(t, srv.baseURL(), func(c *Config) { c.FirstTokenTimeout, c.IdleTimeout = -1, -1 })
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, _, err := f.streamCtx(ctx)
		done <- err
	}()
	select {
	case <-inHandler:
	case <-time.After(10 * time.Second):
		t.Fatal("no request")
	}
	cancelled := time.Now()
	cancel()
	select {
	case at := <-closed:
		t.Logf("the server saw the request closed %v after cancel", at.Sub(cancelled))
	case <-time.After(10 * time.Second):
		t.Fatal("the server never saw the request closed")
	}
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("Stream = %v, want context.Canceled", err)
	}
}

func TestStreamEmitErrorStops(t *testing.T) {
	closed := make(chan struct{})
	srv := newFakeServer(t, func(_ int, w http.ResponseWriter, r *http.Request) {
		writeSSE(t, w, roleChunk, contentChunk("a"), contentChunk("b"))
		<-r.Context().Done()
		close(closed)
	})
	f := newFixture(t, srv.baseURL(), nil)
	errFull := errors.New("queue full")
	var got []string
	req := provider.Request{Messages: []provider.Message{{Role: "user", Content: "hi"}}}
	_, err := f.p.Stream(t.Context(), req, func(s string) error {
		got = append(got, s)
		return errFull
	})
	if err != errFull {
		t.Errorf("Stream = %v, want emit's error unchanged", err)
	}
	if !slices.Equal(got, []string{"a"}) {
		t.Errorf("emitted %q, want [a]", got)
	}
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("the upstream request was not closed")
	}
	if n := srv.requests.Load(); n != 1 {
		t.Errorf("%d requests, want 1", n)
	}
}

// TestStreamSlowEmitIsNotIdle checks that a consumer slower than IdleTimeout
// does not count as the server being silent.
func TestStreamSlowEmitIsNotIdle(t *testing.T) {
	gotB := make(chan struct{})
	srv := newFakeServer(t, func(_ int, w http.ResponseWriter, r *http.Request) {
		writeSSE(t, w, contentChunk("a"), contentChunk("b"))
		select {
		case <-gotB: // so that "c" is not already buffered when "b" is emitted
		case <-r.Context().Done():
			return
		}
		io.WriteString(w, contentChunk("c")+doneEvent)
	})
	f := newFixture(t, srv.baseURL(), func(c *Config) { c.IdleTimeout = 20 * time.Millisecond })
	var got []string
	req := provider.Request{Messages: []provider.Message{{Role: "user", Content: "hi"}}}
	_, err := f.p.Stream(t.Context(), req, func(s string) error {
		got = append(got, s)
		if s == "b" {
			close(gotB)
			// A consumer held up by backpressure for longer than
			// IdleTimeout; this wait is the behaviour under test, not
			// synchronisation.
			<-time.After(60 * time.Millisecond)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("Stream: %v", err)
	}
	if !slices.Equal(got, []string{"a", "b", "c"}) {
		t.Errorf("emitted %q, want [a b c]", got)
	}
}

func TestStreamConcurrent(t *testing.T) {
	srv := newFakeServer(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
		writeSSE(t, w, roleChunk, contentChunk("x"), contentChunk("y"), finishChunk, usageChunk, doneEvent)
	})
	f := newFixture(t, srv.baseURL(), nil)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() {
			var text strings.Builder
			req := provider.Request{Messages: []provider.Message{{Role: "user", Content: "hi"}}}
			res, err := f.p.Stream(t.Context(), req, func(s string) error {
				text.WriteString(s)
				return nil
			})
			if err == nil && (text.String() != "xy" || res.Usage == nil) {
				err = errors.New("got " + text.String())
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}
