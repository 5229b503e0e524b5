package openai

import (
	"compress/gzip"
	"encoding/json"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/provider"
)

// Azure OpenAI before api-version 2024-09-01, and some relays, refuse
// stream_options with a 400. The request is made again at once without
// it, and no later request carries it.
func TestStreamWithoutStreamOptions(t *testing.T) {
	type refusal struct {
		status int
		body   string
	}
	for name, refusal := range map[string]refusal{
		"OpenAI's param":    {400, `{"error":{"message":"Unknown parameter: 'stream_options'.","type":"invalid_request_error","param":"stream_options","code":"unknown_parameter"}}`},
		"Azure's message":   {400, `{"error":{"message":"Unrecognized request argument supplied: stream_options","type":"invalid_request_error","param":null,"code":null}}`},
		"a flat error body": {400, `{"object":"error","message":"extra field not permitted","type":"BadRequestError","param":"stream_options","code":400}`},
		"FastAPI's 422":     {422, `{"detail":[{"type":"extra_forbidden","loc":["body","stream_options"],"msg":"Extra inputs are not permitted"}]}`},
		// Mistral's API: FastAPI's validation errors inside "message".
		"Mistral's 422": {422, `{"object":"error","message":{"detail":[{"type":"extra_forbidden","loc":["body","stream_options","include_usage"],"msg":"Extra inputs are not permitted","input":true,"url":"https://errors.pydantic.dev/2.10/v/extra_forbidden"}]},"type":"invalid_request_error","param":null,"code":null}`},
	} {
		t.Run(name, func(t *testing.T) {
			var (
				mu          sync.Mutex
				withOptions []bool // guarded by mu
			)
			srv := newFakeServer(t, func(_ int, w http.ResponseWriter, r *http.Request) {
				var body map[string]any
				if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
					t.Errorf("decode request: %v", err)
				}
				_, has := body["stream_options"]
				mu.Lock()
				withOptions = append(withOptions, has)
				mu.Unlock()
				if has {
					w.Header().Set("Content-Type", "application/json")
					w.WriteHeader(refusal.status)
					io.WriteString(w, refusal.body)
					return
				}
				writeSSE(t, w, contentChunk("a"), finishChunk, doneEvent)
			})
			f := newFixture(t, srv.URL+"/openai/deployments/gpt4o?api-version=2024-02-01", func(c *Config) {
				c.APIKey = ""
				c.Headers = map[string]string{"api-key": "azure-key-123456"}
			})
			for turn := range 2 {
				got, res, err := f.stream(t)
				if err != nil {
					t.Fatalf("turn %d: Stream: %v", turn+1, err)
				}
				if !slices.Equal(got, []string{"a"}) {
					t.Errorf("turn %d: emitted %q, want [a]", turn+1, got)
				}
				if res.Usage != nil {
					t.Errorf("turn %d: usage %+v, want none", turn+1, res.Usage)
				}
			}
			mu.Lock()
			if want := []bool{true, false, false}; !slices.Equal(withOptions, want) {
				t.Errorf("requests with stream_options: %v, want %v", withOptions, want)
			}
			mu.Unlock()
			if sleeps := f.sleeps.got(); len(sleeps) != 0 {
				t.Errorf("slept %v before asking again", sleeps)
			}
			if n := strings.Count(f.logs.String(), "refuses stream_options"); n != 1 {
				t.Errorf("logged the refusal %d times, want once:\n%s", n, f.logs)
			}
		})
	}
}

// Usage sent without stream_options having asked for it is still read.
func TestStreamWithoutStreamOptionsUsage(t *testing.T) {
	srv := newFakeServer(t, func(_ int, w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if strings.Contains(string(body), "stream_options") {
			writeError(w, http.StatusBadRequest, "Unrecognized request argument supplied: stream_options", "")
			return
		}
		writeSSE(t, w, contentChunk("a"), finishChunk, usageChunk, doneEvent)
	})
	f := newFixture(t, srv.baseURL(), nil)
	_, res, err := f.stream(t)
	if err != nil {
		t.Fatalf("Stream: %v", err)
	}
	if want := (&chat.Usage{PromptTokens: 9, CompletionTokens: 3}); !equalUsage(res.Usage, want) {
		t.Errorf("usage %+v, want %+v", res.Usage, want)
	}
}

// A server that refuses the request for another reason after stream_options
// was dropped, or refuses something else, is not asked again.
func TestStreamRefusalNotAboutStreamOptions(t *testing.T) {
	tests := []struct {
		name, body, wantMsg string
		wantRequests        int32
	}{
		{
			name:         "another parameter",
			body:         `{"error":{"message":"Unknown parameter: 'foo'.","type":"invalid_request_error","param":"foo","code":"unknown_parameter"}}`,
			wantMsg:      "the model server rejected the request (400): Unknown parameter: 'foo'.",
			wantRequests: 1,
		},
		{
			name:         "stream_options blamed again without it",
			body:         `{"error":{"message":"stream_options is not supported with this model","param":"stream_options"}}`,
			wantMsg:      "the model server rejected the request (400): stream_options is not supported with this model",
			wantRequests: 2,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := newFakeServer(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusBadRequest)
				io.WriteString(w, tt.body)
			})
			f := newFixture(t, srv.baseURL(), nil)
			_, _, err := f.stream(t)
			wantProviderError(t, err, tt.wantMsg)
			if n := srv.requests.Load(); n != tt.wantRequests {
				t.Errorf("%d requests, want %d", n, tt.wantRequests)
			}
		})
	}
}

// A 200 that holds no event stream (a captive portal's or a web app's HTML
// page, a misrouted proxy) is a malformed stream, not a lost connection,
// and is not asked for again.
func TestStreamNotAnEventStream(t *testing.T) {
	tests := []struct {
		name, ctype, body string
		wantMsg           string
		wantRequests      int32
	}{
		{
			name: "an HTML page", ctype: "text/html; charset=utf-8",
			body:    "<!doctype html><html><head><title>Open WebUI</title></head><body></body></html>\n",
			wantMsg: msgMalformed, wantRequests: 1,
		},
		{
			name: "an HTML page without a final newline", ctype: "text/html",
			body:    "<html>\n<body>Sign in to continue</body>\n</html>",
			wantMsg: msgMalformed, wantRequests: 1,
		},
		{
			name: "plain text labelled an event stream", ctype: "text/event-stream",
			body:    "upstream connect error or disconnect/reset before headers",
			wantMsg: msgMalformed, wantRequests: 1,
		},
		{
			// Nothing but keep-alives: a connection lost, worth retrying.
			name: "comments and blank lines only", ctype: "text/event-stream",
			body:    ": keep-alive\n\n\n",
			wantMsg: "the connection to the model server was lost before it answered", wantRequests: 3,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := newFakeServer(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
				w.Header().Set("Content-Type", tt.ctype)
				io.WriteString(w, tt.body)
			})
			f := newFixture(t, srv.baseURL(), nil)
			_, _, err := f.stream(t)
			pe := wantProviderError(t, err, tt.wantMsg)
			if n := srv.requests.Load(); n != tt.wantRequests {
				t.Errorf("%d requests, want %d", n, tt.wantRequests)
			}
			if tt.wantMsg == msgMalformed && !strings.Contains(pe.Error(), tt.ctype) {
				t.Errorf("error %q does not name the Content-Type %q", pe, tt.ctype)
			}
		})
	}
}

// A whole chat.completion labelled text/event-stream is read as the answer
// it is.
func TestStreamJSONAnswerLabelledEventStream(t *testing.T) {
	srv := newFakeServer(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, `{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there."},"finish_reason":"stop"}]}`)
	})
	f := newFixture(t, srv.baseURL(), nil)
	got, _, err := f.stream(t)
	if err != nil {
		t.Fatalf("Stream: %v", err)
	}
	if !slices.Equal(got, []string{"Hello there."}) {
		t.Errorf("emitted %q, want [Hello there.]", got)
	}
}

// A redirect is reported, not followed: following it would send the extra
// headers (secrets) to another host, and replay a POST as a GET after a
// 301 or 302. The query of its target, which may hold a secret, is not
// shown.
func TestStreamRedirect(t *testing.T) {
	other := newFakeServer(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
		writeSSE(t, w, contentChunk("a"), doneEvent)
	})
	// localhost and 127.0.0.1: two hosts to net/http's redirect policy.
	otherURL := strings.Replace(other.URL, "127.0.0.1", "localhost", 1)
	tests := []struct {
		name     string
		status   int
		location string // "/…": on the same server
		wantMsg  string
	}{
		{
			name: "the endpoint moved", status: http.StatusMovedPermanently,
			location: "/v1/chat/completions",
			wantMsg:  "the model server redirected to {srv}/v1 (301): use it as --openai-base-url",
		},
		{
			name: "to another host, with a secret in the query", status: http.StatusTemporaryRedirect,
			location: otherURL + "/openai/v1/chat/completions/?api-key=secret-in-query-123&x=1",
			wantMsg:  "the model server redirected to " + otherURL + "/openai/v1 (307): use it as --openai-base-url",
		},
		{
			name: "to a login page", status: http.StatusFound,
			location: otherURL + "/sso/login?next=%2Fv1",
			wantMsg:  "the model server redirected to " + otherURL + "/sso/login (302)",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var (
				mu      sync.Mutex
				methods []string // guarded by mu
			)
			srv := newFakeServer(t, func(_ int, w http.ResponseWriter, r *http.Request) {
				mu.Lock()
				methods = append(methods, r.Method+" "+r.URL.Path)
				mu.Unlock()
				if strings.HasPrefix(r.URL.Path, "/old/") {
					http.Redirect(w, r, tt.location, tt.status)
					return
				}
				w.WriteHeader(http.StatusMethodNotAllowed)
			})
			f := newFixture(t, srv.URL+"/old/v1", func(c *Config) {
				c.Headers = map[string]string{"api-key": "azure-secret-123456"}
			})
			_, _, err := f.stream(t)
			pe := wantProviderError(t, err, strings.Replace(tt.wantMsg, "{srv}", srv.URL, 1))
			if strings.Contains(pe.Error(), "secret-in-query") {
				t.Errorf("error %q shows the redirect's query", pe)
			}
			mu.Lock()
			if want := []string{"POST /old/v1/chat/completions"}; !slices.Equal(methods, want) {
				t.Errorf("requests %q, want %q", methods, want)
			}
			mu.Unlock()
			if n := other.requests.Load(); n != 0 {
				t.Errorf("the other host got %d requests", n)
			}
		})
	}
}

// A client given in Config does not follow redirects either, and is not
// changed.
func TestStreamRedirectWithOwnClient(t *testing.T) {
	srv := newFakeServer(t, func(_ int, w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/old/") {
			http.Redirect(w, r, "/v1/chat/completions", http.StatusPermanentRedirect)
			return
		}
		writeSSE(t, w, contentChunk("a"), doneEvent)
	})
	client := &http.Client{}
	f := newFixture(t, srv.URL+"/old/v1", func(c *Config) { c.HTTPClient = client })
	_, _, err := f.stream(t)
	wantProviderError(t, err, "the model server redirected to "+srv.URL+"/v1 (308): use it as --openai-base-url")
	if client.CheckRedirect != nil {
		t.Error("the given client's CheckRedirect was changed")
	}
}

// A proxy that compresses the event stream: it is decoded, and still
// streams, the first token emitted before the server has sent the rest.
func TestStreamGzip(t *testing.T) {
	release := make(chan struct{})
	srv := newFakeServer(t, func(_ int, w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("Content-Encoding", "gzip")
		w.WriteHeader(http.StatusOK)
		gz := gzip.NewWriter(w)
		io.WriteString(gz, contentChunk("a"))
		gz.Flush()
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		io.WriteString(gz, contentChunk("b")+doneEvent)
		gz.Close()
	})
	f := newFixture(t, srv.baseURL(), nil)
	var got []string
	req := provider.Request{Messages: []provider.Message{{Role: "user", Content: "hi"}}}
	_, err := f.p.Stream(t.Context(), req, func(s string) error {
		got = append(got, s)
		if s == "a" {
			close(release)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("Stream: %v", err)
	}
	if !slices.Equal(got, []string{"a", "b"}) {
		t.Errorf("emitted %q, want [a b]", got)
	}
}
