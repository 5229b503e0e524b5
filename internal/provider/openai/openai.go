// Package openai implements provider.Provider for any server that speaks the
// OpenAI Chat Completions streaming API: OpenAI itself, vLLM, Ollama (/v1),
// llama.cpp server and LM Studio.
package openai

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/provider"
)

// Defaults applied by [New] to zero fields of [Config].
const (
	DefaultContextBudgetBytes = 24000
	DefaultConnectTimeout     = 10 * time.Second
	DefaultFirstTokenTimeout  = 60 * time.Second
	DefaultIdleTimeout        = 30 * time.Second
	DefaultMaxRetries         = 2
)

// MaxRetryAfter caps how long a Retry-After header makes Stream wait before
// it retries: a turn someone is watching should not hang for minutes.
const MaxRetryAfter = 30 * time.Second

const (
	pingTimeout       = 5 * time.Second  // when Ping's ctx has no deadline
	pingCacheTTL      = 10 * time.Second // /readyz may be polled often; the model server need not be
	pingFailTTL       = 2 * time.Second  // a failure is asked again sooner: the server may be back
	backoffBase       = 500 * time.Millisecond
	backoffMax        = 8 * time.Second
	maxEventBytes     = 1 << 20  // one SSE line or event; a chunk is a few hundred bytes
	maxErrorBodyBytes = 64 << 10 // of an error response read for its detail
)

// Config configures a [Provider]. The zero value of each field except
// BaseURL means its documented default.
type Config struct {
	// BaseURL is the root of the API that "/chat/completions" and "/models"
	// are appended to, e.g. "http://127.0.0.1:11434/v1" (Ollama) or
	// "https://api.openai.com/v1". Required; http or https. A query (e.g.
	// Azure's api-version) is kept.
	BaseURL string

	// APIKey, when not empty, is sent as "Authorization: Bearer <APIKey>".
	// It never appears in an error or a log line.
	APIKey string

	// Model is the model asked for when a request names none. Empty: the
	// request carries no model, which only single-model servers such as
	// llama.cpp server accept.
	Model string

	// Models lists the other models a request may name (send.model). Empty:
	// only Model. See [Provider.Allowed].
	Models []string

	// Headers are extra request headers, e.g. for a proxy in front of the
	// model server. They are set last, so they may replace Authorization.
	// Their values are treated as secrets, like APIKey.
	Headers map[string]string

	// SystemPrompt, when not empty, is sent as a system message before the
	// conversation.
	SystemPrompt string

	// ContextBudgetBytes bounds the bytes of message content sent, the
	// system prompt included: only the latest messages that fit are sent,
	// but always the last user message (and anything after it). Zero:
	// DefaultContextBudgetBytes; negative: no limit.
	ContextBudgetBytes int

	// ConnectTimeout bounds connecting to the model server (DNS, TCP, TLS).
	// Zero: DefaultConnectTimeout; negative: no limit.
	ConnectTimeout time.Duration

	// FirstTokenTimeout bounds the wait, once connected, for the first token
	// of the answer (a local server may first have to load the model).
	// Zero: DefaultFirstTokenTimeout; negative: no limit.
	FirstTokenTimeout time.Duration

	// IdleTimeout bounds the wait between two chunks of the answer once it
	// has started. Zero: DefaultIdleTimeout; negative: no limit.
	IdleTimeout time.Duration

	// MaxRetries is how many times a failed request is retried (connection
	// failure, 408, 429, 5xx) with exponential backoff and jitter, or after
	// the Retry-After the server asked for (at most MaxRetryAfter). Retries
	// happen only before the first token was emitted: text is never streamed
	// twice. Zero: DefaultMaxRetries; negative: no retries.
	MaxRetries int

	// HTTPClient makes the requests. Nil: a client of its own with no
	// overall timeout (answers stream for minutes), honouring HTTPS_PROXY.
	// Its Timeout, if any, also bounds streaming answers. Redirects are
	// never followed, whatever its CheckRedirect: a copy of it is used.
	HTTPClient *http.Client

	// Logger receives retry warnings and debug lines; never message text.
	// Nil: nothing is logged.
	Logger *slog.Logger

	// Now and Sleep stand in for the clock in tests. Now reads Retry-After
	// dates and ages the Ping cache; Sleep waits between retries and must
	// return ctx.Err() early when ctx is done. Nil: time.Now and a timer.
	Now   func() time.Time
	Sleep func(ctx context.Context, d time.Duration) error
}

// Provider streams answers from an OpenAI-compatible Chat Completions server.
// It is safe for concurrent use; create it with [New].
type Provider struct {
	cfg       Config // defaults applied; read-only after New
	endpoint  string // {BaseURL}/chat/completions
	modelsURL string // {BaseURL}/models
	rootHint  string // {BaseURL}/v1 when BaseURL has no path, else ""
	client    *http.Client
	log       *slog.Logger
	secrets   []string            // redacted from every error, longest first
	allowed   map[string]struct{} // cfg.Models
	// trailerWait is the package's trailerWait; a test may shorten it
	// before the first Stream.
	trailerWait time.Duration

	// noStreamOptions: the server refused stream_options once, so no
	// request carries it any more.
	noStreamOptions atomic.Bool

	mu      sync.Mutex
	pingAt  time.Time // guarded by mu: when pingErr was found; zero: never
	pingErr error     // guarded by mu
}

var (
	_ provider.Provider = (*Provider)(nil)
	_ provider.Pinger   = (*Provider)(nil)
)

// New checks cfg, applies its defaults and returns a Provider. It makes no
// request: use [Provider.Ping] to check that the server answers.
func New(cfg Config) (*Provider, error) {
	p := &Provider{cfg: cfg, trailerWait: trailerWait}
	p.secrets = secretsOf(cfg)
	base, err := p.parseBaseURL(cfg.BaseURL)
	if err != nil {
		return nil, err
	}
	if !validHeaderValue(cfg.APIKey) {
		return nil, errors.New("openai config: API key contains a control character")
	}
	for name, value := range cfg.Headers {
		if !validHeaderName(name) {
			return nil, fmt.Errorf("openai config: header name %q is not valid", name)
		}
		if !validHeaderValue(value) {
			return nil, fmt.Errorf("openai config: header %s: value contains a control character", name)
		}
	}
	if base.Path == "" || base.Path == "/" {
		// Servers other than llama.cpp serve the API under /v1 only.
		// Without its query, which may hold a secret.
		p.rootHint = (&url.URL{Scheme: base.Scheme, Host: base.Host, Path: "/v1"}).String()
	}
	p.endpoint = base.JoinPath("chat/completions").String()
	p.modelsURL = base.JoinPath("models").String()

	c := &p.cfg
	c.Models = slices.Clone(cfg.Models)
	p.allowed = make(map[string]struct{}, len(c.Models))
	for _, m := range c.Models {
		p.allowed[m] = struct{}{}
	}
	if c.ContextBudgetBytes == 0 {
		c.ContextBudgetBytes = DefaultContextBudgetBytes
	}
	if c.ConnectTimeout == 0 {
		c.ConnectTimeout = DefaultConnectTimeout
	}
	if c.FirstTokenTimeout == 0 {
		c.FirstTokenTimeout = DefaultFirstTokenTimeout
	}
	if c.IdleTimeout == 0 {
		c.IdleTimeout = DefaultIdleTimeout
	}
	if c.MaxRetries == 0 {
		c.MaxRetries = DefaultMaxRetries
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Sleep == nil {
		c.Sleep = sleep
	}
	if c.HTTPClient != nil {
		client := *c.HTTPClient
		p.client = &client
	} else {
		p.client = newClient()
	}
	// A redirect is not followed but reported (see statusFailure): the
	// extra headers, secrets, would follow it to another host (net/http
	// drops only Authorization and cookies there), and a 301 or 302
	// would replay the POST as a GET, which the server refuses with a
	// status that says nothing of the move.
	p.client.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	p.log = c.Logger
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	return p, nil
}

// Allowed reports whether a request may name model: the empty name (the
// default) and Config.Model always, otherwise only names in Config.Models.
// Stream refuses any other model without calling the server.
func (p *Provider) Allowed(model string) bool {
	if model == "" || model == p.cfg.Model {
		return true
	}
	_, ok := p.allowed[model]
	return ok
}

// Ping implements [provider.Pinger]: it reports whether the model server
// answers GET {BaseURL}/models. A 401 or 403 (bad API key) or a 5xx is a
// failure; any other status means the server is up. The result is cached
// for about 10s (a failure for 2s), so frequent /readyz probes cost one
// request. When ctx has no deadline, Ping gives up after 5s. Failures are
// *provider.Error wrapping provider.ErrUnavailable, and also
// provider.ErrUnreachable when no connection could be made (refused, or
// none in the time given); when ctx ends first, Ping returns ctx.Err().
func (p *Provider) Ping(ctx context.Context) error {
	now := p.cfg.Now()
	p.mu.Lock()
	ttl := pingCacheTTL
	if p.pingErr != nil {
		ttl = pingFailTTL
	}
	if !p.pingAt.IsZero() && now.Sub(p.pingAt) < ttl && now.Sub(p.pingAt) >= 0 {
		err := p.pingErr
		p.mu.Unlock()
		return err
	}
	p.mu.Unlock()

	err := p.ping(ctx)
	if ctx.Err() != nil {
		return ctx.Err() // the caller gave up; that says nothing of the server
	}
	p.mu.Lock()
	p.pingAt, p.pingErr = now, err
	p.mu.Unlock()
	return err
}

func (p *Provider) ping(ctx context.Context) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, pingTimeout)
		defer cancel()
	}
	var connected atomic.Bool
	tctx := httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotConn: func(httptrace.GotConnInfo) { connected.Store(true) }})
	req, err := http.NewRequestWithContext(tctx, http.MethodGet, p.modelsURL, nil)
	if err != nil {
		return p.fail("could not build the request to the model server", err, true)
	}
	p.setHeaders(req.Header)
	req.Header.Set("Accept", "application/json")
	resp, err := p.client.Do(req)
	if err != nil {
		if connected.Load() && errors.Is(ctx.Err(), context.DeadlineExceeded) {
			// A busy server may answer a chat while its model list
			// waits: slow is not unreachable. One that took no
			// connection in that time (a host that is down, a firewall
			// dropping the packets) is.
			return p.fail("the model server did not answer in time", err, true)
		}
		e := p.fail("could not connect to the model server", err, true)
		e.Err = fmt.Errorf("%w: %w", provider.ErrUnreachable, e.Err)
		return e
	}
	defer resp.Body.Close()
	switch st := resp.StatusCode; {
	case st == http.StatusUnauthorized:
		return p.fail("the model server rejected the API key (401)", errors.New("GET /models: status 401"), true)
	case st == http.StatusForbidden:
		return p.fail("the model server refused access (403)", errors.New("GET /models: status 403"), true)
	case st >= 500:
		return p.fail(fmt.Sprintf("the model server failed (%d)", st), fmt.Errorf("GET /models: status %d", st), true)
	}
	return nil
}

// setHeaders sets the headers every request carries.
func (p *Provider) setHeaders(h http.Header) {
	h.Set("User-Agent", "tokenrelay")
	if p.cfg.APIKey != "" {
		h.Set("Authorization", "Bearer "+p.cfg.APIKey)
	}
	for name, value := range p.cfg.Headers {
		h.Set(name, value)
	}
}

func (p *Provider) parseBaseURL(raw string) (*url.URL, error) {
	if raw == "" {
		return nil, errors.New("openai config: base URL is required (e.g. http://127.0.0.1:11434/v1)")
	}
	u, err := url.Parse(raw)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // url.Error repeats the whole URL, which may hold a secret
		}
		return nil, fmt.Errorf("openai config: base URL: %s", p.redact(err.Error()))
	}
	shown := p.redact(u.Redacted())
	switch {
	case u.Scheme != "http" && u.Scheme != "https":
		return nil, fmt.Errorf("openai config: base URL %s: scheme must be http or https", shown)
	case u.Host == "":
		return nil, fmt.Errorf("openai config: base URL %s: no host", shown)
	case u.Fragment != "":
		return nil, fmt.Errorf("openai config: base URL %s: has a fragment", shown)
	case strings.HasSuffix(strings.TrimRight(u.Path, "/"), "/chat/completions"):
		return nil, fmt.Errorf("openai config: base URL %s: give the API root without /chat/completions (e.g. http://127.0.0.1:11434/v1)", shown)
	}
	if pw, ok := u.User.Password(); ok {
		p.addSecret(pw)
	}
	for _, vs := range u.Query() {
		for _, v := range vs {
			p.addSecret(v)
		}
	}
	return u, nil
}

// secretsOf returns the strings to redact from errors: the API key and the
// extra header values, raw and in the escaped forms error texts use.
func secretsOf(cfg Config) []string {
	p := &Provider{}
	p.addSecret(cfg.APIKey)
	for _, v := range cfg.Headers {
		p.addSecret(v)
		// "Bearer <token>", "Basic <credentials>": a server that echoes
		// the credential quotes the token alone.
		if _, token, ok := strings.Cut(strings.TrimSpace(v), " "); ok {
			p.addSecret(strings.TrimSpace(token))
		}
	}
	return p.secrets
}

// addSecret adds s to p.secrets; only New calls it.
func (p *Provider) addSecret(s string) {
	// Very short values ("1", "on") are not credentials, and redacting them
	// would garble every message.
	if len(s) < 4 {
		return
	}
	quoted := strconv.Quote(s)
	for _, v := range []string{s, url.QueryEscape(s), url.PathEscape(s), quoted[1 : len(quoted)-1]} {
		if !slices.Contains(p.secrets, v) {
			p.secrets = append(p.secrets, v)
		}
	}
	// Longest first, so that a secret containing another is redacted whole.
	slices.SortStableFunc(p.secrets, func(a, b string) int { return len(b) - len(a) })
}

// redact replaces every secret in s.
func (p *Provider) redact(s string) string {
	for _, v := range p.secrets {
		s = strings.ReplaceAll(s, v, "[redacted]")
	}
	return s
}

func newClient() *http.Client {
	// No Timeout: an answer may stream for minutes; Stream's own timeouts
	// bound connecting, the first token and the gaps between tokens.
	return &http.Client{Transport: &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{KeepAlive: 30 * time.Second}).DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          100,
		MaxIdleConnsPerHost:   32, // concurrent turns reuse connections to the one model server
		IdleConnTimeout:       90 * time.Second,
		ExpectContinueTimeout: time.Second,
	}}
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// validHeaderName reports whether s is an HTTP token (RFC 9110 5.1).
func validHeaderName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0:
		default:
			return false
		}
	}
	return true
}

// validHeaderValue reports whether s can be sent as a header value: no
// control characters other than tab, which could split the header.
func validHeaderValue(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < ' ' && c != '\t') || c == 0x7f {
			return false
		}
	}
	return true
}

// jsonString is a JSON value that may be a string or a number (error codes
// come as either); it keeps the text of either.
type jsonString string

func (s *jsonString) UnmarshalJSON(b []byte) error {
	var str string
	if err := json.Unmarshal(b, &str); err == nil {
		*s = jsonString(str)
		return nil
	}
	*s = jsonString(strings.Trim(string(b), `"`))
	return nil
}
