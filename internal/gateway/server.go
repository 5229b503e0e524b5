// Package gateway is tokenrelay's edge: it authenticates clients, validates
// and stores their messages, enqueues turns, and relays turn events to every
// joined WebSocket connection and SSE stream, one writer per connection. It
// also serves the HTTP API, health, metrics and the web page.
package gateway

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"path"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/tokenrelay/tokenrelay/internal/auth"
	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/protocol"
	"github.com/tokenrelay/tokenrelay/internal/store"
)

// Config configures a gateway. Zero durations take the documented defaults.
type Config struct {
	Limits Limits
	// AllowedOrigins lists the origins allowed to open /v1/ws (and to POST
	// or DELETE on the API); empty allows the server's own only, and a list
	// replaces that default (see auth.OriginAllowed).
	AllowedOrigins []string
	// LoopbackHostsOnly refuses requests whose Host is not a loopback name
	// (localhost, *.localhost, 127.0.0.0/8, ::1). Set for dev mode on a
	// loopback address: a web page whose own name an attacker rebinds to
	// 127.0.0.1 (DNS rebinding) is the same origin as itself, so the Origin
	// check passes, but its requests carry that name as their Host.
	LoopbackHostsOnly bool
	// CompatOrigins lists the origins allowed on the compatibility paths
	// (/ws/chat, /api/…); empty allows any, as COMPAT.md says.
	CompatOrigins []string
	// DefaultModel is recorded on turns that do not name one.
	DefaultModel string
	// ModelAllowed validates send.model; nil accepts any.
	ModelAllowed func(model string) bool
	// DeltaTimestamps forwards each delta's emission time as "ts".
	DeltaTimestamps bool
	// CancelWait is how long a cancel waits for a streaming turn to end
	// before answering with its current status (default 5s).
	CancelWait time.Duration
	// RequestTimeout bounds the work of one request (default 10s).
	RequestTimeout time.Duration
	// WriteTimeout bounds one socket write (default 10s).
	WriteTimeout time.Duration
	// ReadTimeout bounds how long a plain HTTP request's body may take to
	// arrive (default 10s; see ServeHTTP).
	ReadTimeout time.Duration
	// PingInterval is how often the server pings a connection; a peer that
	// does not answer within IdleTimeout is disconnected. Defaults 30s/60s;
	// a negative PingInterval disables pings.
	PingInterval time.Duration
	IdleTimeout  time.Duration
	// QuietCheck is how long a turn a view has open may go without an
	// event before the view reads it again from the stream: the last
	// resort for a lost end that nothing reported (see view.checkQuiet).
	// Default 10s; negative disables.
	QuietCheck time.Duration
	// ReadyProbes are extra /readyz checks by name (e.g. "provider").
	ReadyProbes map[string]func(context.Context) error
	// ModelUnreachable, in a process whose worker is in-process (serve),
	// says whether that worker's model server can be reached (an error
	// wrapping bus.ErrProviderUnreachable when not); elsewhere the workers
	// say so when pinged.
	ModelUnreachable func(context.Context) error
	// Static is the web page served at /; nil serves nothing there.
	Static fs.FS
	// NodeID names this gateway in health answers.
	NodeID string

	Logger   *slog.Logger
	Registry prometheus.Registerer
	Gatherer prometheus.Gatherer
	Now      func() time.Time
}

// Server is a gateway. It is an http.Handler.
type Server struct {
	// readyCauses holds each readiness check's last failure ("" when it
	// passed), so that a change is logged once.
	readyCauses sync.Map
	cfg         Config
	bus         *bus.Bus
	store       store.Store
	auth        *auth.Authenticator
	hub         *hub
	limits      *userLimits
	m           *metrics
	log         *slog.Logger
	mux         *http.ServeMux
	api         *http.ServeMux // the API's routes alone (see ServeHTTP)

	shutdownCtx context.Context // cancelled by Shutdown: every connection derives from it
	shutdown    context.CancelFunc
	conns       sync.WaitGroup

	sendsStopped atomic.Bool    // see StopSends
	draining     atomic.Bool    // see Drain
	sendGate     sync.RWMutex   // read-held by each send past the check of sendsStopped
	heldJobs     sync.WaitGroup // jobs connections hold (see sendRequest.hold); added to under sendGate

	workerMu   sync.Mutex
	workerSeen time.Time    // when a worker last answered; guarded by workerMu
	workerPing *workerProbe // the ping in flight, if any; guarded by workerMu

	mu      sync.Mutex
	closing bool                           // guarded by mu
	quiet   *time.Timer                    // runs checkQuiet; nil when disabled; guarded by mu
	open    map[*websocket.Conn]openSocket // guarded by mu
}

// New returns a gateway using b and st, authenticating with a.
func New(cfg Config, b *bus.Bus, st store.Store, a *auth.Authenticator) *Server {
	if cfg.CancelWait <= 0 {
		cfg.CancelWait = 5 * time.Second
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = 10 * time.Second
	}
	if cfg.WriteTimeout <= 0 {
		cfg.WriteTimeout = 10 * time.Second
	}
	if cfg.ReadTimeout <= 0 {
		cfg.ReadTimeout = 10 * time.Second
	}
	// A write timeout set huge to mean "none" must not overflow the
	// deadline of a plain answer (see ServeHTTP): wrapped around into the
	// past, it would drop every answer.
	cfg.WriteTimeout = min(cfg.WriteTimeout, maxDuration/answerWrites)
	if cfg.PingInterval == 0 {
		cfg.PingInterval = 30 * time.Second
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = 2 * cfg.PingInterval
	}
	if cfg.QuietCheck == 0 {
		cfg.QuietCheck = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		cfg: cfg, bus: b, store: st, auth: a, limits: newUserLimits(cfg.Limits),
		m: newMetrics(cfg.Registry), log: cfg.Logger, shutdownCtx: ctx, shutdown: cancel,
		open: make(map[*websocket.Conn]openSocket),
	}
	s.hub = newHub(b, s.resync)
	s.mux = s.routes()
	if cfg.QuietCheck > 0 {
		s.armQuiet()
	}
	return s
}

// HTTPTimeouts returns the timeouts of the HTTP server that serves s, as
// s's Config gives them once its defaults are applied (a zero field means
// the default): read bounds how long a request's headers may take to
// arrive, as it bounds its body, and idle how long a connection kept alive
// may wait for its next request, as it bounds a WebSocket's answer to a
// ping (a minute when pings are disabled).
func (s *Server) HTTPTimeouts() (read, idle time.Duration) {
	idle = s.cfg.IdleTimeout
	if idle <= 0 {
		idle = time.Minute
	}
	return s.cfg.ReadTimeout, idle
}

// armQuiet schedules the next checkQuiet, unless the server is shutting
// down.
func (s *Server) armQuiet() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.closing {
		s.quiet = time.AfterFunc(s.cfg.QuietCheck, s.checkQuiet)
	}
}

// checkQuiet has every view look for turns that have been silent for a
// whole QuietCheck, then runs again after QuietCheck. A timer rather than
// a goroutine: nothing runs between sweeps.
func (s *Server) checkQuiet() {
	n := 0
	for _, subs := range s.hub.subscribers("") {
		for _, sub := range subs {
			if v, ok := sub.(*view); ok {
				n += v.checkQuiet()
			}
		}
	}
	if n > 0 {
		s.m.quietChecks.Add(float64(n))
	}
	s.armQuiet()
}

// resyncRecent is how many of a conversation's newest messages a resync
// reads to find turns whose start was lost; resyncParallel bounds the
// conversations resynced at once after a reconnect.
const (
	resyncRecent   = 8
	resyncParallel = 16
)

// resync is told by the bus when live events of conversation conv (of
// every conversation when conv is "") may have been lost with nothing
// after them to reveal it. Every view of it reads its open turns again
// (see view.resync), so that a turn's end lost on the way still arrives.
func (s *Server) resync(conv string) {
	reason := "slow_consumer"
	if conv == "" {
		reason = "reconnect"
	}
	convs := s.hub.subscribers(conv)
	if len(convs) == 0 {
		return
	}
	s.log.Warn("live events may have been lost; reading open turns again", "reason", reason, "conversations", len(convs))
	s.m.resyncs.WithLabelValues(reason).Add(float64(len(convs)))
	sem := make(chan struct{}, resyncParallel)
	var wg sync.WaitGroup
	for id, subs := range convs {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			ctx, cancel := context.WithTimeout(s.shutdownCtx, s.cfg.RequestTimeout)
			recent, err := s.store.Messages(ctx, id, resyncRecent, "")
			cancel()
			if err != nil && s.shutdownCtx.Err() == nil {
				// The open turns are still read again; only a turn whose
				// start was lost too stays unknown until the client resumes.
				s.log.Warn("resync: read recent messages", "conversation", id, "err", err)
			}
			for _, sub := range subs {
				if v, ok := sub.(interface{ resync([]chat.Message) }); ok {
					v.resync(recent)
				}
			}
		}()
	}
	wg.Wait()
}

func (s *Server) now() time.Time { return s.cfg.Now() }

// ServeHTTP implements http.Handler. A request for an API path that no
// route takes (an unknown path under /v1/, or a method a path does not
// have) gets the API's JSON error, 404 or 405, rather than the plain text
// of net/http or the web page's file server.
//
// A plain request's body must arrive within ReadTimeout of its start, and
// its answer be written within answerWrites write timeouts of it (5 minutes
// by default): a client that trickles its body, or does not read the
// answer, does not hold the connection, a goroutine and the answer for
// good, while one that reads a history of megabytes on a slow link has
// minutes to. (A deadline for each write would cut off a client that reads
// steadily but slowly: the kernel lets a writer go on only once half of a
// send buffer of megabytes has drained.) A WebSocket upgrade and an SSE
// stream lift both (see unbound) and bound each write instead.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rc := http.NewResponseController(w)
	now := time.Now()
	if r.Body != http.NoBody {
		// Lifted once the body is read (see bodyRead): past it, net/http
		// reads on in the background, and a deadline passing then would
		// end the request's context.
		_ = rc.SetReadDeadline(now.Add(s.cfg.ReadTimeout))
	}
	_ = rc.SetWriteDeadline(now.Add(answerWrites * s.cfg.WriteTimeout))
	if s.cfg.LoopbackHostsOnly && !loopbackHost(r.Host) {
		s.writeError(w, protocol.Errorf(protocol.CodeForbidden, "this development server answers only requests for localhost or a loopback address, not "+quote(r.Host)))
		return
	}
	if isAPIPath(r.URL.Path) {
		if !canonical(r.URL.EscapedPath()) {
			// net/http would redirect to the cleaned path, which names
			// another resource (the id "." or "..", or none).
			s.writeError(w, badRequest("the path "+quote(r.URL.Path)+" has an empty, \".\" or \"..\" segment; an id \".\" or \"..\" is written %2E or %2E%2E"))
			return
		}
		if _, pattern := s.mux.Handler(r); pattern == "" || pattern == "GET /" {
			s.api.ServeHTTP(&apiErrorWriter{ResponseWriter: w, r: r}, r)
			return
		}
	}
	s.mux.ServeHTTP(w, r)
}

// bodyRead lifts the read deadline ServeHTTP set for a request's body,
// once the handler has read it.
func bodyRead(w http.ResponseWriter) {
	_ = http.NewResponseController(w).SetReadDeadline(time.Time{})
}

// answerWrites is how many --write-timeout a plain HTTP answer may take
// from its request's start (see ServeHTTP).
const answerWrites = 30

// maxDuration is the longest time.Duration.
const maxDuration = time.Duration(1<<63 - 1)

// unbound lifts the deadlines ServeHTTP set on w's connection, for a
// WebSocket, which outlives them. An SSE stream lifts only the read
// deadline and bounds each write itself (see sseWriter).
func unbound(w http.ResponseWriter, write bool) {
	rc := http.NewResponseController(w)
	_ = rc.SetReadDeadline(time.Time{})
	if write {
		_ = rc.SetWriteDeadline(time.Time{})
	}
}

// loopbackHost reports whether a Host header names this machine by a
// loopback name or address, which no other site's page can be served under.
// An empty Host (HTTP/1.0) comes from no browser; 0.0.0.0 and [::] are this
// machine as a person may type them.
func loopbackHost(host string) bool {
	if host == "" || auth.IsLoopback(host) {
		return true
	}
	name := host
	if h, _, err := net.SplitHostPort(host); err == nil {
		name = h
	}
	name = strings.ToLower(strings.TrimSuffix(strings.TrimPrefix(strings.TrimSuffix(name, "."), "["), "]"))
	if ip, err := netip.ParseAddr(name); err == nil && ip.IsUnspecified() {
		return true
	}
	return name == "localhost" || strings.HasSuffix(name, ".localhost")
}

// isAPIPath reports whether path belongs to the API of PROTOCOL.md.
func isAPIPath(path string) bool {
	switch path {
	case "/healthz", "/readyz", "/metrics":
		return true
	}
	return strings.HasPrefix(path, "/v1/") || path == "/v1"
}

// canonical reports whether p is its own cleaned form, a final slash aside.
func canonical(p string) bool {
	c := path.Clean(p)
	if strings.HasSuffix(p, "/") && c != "/" {
		c += "/"
	}
	return c == p
}

// apiErrorWriter turns the 404 or 405 that net/http writes for a request no
// route took into the API's JSON error, keeping the Allow header of a 405.
type apiErrorWriter struct {
	http.ResponseWriter
	r    *http.Request
	done bool
}

func (w *apiErrorWriter) WriteHeader(status int) {
	if w.done {
		return
	}
	w.done = true
	var body errorBody
	if status == http.StatusMethodNotAllowed {
		body.Error.Code = "bad_request"
		body.Error.Message = w.r.Method + " is not allowed on " + w.r.URL.Path + " (allowed: " + w.Header().Get("Allow") + ")"
	} else {
		body.Error.Code = "not_found"
		body.Error.Message = "no such endpoint: " + w.r.Method + " " + w.r.URL.Path
	}
	w.Header().Del("X-Content-Type-Options")
	writeJSON(w.ResponseWriter, status, body)
}

// Write drops net/http's plain-text body: WriteHeader wrote the JSON one.
func (w *apiErrorWriter) Write(p []byte) (int, error) {
	if !w.done {
		w.WriteHeader(http.StatusNotFound)
	}
	return len(p), nil
}

// StopSends refuses every later send with unavailable, while the rest
// (joins, cancels, the turns running) goes on, and returns once the sends
// already past that check have stored and enqueued their turns, or when
// ctx ends first, jobs held by connections included (see
// sendRequest.hold). serve calls it before it stops its worker: a turn sent
// then would stay queued until the next start.
func (s *Server) StopSends(ctx context.Context) {
	s.sendsStopped.Store(true)
	passed := make(chan struct{})
	go func() {
		s.sendGate.Lock()
		s.sendGate.Unlock()
		// No send adds a held job any more: wait for those held.
		s.heldJobs.Wait()
		close(passed)
	}()
	select {
	case <-passed:
	case <-ctx.Done():
	}
}

// Drain marks the gateway as going away: from now on /readyz answers 503
// naming the check "shutdown", so that a load balancer sends new clients
// elsewhere, while everything else (connections open or new, sends, SSE
// streams) goes on as before until Shutdown. It returns at once and may be
// called more than once.
func (s *Server) Drain() {
	if !s.draining.Swap(true) {
		s.log.Info("draining: /readyz answers 503 until the connections close")
	}
}

// Shutdown closes every WebSocket connection with 1001 (going away) and
// waits for their goroutines, or until ctx is done. Events already received
// from the bus (a turn's end published by a stopping worker, say) are
// written before the close. It drains first (see Drain) if that was not
// done.
func (s *Server) Shutdown(ctx context.Context) error {
	s.Drain()
	s.mu.Lock()
	s.closing = true
	if s.quiet != nil {
		s.quiet.Stop()
	}
	open := make(map[*websocket.Conn]openSocket, len(s.open))
	for c, o := range s.open {
		open[c] = o
	}
	s.mu.Unlock()
	// Everything the bus has delivered so far reaches the queues...
	bctx, cancel := context.WithTimeout(ctx, time.Second)
	_ = s.hub.barrier(bctx)
	cancel()
	var wg sync.WaitGroup
	for c, o := range open {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// ...and the queues reach the sockets, for a moment at most.
			waitIdle(o.q, time.Second)
			_ = o.raw.close(c, websocket.StatusGoingAway, "server shutting down")
		}()
	}
	done := make(chan struct{})
	go func() {
		wg.Wait()
		s.stop()
		s.conns.Wait()
		s.hub.close()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		s.stop()
		return ctx.Err()
	}
}

// stop ends every connection's context and closes every socket still open,
// which ends their read loops and any close handshake still waiting for its
// peer.
func (s *Server) stop() {
	s.shutdown()
	s.mu.Lock()
	open := make([]net.Conn, 0, len(s.open))
	for _, o := range s.open {
		open = append(open, o.raw.nc)
	}
	s.mu.Unlock()
	for _, nc := range open {
		_ = nc.Close()
	}
}

// requestCtx is the context of one client request of a connection. It
// derives from the server's, not the connection's, because a context with
// children keeps a map of them for its life. A request of a connection
// that ends meanwhile runs to its end or its timeout; its answer is
// dropped with the connection's queue.
func (s *Server) requestCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(s.shutdownCtx, s.cfg.RequestTimeout)
}

func (s *Server) routes() *http.ServeMux {
	mux := http.NewServeMux()
	// The API's routes also go on a mux of their own, which answers the
	// API's paths that no route takes (see ServeHTTP).
	s.api = http.NewServeMux()
	api := func(pattern string, h http.Handler) {
		mux.Handle(pattern, h)
		s.api.Handle(pattern, h)
	}
	api("GET /v1/ws", s.handleWS())
	api("GET /v1/conversations", s.authed(s.handleListConversations()))
	api("GET /v1/conversations/{conversation}/messages", s.authed(s.handleListMessages()))
	api("POST /v1/conversations/{conversation}/messages", s.authed(s.handlePostMessage()))
	api("DELETE /v1/conversations/{conversation}", s.authed(s.handleDeleteConversation()))
	api("POST /v1/turns/{turn}/cancel", s.authed(s.handleCancel()))
	api("GET /v1/turns/{turn}/events", s.authed(s.handleSSE()))
	api("GET /healthz", s.handleHealthz())
	api("GET /readyz", s.handleReadyz())
	if s.cfg.Gatherer != nil {
		api("GET /metrics", promhttp.HandlerFor(s.cfg.Gatherer, promhttp.HandlerOpts{}))
	}
	if s.cfg.Static != nil {
		mux.Handle("GET /", pageHeaders(http.FileServerFS(s.cfg.Static)))
	}
	s.compatRoutes(mux)
	return mux
}

// pagePolicy is the web page's Content-Security-Policy: its own scripts,
// styles and sockets only, and images from itself, so that an answer's
// Markdown cannot make the browser fetch from elsewhere (a prompt-injected
// image URL would carry the conversation out in its query).
const pagePolicy = "default-src 'self'; img-src 'self' data:; connect-src 'self' ws: wss:; style-src 'self'; " +
	"script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"

// pageHeaders adds the page's security headers to h's answers.
func pageHeaders(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hd := w.Header()
		hd.Set("Content-Security-Policy", pagePolicy)
		hd.Set("X-Content-Type-Options", "nosniff")
		hd.Set("X-Frame-Options", "DENY")
		hd.Set("Referrer-Policy", "no-referrer")
		h.ServeHTTP(w, r)
	})
}

func (s *Server) handleWS() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !auth.OriginAllowed(r, s.cfg.AllowedOrigins) {
			s.m.authFailures.WithLabelValues("origin").Inc()
			s.writeError(w, &protoError{status: http.StatusForbidden, code: "forbidden", msg: "origin not allowed"})
			return
		}
		id, authErr := s.auth.Authenticate(r)
		ws, raw, err := acceptWS(w, r, &websocket.AcceptOptions{
			InsecureSkipVerify: true, // the origin was checked above
			CompressionMode:    websocket.CompressionDisabled,
		})
		if err != nil {
			return
		}
		if authErr != nil {
			s.m.authFailures.WithLabelValues("token").Inc()
			_ = ws.Close(closeUnauthorized, "unauthorized")
			return
		}
		q := newOutQueue(s.cfg.Limits.OutboundBytes)
		q.onSlow = s.m.slowCloses.Inc
		s.serveSocket(ws, raw, id.UserID, q, func(ctx context.Context, cancel context.CancelFunc) {
			c := &conn{
				s: s, ws: ws, raw: raw, user: id.UserID, q: q,
				ctx: ctx, cancel: cancel, views: make(map[string]*view),
			}
			if !id.Expires.IsZero() {
				// A token is checked when the socket opens; the socket
				// must not outlive it (a stolen token's reach ends with
				// its exp). The client reconnects with a fresh one.
				t := time.AfterFunc(time.Until(id.Expires), func() {
					s.m.authFailures.WithLabelValues("expired").Inc()
					c.closeWith(closeUnauthorized, "token expired")
				})
				defer t.Stop()
			}
			c.run()
		})
	})
}

// serveSocket runs an accepted WebSocket of user (native or compat), whose
// outbound queue is q, under the per-user connection limit, registered for
// Shutdown, with the inbound frame limit set; run gets the connection's
// context, which Shutdown ends.
//
// run is called on a goroutine of its own and serveSocket returns at once,
// so that the HTTP handler returns too: net/http then lets go of the
// upgrade request (its headers, contexts and response), and the goroutine
// that idles with the connection has a stack of its own size instead of
// one grown through the HTTP server's handler chain.
func (s *Server) serveSocket(ws *websocket.Conn, raw *rawSocket, user string, q *outQueue, run func(ctx context.Context, cancel context.CancelFunc)) {
	if !s.limits.openConn(user) {
		s.m.limitHits.WithLabelValues("connections").Inc()
		_ = ws.Close(closeTooManyConns, "too many connections")
		return
	}
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		s.limits.closeConn(user)
		_ = ws.Close(websocket.StatusGoingAway, "server shutting down")
		return
	}
	raw.q = q
	s.open[ws] = openSocket{q: q, raw: raw}
	s.conns.Add(1)
	s.mu.Unlock()
	if s.cfg.Limits.FrameBytes > 0 {
		ws.SetReadLimit(int64(s.cfg.Limits.FrameBytes))
	} else {
		ws.SetReadLimit(-1)
	}
	// Ending a connection's context also closes its socket, which ends the
	// read loop: reads and writes take no context of their own, so that
	// an idle connection registers nothing with its context (see
	// requestCtx). The TCP connection is closed, not the WebSocket:
	// CloseNow waits for a close handshake already in progress.
	ctx, cancelCtx := context.WithCancel(s.shutdownCtx)
	cancel := func() {
		cancelCtx()
		_ = raw.nc.Close()
	}
	s.m.connections.Inc()
	s.m.connectsTotal.Inc()
	go func() {
		defer func() {
			s.m.connections.Dec()
			cancel()
			raw.forgetWake()
			s.mu.Lock()
			delete(s.open, ws)
			s.mu.Unlock()
			s.limits.closeConn(user)
			s.conns.Done()
		}()
		run(ctx, cancel)
	}()
}

// openSocket is an open WebSocket's outbound queue and TCP connection.
type openSocket struct {
	q   *outQueue
	raw *rawSocket
}

// WebSocket buffer sizes. net/http hands a hijacked connection 4 KiB read
// and write buffers, which every idle connection would keep for its life.
// Client frames are read whole into a message buffer, so a small read
// buffer does: a payload larger than it is read straight into the message.
// The write buffer carries only the library's own frames (see libWriter),
// control frames of at most 127 bytes, each written whole.
const (
	wsReadBuffer  = 256
	wsWriteBuffer = 128
)

// acceptWS upgrades a request to a WebSocket with buffers of the sizes
// above. It also returns the TCP connection under the WebSocket.
func acceptWS(w http.ResponseWriter, r *http.Request, opts *websocket.AcceptOptions) (*websocket.Conn, *rawSocket, error) {
	unbound(w, true)
	raw := &rawSocket{}
	o := *opts
	o.OnPongReceived = func(context.Context, []byte) { raw.pinger.pong() }
	if hj, ok := w.(http.Hijacker); ok {
		w = smallBuffers{ResponseWriter: w, hj: hj, raw: raw}
	}
	// Accept fails unless it has hijacked the connection through w.
	ws, err := websocket.Accept(w, r, &o)
	if err == nil {
		raw.takeHeld()
		raw.prepare()
	}
	return ws, raw, err
}

// smallBuffers hijacks with buffers of wsReadBuffer and wsWriteBuffer bytes,
// and keeps the connection and the reader in raw.
type smallBuffers struct {
	http.ResponseWriter
	hj  http.Hijacker
	raw *rawSocket
}

func (b smallBuffers) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, brw, err := b.hj.Hijack()
	if err != nil {
		return c, brw, err
	}
	b.raw.nc = c
	if brw.Writer.Buffered() > 0 {
		if err := brw.Writer.Flush(); err != nil {
			return c, brw, err
		}
	}
	b.raw.br, b.raw.held = smallReader(c, brw.Reader)
	return c, bufio.NewReadWriter(b.raw.br, bufio.NewWriterSize(libWriter{b.raw}, wsWriteBuffer)), nil
}

// smallReader is a reader of wsReadBuffer bytes (more when more is held)
// for c that holds what net/http's reader r holds: bytes the client sent
// behind its upgrade request, or right after the answer, which net/http
// writes before it lets go of the connection. It also returns how many
// bytes that is (see takeHeld).
func smallReader(c net.Conn, r *bufio.Reader) (*bufio.Reader, int) {
	n := r.Buffered()
	if n == 0 {
		return bufio.NewReaderSize(c, wsReadBuffer), 0
	}
	held, _ := r.Peek(n)
	br := bufio.NewReaderSize(io.MultiReader(bytes.NewReader(bytes.Clone(held)), c), max(n, wsReadBuffer))
	_, _ = br.Peek(n) // one read, of the held bytes
	return br, n
}

// takeHeld brings back into br, after Accept, the bytes that smallReader
// put there: Accept moves what br holds into a reader ahead of the socket
// (golang/go#32314), and a reader that holds nothing must mean a socket
// that has not been read, as park and frameTooLarge take it. One read, of
// bytes already here: it does not wait.
func (r *rawSocket) takeHeld() {
	if r.held > 0 {
		_, _ = r.br.Peek(r.held)
		r.held = 0
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

func quote(s string) string { return strconv.Quote(s) }

// contextWithCancel is a request's context that also ends on Shutdown.
func contextWithCancel(r *http.Request, s *Server) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(r.Context())
	stop := context.AfterFunc(s.shutdownCtx, cancel)
	return ctx, func() { stop(); cancel() }
}
