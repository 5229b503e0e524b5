package openai

import (
	"context"
	"errors"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/provider"
)

// A server that ignores "stream": true answers with one chat.completion:
// its text is the answer, and the request is made once.
func TestStreamJSONAnswer(t *testing.T) {
	tests := []struct {
		name      string
		body      string
		want      []string
		wantUsage *chat.Usage
		wantErr   string
	}{
		{
			name:      "a whole completion",
			body:      `{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there."},"finish_reason":"stop"}],"usage":{"prompt_tokens":4,"completion_tokens":3}}`,
			want:      []string{"Hello there."},
			wantUsage: &chat.Usage{PromptTokens: 4, CompletionTokens: 3},
		},
		{
			name:    "an error with status 200",
			body:    `{"error":{"message":"The model is overloaded","type":"server_error"}}`,
			wantErr: "the model server reported an error: The model is overloaded",
		},
		{
			name:      "an event stream labelled JSON",
			body:      "\n" + contentChunk("Hi") + finishChunk + doneEvent,
			want:      []string{"Hi"},
			wantUsage: nil,
		},
		{
			name:      "content as a list of parts",
			body:      `{"object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":[{"type":"thinking","thinking":[{"type":"text","text":"hmm"}]},{"type":"text","text":"Hello."}]},"finish_reason":"stop"}]}`,
			want:      []string{"Hello."},
			wantUsage: nil,
		},
		{
			name:      "no content",
			body:      `{"object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":null}}]}`,
			wantUsage: nil,
		},
		{
			name:      "no text, cut by the output limit",
			body:      `{"object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":""},"finish_reason":"length"}],"usage":{"prompt_tokens":4,"completion_tokens":100}}`,
			wantErr:   `the model reached its output limit before any answer text (finish_reason "length")`,
			wantUsage: &chat.Usage{PromptTokens: 4, CompletionTokens: 100},
		},
		{
			name:    "no text, withheld by a filter",
			body:    `{"object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":null},"finish_reason":"content_filter"}]}`,
			wantErr: `the model server's content filter withheld the answer (finish_reason "content_filter")`,
		},
		{
			name:      "text cut by the output limit",
			body:      `{"object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hel"},"finish_reason":"length"}]}`,
			want:      []string{"Hel"},
			wantUsage: nil,
		},
		{
			name:      "broken off",
			body:      `{"object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hel"},"finish_reason":"abort"}],"usage":{"prompt_tokens":4,"completion_tokens":1}}`,
			wantErr:   `the model server broke off the answer (finish_reason "abort")`,
			wantUsage: &chat.Usage{PromptTokens: 4, CompletionTokens: 1}, // spent all the same
		},
		{
			name:    "content of another type",
			body:    `{"object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":42}}]}`,
			wantErr: msgMalformed,
		},
		{
			name:    "neither",
			body:    `{"object":"list","data":[]}`,
			wantErr: msgMalformed,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := newFakeServer(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
				w.Header().Set("Content-Type", "application/json; charset=utf-8")
				_, _ = io.WriteString(w, tt.body)
			})
			f := newFixture(t, srv.baseURL(), nil)
			got, res, err := f.stream(t)
			if tt.wantErr != "" {
				var pe *provider.Error
				if !errors.As(err, &pe) || pe.Message != tt.wantErr {
					t.Fatalf("Stream error %v, want %q", err, tt.wantErr)
				}
			} else if err != nil {
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

// A complete answer ends the turn although the server keeps the response
// open: after [DONE], or after a finish_reason without [DONE]. The
// timeouts are lifted, so only the answer's end can end the stream;
// after a finish_reason that came with text, which relays put on every
// chunk, the idle timeout (idle) does.
func TestStreamEndsWithoutTheServerClosing(t *testing.T) {
	tests := []struct {
		name  string
		parts []string
		idle  time.Duration
	}{
		{"after [DONE]", []string{contentChunk("Hi"), finishChunk, usageChunk, doneEvent}, 0},
		{"after finish_reason and usage", []string{contentChunk("Hi"), finishChunk, usageChunk}, 0},
		{"after finish_reason alone", []string{contentChunk("Hi"), finishChunk}, 0},
		{"after a finish_reason on the last token", []string{
			`data: {"choices":[{"index":0,"delta":{"reasoning_content":"hmm"},"finish_reason":null}]}` + "\n\n",
			`data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":"stop"}]}` + "\n\n",
		}, 100 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			closed := make(chan struct{})
			srv := newFakeServer(t, func(_ int, w http.ResponseWriter, r *http.Request) {
				writeSSE(t, w, tt.parts...)
				<-r.Context().Done() // until the client closes the connection
				close(closed)
			})
			f := newFixture(t, srv.baseURL(), func(c *Config) {
				c.IdleTimeout = -1
				if tt.idle > 0 {
					c.IdleTimeout = tt.idle
				}
				c.FirstTokenTimeout = -1
			})
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			got, _, err := f.streamCtx(ctx)
			if err != nil {
				t.Fatalf("Stream: %v (the answer was complete)", err)
			}
			if !slices.Equal(got, []string{"Hi"}) {
				t.Errorf("emitted %q, want [Hi]", got)
			}
			select {
			case <-closed:
			case <-ctx.Done():
				t.Fatal("the lingering response was never closed")
			}
		})
	}
}

// Relays that put finish_reason "stop" on every chunk (one-api's Gemini
// relay, older LiteLLM on Vertex, Open WebUI) must not have the rest of an
// answer cut off when the model pauses longer than trailerWait: the pause
// is held to the idle timeout, and [DONE] or the body's end closes the
// answer.
func TestStreamFinishReasonOnEveryChunk(t *testing.T) {
	for _, done := range []bool{true, false} {
		name := "then [DONE]"
		if !done {
			name = "then the body ends"
		}
		t.Run(name, func(t *testing.T) {
			srv := newFakeServer(t, func(_ int, w http.ResponseWriter, r *http.Request) {
				for i, part := range []string{stopChunk("Hello"), stopChunk(" world"), stopChunk("!")} {
					if i > 0 {
						// The model pauses for longer than trailerWait;
						// the pause is the behaviour under test.
						select {
						case <-time.After(100 * time.Millisecond):
						case <-r.Context().Done():
							return
						}
					}
					writeSSE(t, w, part)
				}
				if done {
					writeSSE(t, w, doneEvent)
				}
			})
			f := newFixture(t, srv.baseURL(), nil)
			f.p.trailerWait = 10 * time.Millisecond
			got, _, err := f.stream(t)
			if err != nil {
				t.Fatalf("Stream: %v", err)
			}
			if want := []string{"Hello", " world", "!"}; !slices.Equal(got, want) {
				t.Errorf("emitted %q, want %q", got, want)
			}
		})
	}
}

// Once a relay has shown that its finish_reasons mean nothing, a silence
// after one is the idle timeout's, and fails the turn as any other.
func TestStreamUnreliableFinishReasonIdle(t *testing.T) {
	srv := newFakeServer(t, func(_ int, w http.ResponseWriter, r *http.Request) {
		writeSSE(t, w, stopChunk("Hello"), stopChunk(" world"))
		<-r.Context().Done() // until the client gives up
	})
	f := newFixture(t, srv.baseURL(), func(c *Config) { c.IdleTimeout = 50 * time.Millisecond })
	f.p.trailerWait = 10 * time.Millisecond
	got, _, err := f.stream(t)
	wantProviderError(t, err, "the model server stopped sending tokens for 50ms")
	if want := []string{"Hello", " world"}; !slices.Equal(got, want) {
		t.Errorf("emitted %q, want %q", got, want)
	}
}

// stopChunk is a chunk of text s carrying finish_reason "stop", as relays
// that put one on every chunk send them.
func stopChunk(s string) string {
	return `data: {"choices":[{"index":0,"delta":{"content":"` + s + `"},"finish_reason":"stop"}]}` + "\n\n"
}

// A relay that puts finish_reason on every chunk, text, role-only and
// empty ones alike, is not cut by a pause after one of those: not after
// text carrying one (when the first chunk had none), nor after a
// role-only first chunk (the model's first token may take long), nor
// after an empty chunk, whatever came before it.
func TestStreamFinishReasonThenAPause(t *testing.T) {
	role := `data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":"stop"}]}` + "\n\n"
	roleNull := `data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}` + "\n\n"
	for name, parts := range map[string][2][]string{
		"text after a first chunk without one":    {{contentChunk("Hel"), stopChunk("lo")}, {stopChunk(" world"), doneEvent}},
		"a role-only first chunk":                 {{role}, {stopChunk("Hello"), stopChunk(" world"), doneEvent}},
		"an empty chunk mid-reply":                {{stopChunk("Hello"), stopChunk("")}, {stopChunk(" world"), doneEvent}},
		"an empty chunk after a plain role chunk": {{roleNull, stopChunk("")}, {stopChunk("Hello"), stopChunk(" world"), doneEvent}},
	} {
		t.Run(name, func(t *testing.T) {
			srv := newFakeServer(t, func(_ int, w http.ResponseWriter, r *http.Request) {
				writeSSE(t, w, parts[0]...)
				// Longer than trailerWait: the pause is the behaviour under test.
				select {
				case <-time.After(100 * time.Millisecond):
				case <-r.Context().Done():
					return
				}
				writeSSE(t, w, parts[1]...)
			})
			f := newFixture(t, srv.baseURL(), nil)
			f.p.trailerWait = 10 * time.Millisecond
			got, _, err := f.stream(t)
			if err != nil {
				t.Fatalf("Stream: %v", err)
			}
			if text := strings.Join(got, ""); text != "Hello world" {
				t.Errorf("emitted %q, want %q", got, "Hello world")
			}
		})
	}
}

// An answer of no text (tool calls only, or filtered before any text)
// ends at its bare finish_reason too, although the server keeps the
// response open: the timeouts are lifted, so only the trailer wait can end
// it. (One that stops at once, a bare "stop", is told from an
// every-chunk relay's empty chunk by [DONE] or the server's close only.)
func TestStreamAnswerOfNoTextEndsWithoutTheServerClosing(t *testing.T) {
	role := `data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}` + "\n\n"
	tool := `data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},"finish_reason":null}]}` + "\n\n"
	finish := func(reason string) string {
		return `data: {"choices":[{"index":0,"delta":{},"finish_reason":"` + reason + `"}]}` + "\n\n"
	}
	for name, tt := range map[string]struct {
		parts   []string
		wantMsg string // empty: complete
	}{
		"tool calls only": {parts: []string{role, tool, finish("tool_calls"), usageChunk}},
		"filtered": {
			parts:   []string{role, finish("content_filter")},
			wantMsg: `the model server's content filter withheld the answer (finish_reason "content_filter")`,
		},
	} {
		parts := tt.parts
		t.Run(name, func(t *testing.T) {
			srv := newFakeServer(t, func(_ int, w http.ResponseWriter, r *http.Request) {
				writeSSE(t, w, parts...)
				<-r.Context().Done() // until the client closes the connection
			})
			f := newFixture(t, srv.baseURL(), func(c *Config) {
				c.IdleTimeout = -1
				c.FirstTokenTimeout = -1
			})
			f.p.trailerWait = 10 * time.Millisecond
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			got, _, err := f.streamCtx(ctx)
			if tt.wantMsg != "" {
				wantProviderError(t, err, tt.wantMsg)
			} else if err != nil {
				t.Fatalf("Stream: %v (the answer was complete)", err)
			}
			if len(got) != 0 {
				t.Errorf("emitted %q, want nothing", got)
			}
		})
	}
}

// The usage comes in a chunk of its own after the finish_reason (with
// stream_options include_usage), or in the finish chunk itself. It is
// kept whatever the finish_reason, an answer broken off included (its
// tokens were spent), whether [DONE] follows, the server closes, or it
// keeps the response open.
func TestStreamUsageAfterTheFinish(t *testing.T) {
	finish := func(reason string) string {
		return `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"` + reason + `"}]}` + "\n\n"
	}
	finishWithUsage := func(reason string) string {
		return `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"` + reason + `"}],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}` + "\n\n"
	}
	wantMsg := map[string]string{
		"abort": `the model server broke off the answer (finish_reason "abort")`,
		"error": `the model server broke off the answer (finish_reason "error")`,
	}
	endings := map[string]struct {
		parts []string // after the text
		open  bool     // the server keeps the response open after them
	}{
		"then [DONE]":            {parts: []string{usageChunk, doneEvent}},
		"then the server closes": {parts: []string{usageChunk}},
		"then the server stays":  {parts: []string{usageChunk}, open: true},
		"in the finish chunk":    {parts: []string{doneEvent}},
	}
	for _, reason := range []string{"stop", "length", "content_filter", "tool_calls", "abort", "error"} {
		for name, end := range endings {
			t.Run(reason+"/"+name, func(t *testing.T) {
				parts := []string{roleChunk, contentChunk("Hel")}
				if name == "in the finish chunk" {
					parts = append(parts, finishWithUsage(reason))
				} else {
					parts = append(parts, finish(reason))
				}
				parts = append(parts, end.parts...)
				srv := newFakeServer(t, func(_ int, w http.ResponseWriter, r *http.Request) {
					writeSSE(t, w, parts...)
					if end.open {
						<-r.Context().Done() // until the client closes the connection
					}
				})
				f := newFixture(t, srv.baseURL(), func(c *Config) { c.IdleTimeout = -1 })
				f.p.trailerWait = 10 * time.Millisecond
				got, res, err := f.stream(t)
				if msg := wantMsg[reason]; msg != "" {
					wantProviderError(t, err, msg)
				} else if err != nil {
					t.Fatalf("Stream: %v", err)
				}
				if !slices.Equal(got, []string{"Hel"}) {
					t.Errorf("emitted %q, want [Hel]", got)
				}
				if want := (&chat.Usage{PromptTokens: 9, CompletionTokens: 3}); !equalUsage(res.Usage, want) {
					t.Errorf("usage %+v, want %+v", res.Usage, want)
				}
				if n := srv.requests.Load(); n != 1 {
					t.Errorf("%d requests, want 1", n)
				}
			})
		}
	}
}
