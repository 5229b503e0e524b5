package openai

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/provider"
)

// wantProviderError fails unless err is a *provider.Error with message msg
// that shows no secret, and returns it.
func wantProviderError(t testing.TB, err error, msg string) *provider.Error {
	t.Helper()
	var pe *provider.Error
	if !errors.As(err, &pe) {
		t.Fatalf("error = %T %v, want *provider.Error %q", err, err, msg)
	}
	if pe.Message != msg {
		t.Errorf("Message = %q, want %q", pe.Message, msg)
	}
	mustNotLeak(t, "error", err.Error())
	for e := error(pe); e != nil; e = errors.Unwrap(e) {
		mustNotLeak(t, "wrapped error", e.Error())
	}
	return pe
}

func TestStreamStatusErrors(t *testing.T) {
	tests := []struct {
		name            string
		status          int
		retryAfter      string
		body            string // raw body; empty: an OpenAI error echoing the key
		wantMsg         string
		wantRequests    int32
		wantUnavailable bool
	}{
		{name: "bad API key", status: 401, wantMsg: "the model server rejected the API key (401)", wantRequests: 1},
		{name: "forbidden", status: 403, wantMsg: "the model server refused access (403)", wantRequests: 1},
		{
			name: "unknown model, OpenAI", status: 404,
			body:    `{"error":{"message":"The model ` + "`x`" + ` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}`,
			wantMsg: `model "m" was not found on the model server`, wantRequests: 1,
		},
		{
			name: "unknown model, Ollama", status: 404,
			body:    `{"error":{"message":"model \"m\" not found, try pulling it first","type":"api_error","param":null,"code":null}}`,
			wantMsg: `model "m" was not found on the model server`, wantRequests: 1,
		},
		{
			name: "unknown model, old vLLM", status: 404,
			body:    `{"object":"error","message":"The model ` + "`m`" + ` does not exist.","type":"NotFoundError","param":null,"code":404}`,
			wantMsg: `model "m" was not found on the model server`, wantRequests: 1,
		},
		{
			name: "wrong base URL", status: 404, body: "404 page not found\n",
			wantMsg: "the model server has no chat completions endpoint at the configured base URL (404)", wantRequests: 1,
		},
		{
			name: "bad request shows the detail", status: 400,
			body:    `{"error":{"message":"This model's maximum context length is 8192 tokens.\nPlease reduce the length.","type":"invalid_request_error","code":"context_length_exceeded"}}`,
			wantMsg: "the model server rejected the request (400): This model's maximum context length is 8192 tokens. Please reduce the length.", wantRequests: 1,
		},
		{
			name: "bad request from FastAPI shows the detail", status: 400,
			body:    `{"detail":"max_tokens must be at least 1, got -5."}`,
			wantMsg: "the model server rejected the request (400): max_tokens must be at least 1, got -5.", wantRequests: 1,
		},
		{
			name: "bad request in plain text shows it", status: 400, body: "Invalid value for max_tokens:\n -1\n",
			wantMsg: "the model server rejected the request (400): Invalid value for max_tokens: -1", wantRequests: 1,
		},
		{
			name: "out of quota is not retried", status: 429,
			body:    `{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}`,
			wantMsg: "the model server account has run out of quota (429)", wantRequests: 1,
		},
		{name: "rate limited, retries exhausted", status: 429, retryAfter: "1", wantMsg: "the model server is rate limiting requests (429)", wantRequests: 3},
		{name: "500, retries exhausted", status: 500, wantMsg: "the model server failed (500)", wantRequests: 3},
		{name: "502, retries exhausted", status: 502, wantMsg: "the model server failed (502)", wantRequests: 3, wantUnavailable: true},
		{name: "503, retries exhausted", status: 503, wantMsg: "the model server failed (503)", wantRequests: 3, wantUnavailable: true},
		{name: "501 is not retried", status: 501, body: "no", wantMsg: "the model server failed (501)", wantRequests: 1},
		{
			name: "a proxy's HTML error page", status: 502, body: "<html><body><h1>502 Bad Gateway</h1>nginx</body></html>",
			wantMsg: "the model server failed (502)", wantRequests: 3, wantUnavailable: true,
		},
		{
			name: "an HTML page is not shown", status: 400, body: "<html>" + strings.Repeat("x", 5000) + "</html>",
			wantMsg: "the model server rejected the request (400)", wantRequests: 1,
		},
		{
			name: "a detail echoing the key", status: 400,
			body:    `{"error":{"message":"Bearer ` + testKey + ` is bad; context too long","code":400}}`,
			wantMsg: "the model server rejected the request (400): Bearer [redacted] is bad; context too long", wantRequests: 1,
		},
		{name: "no content", status: 204, body: "", wantMsg: "the model server answered with unexpected status 204", wantRequests: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := newFakeServer(t, func(_ int, w http.ResponseWriter, r *http.Request) {
				if tt.retryAfter != "" {
					w.Header().Set("Retry-After", tt.retryAfter)
				}
				if tt.body != "" || tt.status == 204 {
					w.WriteHeader(tt.status)
					io.WriteString(w, tt.body)
					return
				}
				// Some proxies echo what they were sent.
				writeError(w, tt.status, "Incorrect API key provided: "+r.Header.Get("Authorization"), "invalid_api_key")
			})
			f := newFixture(t, srv.baseURL(), nil)
			got, _, err := f.stream(t)
			pe := wantProviderError(t, err, tt.wantMsg)
			if n := srv.requests.Load(); n != tt.wantRequests {
				t.Errorf("%d requests, want %d", n, tt.wantRequests)
			}
			if len(got) != 0 {
				t.Errorf("emitted %q", got)
			}
			if is := errors.Is(pe, provider.ErrUnavailable); is != tt.wantUnavailable {
				t.Errorf("errors.Is(ErrUnavailable) = %v, want %v", is, tt.wantUnavailable)
			}
			mustNotLeak(t, "log", f.logs.String())
		})
	}
}

// A base URL without its /v1 (http://127.0.0.1:11434) is the commonest
// mistake: the 404 says what to try instead.
func TestStreamBaseURLWithoutV1(t *testing.T) {
	const noEndpoint = "the model server has no chat completions endpoint at the configured base URL (404)"
	const lmStudio = "the model server reported an error: Unexpected endpoint or method. (POST /chat/completions)"
	for name, tt := range map[string]struct {
		status int
		body   string
		msg    string // without the hint
	}{
		"Ollama": {404, "404 page not found\n", noEndpoint},
		"vLLM":   {404, `{"detail":"Not Found"}`, noEndpoint},
		// LM Studio answers 200 to any path it does not serve.
		"LM Studio": {200, `{"error":"Unexpected endpoint or method. (POST /chat/completions)"}`, lmStudio},
	} {
		t.Run(name, func(t *testing.T) {
			srv := newFakeServer(t, func(_ int, w http.ResponseWriter, r *http.Request) {
				if r.URL.Path == "/v1/chat/completions" {
					writeSSE(t, w, contentChunk("ok"), doneEvent)
					return
				}
				w.WriteHeader(tt.status)
				io.WriteString(w, tt.body)
			})
			for _, base := range []string{srv.URL, srv.URL + "/"} {
				f := newFixture(t, base, nil)
				_, _, err := f.stream(t)
				wantProviderError(t, err, tt.msg+": try "+srv.URL+"/v1")
			}
			// Elsewhere than at the root, the base URL is not guessed at.
			f := newFixture(t, srv.URL+"/api", nil)
			_, _, err := f.stream(t)
			wantProviderError(t, err, tt.msg)
		})
	}
}

func TestStreamRetriesBeforeFirstToken(t *testing.T) {
	backoff0 := func(d time.Duration) bool { return d >= backoffBase/2 && d <= backoffBase }
	tests := []struct {
		name      string
		fail      func(t testing.TB, w http.ResponseWriter) // the first request
		wantSleep func(time.Duration) bool
	}{
		{
			name: "429 with Retry-After seconds",
			fail: func(_ testing.TB, w http.ResponseWriter) {
				w.Header().Set("Retry-After", "2")
				writeError(w, 429, "Rate limit reached", "rate_limit_exceeded")
			},
			wantSleep: func(d time.Duration) bool { return d == 2*time.Second },
		},
		{
			name: "429 with Retry-After date",
			fail: func(_ testing.TB, w http.ResponseWriter) {
				w.Header().Set("Retry-After", testNow.Add(5*time.Second).Format(http.TimeFormat))
				writeError(w, 429, "Rate limit reached", "rate_limit_exceeded")
			},
			wantSleep: func(d time.Duration) bool { return d == 5*time.Second },
		},
		{
			name: "429 with a long Retry-After is capped",
			fail: func(_ testing.TB, w http.ResponseWriter) {
				w.Header().Set("Retry-After", "3600")
				writeError(w, 429, "Rate limit reached", "rate_limit_exceeded")
			},
			wantSleep: func(d time.Duration) bool { return d == MaxRetryAfter },
		},
		{
			name:      "429 without Retry-After",
			fail:      func(_ testing.TB, w http.ResponseWriter) { writeError(w, 429, "slow down", "") },
			wantSleep: backoff0,
		},
		{name: "500", fail: func(_ testing.TB, w http.ResponseWriter) { w.WriteHeader(500) }, wantSleep: backoff0},
		{name: "502", fail: func(_ testing.TB, w http.ResponseWriter) { w.WriteHeader(502) }, wantSleep: backoff0},
		{
			name: "503 with Retry-After",
			fail: func(_ testing.TB, w http.ResponseWriter) {
				w.Header().Set("Retry-After", "3")
				w.WriteHeader(503)
			},
			wantSleep: func(d time.Duration) bool { return d == 3*time.Second },
		},
		{name: "connection reset before the response", fail: resetConn, wantSleep: backoff0},
		{
			name: "connection reset after the role chunk",
			fail: func(t testing.TB, w http.ResponseWriter) {
				writeSSE(t, w, roleChunk)
				resetConn(t, w)
			},
			wantSleep: backoff0,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := newFakeServer(t, func(n int, w http.ResponseWriter, _ *http.Request) {
				if n == 1 {
					tt.fail(t, w)
					return
				}
				writeSSE(t, w, roleChunk, contentChunk("ok"), finishChunk, doneEvent)
			})
			f := newFixture(t, srv.baseURL(), nil)
			got, _, err := f.stream(t)
			if err != nil {
				t.Fatalf("Stream: %v", err)
			}
			if !slices.Equal(got, []string{"ok"}) {
				t.Errorf("emitted %q, want [ok]", got)
			}
			if n := srv.requests.Load(); n != 2 {
				t.Errorf("%d requests, want 2", n)
			}
			sleeps := f.sleeps.got()
			if len(sleeps) != 1 || !tt.wantSleep(sleeps[0]) {
				t.Errorf("slept %v", sleeps)
			}
		})
	}
}

// Cancelling during the wait a Retry-After asked for returns at once,
// without another request.
func TestStreamCancelDuringRetryWait(t *testing.T) {
	srv := newFakeServer(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Retry-After", "20")
		writeError(w, 429, "slow down", "rate_limit_exceeded")
	})
	f := newFixture(t, srv.baseURL(), func(c *Config) { c.Sleep = sleep })
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, _, err := f.streamCtx(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Stream = %v, want context.DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Stream returned after %v, not when cancelled", d)
	}
	if n := srv.requests.Load(); n != 1 {
		t.Errorf("%d requests, want 1", n)
	}
}

func TestStreamBackoffGrows(t *testing.T) {
	srv := newFakeServer(t, func(_ int, w http.ResponseWriter, _ *http.Request) { w.WriteHeader(503) })
	f := newFixture(t, srv.baseURL(), func(c *Config) { c.MaxRetries = 4 })
	_, _, err := f.stream(t)
	wantProviderError(t, err, "the model server failed (503)")
	sleeps := f.sleeps.got()
	if len(sleeps) != 4 {
		t.Fatalf("slept %v, want 4 waits", sleeps)
	}
	for i, d := range sleeps {
		ceil := backoffBase << i
		if d < ceil/2 || d > ceil {
			t.Errorf("wait %d = %v, want in [%v, %v]", i, d, ceil/2, ceil)
		}
	}
}

func TestStreamNoRetries(t *testing.T) {
	srv := newFakeServer(t, func(_ int, w http.ResponseWriter, _ *http.Request) { w.WriteHeader(502) })
	f := newFixture(t, srv.baseURL(), func(c *Config) { c.MaxRetries = -1 })
	_, _, err := f.stream(t)
	wantProviderError(t, err, "the model server failed (502)")
	if n := srv.requests.Load(); n != 1 {
		t.Errorf("%d requests, want 1", n)
	}
}

func TestStreamBrokenStream(t *testing.T) {
	tests := []struct {
		name      string
		respond   func(t testing.TB, w http.ResponseWriter)
		want      []string // emitted, and kept by the caller
		wantMsg   string
		wantUsage *chat.Usage // reported with the error
	}{
		{
			name: "connection reset mid-answer",
			respond: func(t testing.TB, w http.ResponseWriter) {
				writeSSE(t, w, roleChunk, contentChunk("Hel"), contentChunk("lo"))
				resetConn(t, w)
			},
			want:    []string{"Hel", "lo"},
			wantMsg: "the connection to the model server was lost mid-answer",
		},
		{
			name: "clean close mid-answer",
			respond: func(t testing.TB, w http.ResponseWriter) {
				writeSSE(t, w, roleChunk, contentChunk("Hel"))
			},
			want:    []string{"Hel"},
			wantMsg: "the connection to the model server was lost mid-answer",
		},
		{
			name: "close mid-line",
			respond: func(t testing.TB, w http.ResponseWriter) {
				writeSSE(t, w, contentChunk("Hel"), contentChunk("lo")[:20])
			},
			want:    []string{"Hel"},
			wantMsg: "the connection to the model server was lost mid-answer",
		},
		{
			name: "malformed JSON chunk",
			respond: func(t testing.TB, w http.ResponseWriter) {
				writeSSE(t, w, roleChunk, contentChunk("Hel"), `data: {"choices":[{"index":0,"delta":{"content":"lo"}`+"\n\n", doneEvent)
			},
			want:    []string{"Hel"},
			wantMsg: msgMalformed,
		},
		{
			name: "malformed before the first token is not retried",
			respond: func(t testing.TB, w http.ResponseWriter) {
				writeSSE(t, w, "data: 42\n\n", doneEvent)
			},
			wantMsg: msgMalformed,
		},
		{
			name: "an event over 1 MiB",
			respond: func(t testing.TB, w http.ResponseWriter) {
				writeSSE(t, w, contentChunk("Hel"), contentChunk(strings.Repeat("x", maxEventBytes)), doneEvent)
			},
			want:    []string{"Hel"},
			wantMsg: msgEventTooLarge,
		},
		{
			name: "error event mid-answer",
			respond: func(t testing.TB, w http.ResponseWriter) {
				writeSSE(t, w, contentChunk("Hel"), "event: error\n"+`data: {"error":{"message":"CUDA out of memory","type":"InternalServerError","code":500}}`+"\n\n")
			},
			want:    []string{"Hel"},
			wantMsg: "the model server reported an error: CUDA out of memory",
		},
		{
			// llama.cpp server, which still sends [DONE] after it.
			name: "error field mid-answer",
			respond: func(t testing.TB, w http.ResponseWriter) {
				writeSSE(t, w, contentChunk("Hel"),
					`error: {"code":500,"message":"the request exceeds the available context size, try increasing it","type":"exceed_context_size_error"}`+"\n\n",
					doneEvent)
			},
			want:    []string{"Hel"},
			wantMsg: "the model server reported an error: the request exceeds the available context size, try increasing it",
		},
		{
			// vLLM with continuous usage stats counts every chunk: the
			// tokens spent before the error stay counted.
			name: "error event after usage",
			respond: func(t testing.TB, w http.ResponseWriter) {
				writeSSE(t, w, `data: {"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}`+"\n\n",
					"event: error\n"+`data: {"error":{"message":"CUDA out of memory","type":"InternalServerError","code":500}}`+"\n\n")
			},
			want:      []string{"Hel"},
			wantMsg:   "the model server reported an error: CUDA out of memory",
			wantUsage: &chat.Usage{PromptTokens: 9, CompletionTokens: 1},
		},
		{
			name: "error event with a flat error object",
			respond: func(t testing.TB, w http.ResponseWriter) {
				writeSSE(t, w, contentChunk("Hel"), "event: error\n"+`data: {"message":"CUDA out of memory","type":"server_error","code":500}`+"\n\n", doneEvent)
			},
			want:    []string{"Hel"},
			wantMsg: "the model server reported an error: CUDA out of memory",
		},
		{
			// Older vLLM and FastChat, in place of a chunk.
			name: "an error object as a chunk",
			respond: func(t testing.TB, w http.ResponseWriter) {
				writeSSE(t, w, contentChunk("Hel"), `data: {"object":"error","message":"CUDA out of memory","type":"InternalServerError","param":null,"code":500}`+"\n\n", doneEvent)
			},
			want:    []string{"Hel"},
			wantMsg: "the model server reported an error: CUDA out of memory",
		},
		{
			name: "error event in plain text",
			respond: func(t testing.TB, w http.ResponseWriter) {
				writeSSE(t, w, contentChunk("Hel"), "event: error\ndata: upstream reset\n\n", doneEvent)
			},
			want:    []string{"Hel"},
			wantMsg: "the model server reported an error: upstream reset",
		},
		{
			// vLLM, when its engine drops a request (shutdown, sleep, an
			// abort): [DONE] follows as after a whole answer.
			name: "finish_reason abort",
			respond: func(t testing.TB, w http.ResponseWriter) {
				writeSSE(t, w, roleChunk, contentChunk("Hel"),
					`data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":"abort","stop_reason":null}]}`+"\n\n",
					usageChunk, doneEvent)
			},
			want:      []string{"Hel"},
			wantMsg:   `the model server broke off the answer (finish_reason "abort")`,
			wantUsage: &chat.Usage{PromptTokens: 9, CompletionTokens: 3}, // spent all the same
		},
		{
			// OpenRouter's finish_reason for a failed answer, here
			// without the error object it usually comes with.
			name: "finish_reason error",
			respond: func(t testing.TB, w http.ResponseWriter) {
				writeSSE(t, w, contentChunk("Hel"), `data: {"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"error"}]}`+"\n\n", doneEvent)
			},
			want:    []string{"Hel", "lo"},
			wantMsg: `the model server broke off the answer (finish_reason "error")`,
		},
		{
			// A reasoning model that spent the server's output limit
			// thinking (vLLM, llama.cpp): nothing to show but an empty
			// answer.
			name: "finish_reason length before any text",
			respond: func(t testing.TB, w http.ResponseWriter) {
				writeSSE(t, w, roleChunk,
					`data: {"choices":[{"index":0,"delta":{"reasoning_content":"Let me think"},"finish_reason":null}]}`+"\n\n",
					`data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}`+"\n\n",
					usageChunk, doneEvent)
			},
			wantMsg:   `the model reached its output limit before any answer text (finish_reason "length")`,
			wantUsage: &chat.Usage{PromptTokens: 9, CompletionTokens: 3}, // the thinking is paid for
		},
		{
			name: "finish_reason content_filter before any text",
			respond: func(t testing.TB, w http.ResponseWriter) {
				writeSSE(t, w, roleChunk, `data: {"choices":[{"index":0,"delta":{},"finish_reason":"content_filter"}]}`+"\n\n")
			},
			wantMsg: `the model server's content filter withheld the answer (finish_reason "content_filter")`,
		},
		{
			name: "error event before the first token is not retried",
			respond: func(t testing.TB, w http.ResponseWriter) {
				writeSSE(t, w, roleChunk, `error: {"code":503,"message":"Loading model","type":"unavailable_error"}`+"\n\n", doneEvent)
			},
			wantMsg: "the model server reported an error: Loading model",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := newFakeServer(t, func(_ int, w http.ResponseWriter, _ *http.Request) { tt.respond(t, w) })
			f := newFixture(t, srv.baseURL(), nil)
			got, res, err := f.stream(t)
			wantProviderError(t, err, tt.wantMsg)
			if !slices.Equal(got, tt.want) {
				t.Errorf("emitted %q, want %q", got, tt.want)
			}
			if !equalUsage(res.Usage, tt.wantUsage) {
				t.Errorf("usage %+v, want %+v", res.Usage, tt.wantUsage)
			}
			if n := srv.requests.Load(); n != 1 {
				t.Errorf("%d requests, want 1 (no retry)", n)
			}
		})
	}
}

func TestStreamTimeouts(t *testing.T) {
	const limit = 50 * time.Millisecond
	tests := []struct {
		name    string
		respond func(t testing.TB, w http.ResponseWriter)
		want    []string
		wantMsg string
	}{
		{
			name:    "no response headers",
			respond: func(testing.TB, http.ResponseWriter) {},
			wantMsg: "the model server did not start answering within 50ms",
		},
		{
			name:    "role chunk then nothing",
			respond: func(t testing.TB, w http.ResponseWriter) { writeSSE(t, w, roleChunk, ": keep-alive\n\n") },
			wantMsg: "the model server did not start answering within 50ms",
		},
		{
			name:    "silent mid-answer",
			respond: func(t testing.TB, w http.ResponseWriter) { writeSSE(t, w, roleChunk, contentChunk("Hel")) },
			want:    []string{"Hel"},
			wantMsg: "the model server stopped sending tokens for 50ms",
		},
		{
			name: "silent in a whole JSON answer",
			respond: func(t testing.TB, w http.ResponseWriter) {
				w.Header().Set("Content-Type", "application/json")
				_, _ = io.WriteString(w, `{"choices":[{"index":0,"message":{"content":"Hel`)
				w.(http.Flusher).Flush()
			},
			wantMsg: "the model server did not start answering within 50ms",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := newFakeServer(t, func(_ int, w http.ResponseWriter, r *http.Request) {
				tt.respond(t, w)
				<-r.Context().Done() // until the client gives up
			})
			f := newFixture(t, srv.baseURL(), func(c *Config) {
				c.FirstTokenTimeout = limit
				c.IdleTimeout = limit
			})
			got, _, err := f.stream(t)
			wantProviderError(t, err, tt.wantMsg)
			if !slices.Equal(got, tt.want) {
				t.Errorf("emitted %q, want %q", got, tt.want)
			}
			if n := srv.requests.Load(); n != 1 {
				t.Errorf("%d requests, want 1 (no retry)", n)
			}
		})
	}
}

// TestStreamConnectTimeout points at a server that accepts TCP connections
// but never completes the TLS handshake.
func TestStreamConnectTimeout(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns []net.Conn // guarded by mu
	)
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	})
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
		for _, c := range conns {
			c.Close()
		}
	})
	f := newFixture(t, "https://"+ln.Addr().String()+"/v1", func(c *Config) {
		c.ConnectTimeout = 50 * time.Millisecond
		c.HTTPClient = &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{}}}
	})
	_, _, err = f.stream(t)
	pe := wantProviderError(t, err, "could not connect to the model server within 50ms")
	if !errors.Is(pe, provider.ErrUnavailable) {
		t.Errorf("error does not wrap ErrUnavailable: %v", err)
	}
	if got := len(f.sleeps.got()); got != DefaultMaxRetries {
		t.Errorf("%d retries, want %d", got, DefaultMaxRetries)
	}
}

func TestStreamServerDown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens there now
	// The key in the URL too (as some gateways want it) must not show in
	// url.Error's text.
	f := newFixture(t, "http://"+addr+"/v1?api-key="+testKey, nil)
	_, _, err = f.stream(t)
	pe := wantProviderError(t, err, "could not connect to the model server")
	if !errors.Is(pe, provider.ErrUnavailable) {
		t.Errorf("error does not wrap ErrUnavailable: %v", err)
	}
	if !strings.Contains(err.Error(), "[redacted]") {
		t.Errorf("error %q: want the URL shown with the key redacted", err)
	}
	if got := len(f.sleeps.got()); got != DefaultMaxRetries {
		t.Errorf("%d retries, want %d", got, DefaultMaxRetries)
	}
	mustNotLeak(t, "log", f.logs.String())
}

func TestRetryAfter(t *testing.T) {
	f := newFixture(t, "http://127.0.0.1:1/v1", nil)
	tests := []struct {
		in   string
		want time.Duration
	}{
		{"", 0},
		{"0", 0},
		{"-5", 0},
		{"7", 7 * time.Second},
		{" 7 ", 7 * time.Second},
		{"30", MaxRetryAfter},
		{"99999999999999999", MaxRetryAfter},
		{"soon", 0},
		{testNow.Add(12 * time.Second).Format(http.TimeFormat), 12 * time.Second},
		{testNow.Add(-time.Hour).Format(http.TimeFormat), 0},
		{testNow.Add(time.Hour).Format(http.TimeFormat), MaxRetryAfter},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			if got := f.p.retryAfter(tt.in); got != tt.want {
				t.Errorf("retryAfter(%q) = %v, want %v", tt.in, got, tt.want)
			}
		})
	}
}

func TestErrorDetail(t *testing.T) {
	tests := []struct {
		name, body, wantDetail, wantCode string
	}{
		{"openai", `{"error":{"message":"bad","type":"invalid_request_error","code":"model_not_found"}}`, "bad", "model_not_found"},
		{"numeric code", `{"error":{"message":"bad","code":404}}`, "bad", "404"},
		{"type as code", `{"error":{"message":"bad","type":"not_found_error"}}`, "bad", "not_found_error"},
		{"flat string", `{"error":"model 'x' not found"}`, "model 'x' not found", ""},
		{"old vLLM", `{"object":"error","message":"bad","code":400}`, "bad", "400"},
		{"null error", `{"error":null,"message":"m"}`, "m", ""},
		{"FastAPI string", `{"detail":"max_tokens must be at least 1, got -5."}`, "max_tokens must be at least 1, got -5.", ""},
		{"FastAPI validation errors", `{"detail":[{"type":"greater_than","loc":["body","max_tokens"],"msg":"Input should be greater than 0","input":-5},{"loc":["body"],"msg":"bad body"},{"loc":["query",0],"msg":"x"}]}`, "max_tokens: Input should be greater than 0; bad body; x", ""},
		{"FastAPI detail of another shape", `{"detail":{"a":1}}`, "", ""},
		{"FastAPI validation error of a nested field", `{"detail":[{"loc":["body","messages",0,"name"],"msg":"Extra inputs are not permitted"}]}`, "messages.0.name: Extra inputs are not permitted", ""},
		// Mistral's API, as it has answered over time.
		{"Mistral, validation errors in message", `{"object":"error","message":{"detail":[{"type":"extra_forbidden","loc":["body","stream_options","include_usage"],"msg":"Extra inputs are not permitted","input":true}]},"type":"invalid_request_error","param":null,"code":null}`, "stream_options.include_usage: Extra inputs are not permitted", ""},
		{"Mistral, validation errors as a list", `{"object":"Error","detail":[{"type":"extra_forbidden","loc":["body","tools"],"msg":"Extra inputs are not permitted","input":[]}],"message":[{"type":"extra_forbidden","loc":["body","tools"],"msg":"Extra inputs are not permitted","input":[]}],"type":"invalid_request_error","code":3001}`, "tools: Extra inputs are not permitted", "3001"},
		{"Mistral, validation errors as JSON text", `{"object":"error","message":"{\"detail\":[{\"type\":\"extra_forbidden\",\"loc\":[\"body\",\"frequency_penalty\"],\"msg\":\"Extra inputs are not permitted\",\"input\":0.0}]}","type":"internal_error_proxy","param":null,"code":"1000"}`, "frequency_penalty: Extra inputs are not permitted", "1000"},
		{"error message as an object", `{"error":{"message":{"message":"inner"},"code":"c"}}`, "inner", "c"},
		{"message as a number", `{"message":42,"detail":"d"}`, "d", ""},
		{"message before detail", `{"message":"m","detail":"d"}`, "m", ""},
		{"not JSON", `Bad Gateway`, "", ""},
		{"white space", `{"error":{"message":" a\n\tb  "}}`, "a b", ""},
		{"long", `{"error":{"message":"` + strings.Repeat("é", 400) + `"}}`, strings.Repeat("é", 150) + "…", ""},
		// The key is redacted before the cut, which would split it.
		{"secret across the cut", `{"error":{"message":"` + strings.Repeat("x", 290) + ` sk-secret-0123456789"}}`, strings.Repeat("x", 290) + " [redacted…", ""},
		{"secret in a header's value", `{"error":{"message":"Incorrect API key provided: hdr-token-0123456789."}}`, "Incorrect API key provided: [redacted].", ""},
	}
	p, err := New(Config{BaseURL: "http://127.0.0.1:1/v1", APIKey: "sk-secret-0123456789", Headers: map[string]string{"Authorization": "Bearer hdr-token-0123456789"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			detail, code := p.errorDetail([]byte(tt.body))
			if detail != tt.wantDetail || code != tt.wantCode {
				t.Errorf("errorDetail = %q, %q; want %q, %q", detail, code, tt.wantDetail, tt.wantCode)
			}
		})
	}
}
