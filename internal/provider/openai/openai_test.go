package openai

import (
	"context"
	"errors"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/provider"
)

func TestNew(t *testing.T) {
	tests := []struct {
		name    string
		cfg     Config
		wantErr string // empty: valid
	}{
		{name: "ollama", cfg: Config{BaseURL: "http://127.0.0.1:11434/v1", Model: "llama3.2"}},
		{name: "trailing slash", cfg: Config{BaseURL: "https://api.openai.com/v1/", APIKey: "sk-x"}},
		{name: "azure query", cfg: Config{BaseURL: "https://x.openai.azure.com/openai/deployments/d?api-version=2024-06-01"}},
		{name: "empty", cfg: Config{}, wantErr: "base URL is required"},
		{name: "no scheme", cfg: Config{BaseURL: "127.0.0.1:11434/v1"}, wantErr: "base URL"},
		{name: "ftp", cfg: Config{BaseURL: "ftp://host/v1"}, wantErr: "scheme must be http or https"},
		{name: "no host", cfg: Config{BaseURL: "http:///v1"}, wantErr: "no host"},
		{name: "fragment", cfg: Config{BaseURL: "http://host/v1#x"}, wantErr: "fragment"},
		{name: "full endpoint", cfg: Config{BaseURL: "http://host/v1/chat/completions"}, wantErr: "without /chat/completions"},
		{name: "bad port", cfg: Config{BaseURL: "http://host:port/v1", APIKey: testKey}, wantErr: "base URL"},
		{name: "key with newline", cfg: Config{BaseURL: "http://host/v1", APIKey: testKey + "\n"}, wantErr: "API key contains a control character"},
		{name: "bad header name", cfg: Config{BaseURL: "http://host/v1", Headers: map[string]string{"X Y": "1"}}, wantErr: `header name "X Y"`},
		{name: "bad header value", cfg: Config{BaseURL: "http://host/v1", Headers: map[string]string{"X-Key": testKey + "\r\nEvil: 1"}}, wantErr: "header X-Key: value contains a control character"},
		{name: "password in URL", cfg: Config{BaseURL: "ftp://user:" + testKey + "@host/v1"}, wantErr: "scheme"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := New(tt.cfg)
			if tt.wantErr == "" {
				if err != nil || p == nil {
					t.Fatalf("New = %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("New = %v, want an error containing %q", err, tt.wantErr)
			}
			mustNotLeak(t, "New error", err.Error())
		})
	}
}

func TestNewDefaults(t *testing.T) {
	p, err := New(Config{BaseURL: "http://127.0.0.1:11434/v1/"})
	if err != nil {
		t.Fatal(err)
	}
	c := p.cfg
	if c.ContextBudgetBytes != DefaultContextBudgetBytes || c.ConnectTimeout != DefaultConnectTimeout ||
		c.FirstTokenTimeout != DefaultFirstTokenTimeout || c.IdleTimeout != DefaultIdleTimeout ||
		c.MaxRetries != DefaultMaxRetries || c.Now == nil || c.Sleep == nil || p.client == nil || p.log == nil {
		t.Errorf("defaults not applied: %+v", c)
	}
	if p.endpoint != "http://127.0.0.1:11434/v1/chat/completions" || p.modelsURL != "http://127.0.0.1:11434/v1/models" {
		t.Errorf("endpoints %s, %s", p.endpoint, p.modelsURL)
	}
	q, err := New(Config{BaseURL: "https://h/openai/deployments/d?api-version=2024-06-01"})
	if err != nil {
		t.Fatal(err)
	}
	if want := "https://h/openai/deployments/d/chat/completions?api-version=2024-06-01"; q.endpoint != want {
		t.Errorf("endpoint %s, want %s", q.endpoint, want)
	}
}

func TestAllowed(t *testing.T) {
	tests := []struct {
		name   string
		model  string
		models []string
		ask    string
		want   bool
	}{
		{"empty is the default", "m", nil, "", true},
		{"the default", "m", nil, "m", true},
		{"other without list", "m", nil, "x", false},
		{"listed", "m", []string{"x", "y"}, "y", true},
		{"not listed", "m", []string{"x", "y"}, "z", false},
		{"case matters", "m", []string{"x"}, "X", false},
		{"no default, empty", "", nil, "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := New(Config{BaseURL: "http://h/v1", Model: tt.model, Models: tt.models})
			if err != nil {
				t.Fatal(err)
			}
			if got := p.Allowed(tt.ask); got != tt.want {
				t.Errorf("Allowed(%q) = %v, want %v", tt.ask, got, tt.want)
			}
		})
	}
}

func TestTrim(t *testing.T) {
	u := func(s string) provider.Message { return provider.Message{Role: "user", Content: s} }
	a := func(s string) provider.Message { return provider.Message{Role: "assistant", Content: s} }
	tests := []struct {
		name   string
		msgs   []provider.Message
		budget int
		want   []provider.Message
	}{
		{"empty", nil, 10, nil},
		{"all fit", []provider.Message{u("aa"), a("bb"), u("cc")}, 6, []provider.Message{u("aa"), a("bb"), u("cc")}},
		{"no limit", []provider.Message{u("aaaa"), a("bbbb"), u("cc")}, -1, []provider.Message{u("aaaa"), a("bbbb"), u("cc")}},
		{"oldest dropped", []provider.Message{u("aa"), a("bb"), u("cc"), a("dd"), u("ee")}, 6, []provider.Message{u("cc"), a("dd"), u("ee")}},
		{"leading answer dropped", []provider.Message{u("aaa"), a("bb"), u("cc")}, 4, []provider.Message{u("cc")}},
		{"last user kept when too big", []provider.Message{u("aa"), a("bb"), u("cccccccc")}, 4, []provider.Message{u("cccccccc")}},
		{"zero budget keeps last user", []provider.Message{u("aa"), u("bb")}, 0, []provider.Message{u("bb")}},
		{"latest only, no gaps", []provider.Message{u("a"), a("bbbbbbbb"), u("c")}, 3, []provider.Message{u("c")}},
		{"trailing assistant kept with last user", []provider.Message{u("aa"), u("bb"), a("cc")}, 1, []provider.Message{u("bb"), a("cc")}},
		{"no user message", []provider.Message{a("aa"), a("bb")}, 1, []provider.Message{a("bb")}},
		// The worker loads the latest messages only, which may start with
		// an answer whose question was not loaded.
		{"answer at the front dropped", []provider.Message{a("hi"), u("q")}, 10, []provider.Message{u("q")}},
		{"answer at the front dropped without a limit", []provider.Message{a("hi"), u("q"), a("r"), u("s")}, -1, []provider.Message{u("q"), a("r"), u("s")}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := trim(tt.msgs, tt.budget); !slices.Equal(got, tt.want) {
				t.Errorf("trim = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestBackoff(t *testing.T) {
	for attempt := range 12 {
		ceil := backoffMax
		if attempt < 5 {
			ceil = min(backoffBase<<attempt, backoffMax)
		}
		for range 50 {
			if d := backoff(attempt); d < ceil/2 || d > ceil {
				t.Fatalf("backoff(%d) = %v, want in [%v, %v]", attempt, d, ceil/2, ceil)
			}
		}
	}
}

func TestPing(t *testing.T) {
	tests := []struct {
		name    string
		status  int
		wantMsg string // empty: ready
	}{
		{"ok", 200, ""},
		{"no models endpoint is still up", 404, ""},
		{"bad key", 401, "the model server rejected the API key (401)"},
		{"forbidden", 403, "the model server refused access (403)"},
		{"failing", 503, "the model server failed (503)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			auth := make(chan string, 1)
			srv := newFakeServer(t, func(_ int, w http.ResponseWriter, r *http.Request) {
				if r.Method != http.MethodGet || r.URL.Path != "/v1/models" {
					t.Errorf("request %s %s, want GET /v1/models", r.Method, r.URL.Path)
				}
				select {
				case auth <- r.Header.Get("Authorization"):
				default:
				}
				w.WriteHeader(tt.status)
				w.Write([]byte(`{"object":"list","data":[{"id":"m","object":"model"}]}`))
			})
			var now atomic.Int64
			now.Store(testNow.UnixNano())
			f := newFixture(t, srv.baseURL(), func(c *Config) {
				c.Now = func() time.Time { return time.Unix(0, now.Load()) }
			})
			check := func(err error) {
				t.Helper()
				if tt.wantMsg == "" {
					if err != nil {
						t.Fatalf("Ping = %v", err)
					}
					return
				}
				pe := wantProviderError(t, err, tt.wantMsg)
				if !errors.Is(pe, provider.ErrUnavailable) {
					t.Errorf("Ping error does not wrap ErrUnavailable")
				}
				if errors.Is(pe, provider.ErrUnreachable) {
					t.Errorf("a server that answered is called unreachable")
				}
			}
			check(f.p.Ping(t.Context()))
			if got := <-auth; got != "Bearer "+testKey {
				t.Errorf("Authorization = %q", got)
			}
			check(f.p.Ping(t.Context()))
			if n := srv.requests.Load(); n != 1 {
				t.Errorf("%d requests within the cache time, want 1", n)
			}
			now.Add(int64(pingCacheTTL + time.Second))
			check(f.p.Ping(t.Context()))
			if n := srv.requests.Load(); n != 2 {
				t.Errorf("%d requests after the cache time, want 2", n)
			}
		})
	}
}

func TestPingDown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	f := newFixture(t, "http://"+addr+"/v1", nil)
	pe := wantProviderError(t, f.p.Ping(t.Context()), "could not connect to the model server")
	if !errors.Is(pe, provider.ErrUnavailable) || !errors.Is(pe, provider.ErrUnreachable) {
		t.Errorf("Ping error does not wrap ErrUnavailable and ErrUnreachable")
	}
}

// A model server that does not answer its model list in time (a busy one)
// is not called unreachable: it may still answer a chat.
func TestPingSlowIsNotUnreachable(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	srv := newFakeServer(t, func(_ int, w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	f := newFixture(t, srv.baseURL(), nil)
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	err := f.p.ping(ctx) // Ping itself returns the caller's ctx.Err() then
	if err == nil || errors.Is(err, provider.ErrUnreachable) {
		t.Fatalf("Ping of a server that does not answer in time = %v, want an error other than ErrUnreachable", err)
	}
}

func TestPingCallerCancelNotCached(t *testing.T) {
	srv := newFakeServer(t, func(_ int, w http.ResponseWriter, _ *http.Request) { w.WriteHeader(200) })
	f := newFixture(t, srv.baseURL(), nil)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := f.p.Ping(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Ping = %v, want context.Canceled", err)
	}
	if err := f.p.Ping(t.Context()); err != nil {
		t.Fatalf("Ping after a cancelled one = %v", err)
	}
}

// A model server whose host takes no connection (down, or a firewall
// dropping the packets) is unreachable, though the ping only timed out.
func TestPingOfAServerTakingNoConnectionIsUnreachable(t *testing.T) {
	dialing := make(chan struct{}, 1)
	client := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		dialing <- struct{}{}
		<-ctx.Done() // no SYN-ACK ever comes
		return nil, ctx.Err()
	}}}
	f := newFixture(t, "http://192.0.2.1/v1", func(c *Config) { c.HTTPClient = client })
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	err := f.p.ping(ctx)
	<-dialing
	if !errors.Is(err, provider.ErrUnreachable) {
		t.Fatalf("Ping of a server taking no connection = %v, want ErrUnreachable", err)
	}
}

// A failed ping is asked again sooner than a good one: the server may be
// back.
func TestPingFailureCachedBriefly(t *testing.T) {
	var up atomic.Bool
	srv := newFakeServer(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
		if !up.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	})
	var now atomic.Int64
	now.Store(testNow.UnixNano())
	f := newFixture(t, srv.baseURL(), func(c *Config) {
		c.Now = func() time.Time { return time.Unix(0, now.Load()) }
	})
	if err := f.p.Ping(t.Context()); err == nil {
		t.Fatal("Ping of a failing server = nil")
	}
	up.Store(true)
	if err := f.p.Ping(t.Context()); err == nil {
		t.Fatal("a failure was not cached at all")
	}
	now.Add(int64(pingFailTTL))
	if err := f.p.Ping(t.Context()); err != nil {
		t.Fatalf("Ping %v after the failure's cache time = %v", pingFailTTL, err)
	}
}
