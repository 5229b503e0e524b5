package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/tokenrelay/tokenrelay/internal/auth"
	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/gateway"
	"github.com/tokenrelay/tokenrelay/internal/provider"
	"github.com/tokenrelay/tokenrelay/internal/provider/openai"
	"github.com/tokenrelay/tokenrelay/internal/provider/sim"
	"github.com/tokenrelay/tokenrelay/internal/store"
	"github.com/tokenrelay/tokenrelay/internal/store/postgres"
	"github.com/tokenrelay/tokenrelay/internal/store/sqlite"
	"github.com/tokenrelay/tokenrelay/internal/worker"
	"github.com/tokenrelay/tokenrelay/web"
)

func newLogger(c *config, w io.Writer) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(c.LogLevel)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: lvl}
	switch c.LogFormat {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format must be text or json")
}

func newFlagSet(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("tokenrelay "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

// openStore opens the store named by --store-url, or SQLite in dataDir.
func openStore(ctx context.Context, url, dataDir string) (store.Store, error) {
	switch {
	case url == "" && dataDir != "":
		return sqlite.Open(ctx, filepath.Join(dataDir, "tokenrelay.db"))
	case url == "":
		return nil, errors.New("--store-url is required")
	case strings.HasPrefix(url, "postgres://"), strings.HasPrefix(url, "postgresql://"):
		return postgres.Open(ctx, url)
	case strings.HasPrefix(url, "sqlite://"):
		return sqlite.Open(ctx, strings.TrimPrefix(url, "sqlite://"))
	}
	return nil, fmt.Errorf("--store-url must start with sqlite:// or postgres://")
}

// startAttrs are what a process's first log line says of it besides its
// address: its version, its store (a SQLite file, or a PostgreSQL host and
// database, never a user or password) and where its NATS is.
func startAttrs(c *config) []any {
	st := "sqlite://" + filepath.Join(c.DataDir, "tokenrelay.db")
	switch u, err := url.Parse(c.StoreURL); {
	case c.StoreURL == "":
	case err == nil && (u.Scheme == "postgres" || u.Scheme == "postgresql"):
		st = "postgres://" + u.Host + u.Path
	case err == nil && u.Scheme == "sqlite":
		st = c.StoreURL
	default:
		st = "unknown"
	}
	nats := "external"
	if c.NATSURL == "" {
		nats = "embedded"
		if c.NATSListen != "" {
			nats = "embedded, listening on " + c.NATSListen
		}
	}
	return []any{"version", version, "store", st, "nats", nats}
}

// checkWritable fails with a clear reason when dir cannot hold files.
func checkWritable(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("data dir %s is not writable: %w", dir, err)
	}
	f, err := os.CreateTemp(dir, ".write-check-*")
	if err != nil {
		return fmt.Errorf("data dir %s is not writable: %w", dir, err)
	}
	name := f.Name()
	f.Close()
	return os.Remove(name)
}

// connectNATS connects to the external servers of --nats-url.
func connectNATS(c *config, name string, log *slog.Logger) (*nats.Conn, error) {
	opts := []nats.Option{
		nats.Name(name), nats.MaxReconnects(-1), nats.ReconnectWait(250 * time.Millisecond),
		// No buffer while reconnecting: a publish made then fails at
		// once. Buffered, it would go out after the reconnection, when
		// its caller has long taken it for failed: a delta landing in a
		// turn that another worker has ended meanwhile.
		nats.ReconnectBufSize(-1),
		// A server that stops answering with the connection left open
		// (frozen, or the packets dropped on the way) is found out by
		// its missed pings: with nats.go's defaults, two minutes apart,
		// that takes four to six, while every publish and read on it
		// fails at its timeout and no job is pulled. Then the connection
		// goes to another server of the cluster.
		nats.PingInterval(natsPingInterval), nats.MaxPingsOutstanding(natsMaxPingsOut),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err == nil {
				log.Info("nats disconnected") // closed by this process
				return
			}
			log.Warn("nats disconnected", "err", err)
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) { log.Warn("nats reconnected", "url", nc.ConnectedUrlRedacted()) }),
		nats.ErrorHandler(logNATSError(log)),
	}
	if c.NATSCreds != "" {
		opts = append(opts, nats.UserCredentials(c.NATSCreds))
	}
	if c.NATSCA != "" {
		opts = append(opts, nats.RootCAs(c.NATSCA))
	}
	if c.NATSCert != "" || c.NATSKey != "" {
		opts = append(opts, nats.ClientCert(c.NATSCert, c.NATSKey))
	}
	nc, err := nats.Connect(c.NATSURL, opts...)
	if err != nil {
		return nil, fmt.Errorf("connect nats: %w", err)
	}
	return nc, nil
}

// A connection whose server has not answered natsMaxPingsOut pings sent
// natsPingInterval apart is dropped and made again, to another server when
// the URL names several: 10 to 15 s after the server stopped answering.
const (
	natsPingInterval = 5 * time.Second
	natsMaxPingsOut  = 2
)

// logNATSError logs the connection's asynchronous errors (a slow
// consumer, a JetStream consumer that could not be recreated, a permission
// denied) as warnings, where nats.go would print them to stderr unformatted.
func logNATSError(log *slog.Logger) nats.ErrHandler {
	return func(_ *nats.Conn, sub *nats.Subscription, err error) {
		if sub != nil {
			log.Warn("nats error", "err", err, "subject", sub.Subject)
			return
		}
		log.Warn("nats error", "err", err)
	}
}

// openBus opens the bus on nc; local, when not nil, carries live events
// inside the process (see bus.Local), and journal, when not nil, makes the
// deltas published through it live once journaled (see bus.Journal). log
// is told when the process changes the replicas or retention of the
// streams that every process shares.
func openBus(ctx context.Context, c *config, nc *nats.Conn, local *bus.Local, journal *bus.Journal, log *slog.Logger) (*bus.Bus, error) {
	if c.Retention > 0 && c.Retention < time.Second {
		return nil, fmt.Errorf("--retention must be 0 (kept for good) or at least 1s, not %v", c.Retention)
	}
	return bus.Open(ctx, nc, bus.Config{Replicas: c.Replicas, Retention: c.Retention, AckWait: c.AckWait, Local: local, Journal: journal, Log: log})
}

// newProvider builds the model provider and the model allow-list check.
func newProvider(c *config, log *slog.Logger) (provider.Provider, func(string) bool, error) {
	switch c.Provider {
	case "sim":
		allowed := allowList(c)
		return sim.New(sim.Config{Rate: c.SimRate, Tokens: c.SimTokens}), allowed, nil
	case "openai":
		headers := map[string]string{}
		for i, h := range c.OpenAIHeaders {
			k, v, ok := strings.Cut(h, ":")
			if !ok || strings.TrimSpace(k) == "" {
				// Not quoted: a header given without its colon may be a
				// secret (an API key), and this goes to stderr.
				return nil, nil, fmt.Errorf("--openai-header #%d (%d bytes) has no header name before a colon: want \"Name: value\"", i+1, len(h))
			}
			headers[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
		// On the command line 0 means "none"; in openai.Config a zero value
		// means "the default" and a negative one "none".
		off := func(d time.Duration) time.Duration {
			if d == 0 {
				return -1
			}
			return d
		}
		offInt := func(n int) int {
			if n == 0 {
				return -1
			}
			return n
		}
		p, err := openai.New(openai.Config{
			BaseURL: c.OpenAIBaseURL, APIKey: c.OpenAIAPIKey, Model: c.Model, Models: splitList(c.Models),
			Headers: headers, SystemPrompt: c.SystemPrompt, ContextBudgetBytes: offInt(c.ContextBudget),
			ConnectTimeout: off(c.OpenAIConnect), FirstTokenTimeout: off(c.OpenAIFirstToken), IdleTimeout: off(c.OpenAIIdle),
			MaxRetries: offInt(c.OpenAIMaxRetries), Logger: log,
		})
		if err != nil {
			return nil, nil, err
		}
		return p, p.Allowed, nil
	}
	return nil, nil, fmt.Errorf("--provider must be sim or openai, not %q", c.Provider)
}

// allowList is the simulator's check of send.model: the default model (the
// one turns report when a send names none) and those of --models.
func allowList(c *config) func(string) bool {
	def, models := defaultModel(c), splitList(c.Models)
	return func(m string) bool { return m == "" || m == def || slices.Contains(models, m) }
}

// newAuth applies the dev-mode rule of PROTOCOL.md: dev is on by default
// only on a loopback address with no JWT key; on any other address without
// a key, starting requires an explicit --dev.
func newAuth(c *config, log *slog.Logger, stderr io.Writer) (*auth.Authenticator, error) {
	// An address that is not one is said to be so, rather than taken for
	// a public one that needs authentication.
	if _, _, err := net.SplitHostPort(c.Addr); err != nil {
		return nil, fmt.Errorf("--addr %s: %w", c.Addr, err)
	}
	hasKey := c.JWTSecret != "" || c.JWTPublicKey != ""
	loopback := auth.IsLoopback(c.Addr)
	dev := c.Dev
	if !c.devSet {
		dev = loopback && !hasKey
		if !loopback && !hasKey {
			return nil, fmt.Errorf("refusing to serve %s without authentication: set --jwt-secret or --jwt-public-key, or pass --dev to accept anyone as user dev", c.Addr)
		}
	}
	if dev && !loopback {
		log.Warn("DEV MODE ON A NON-LOOPBACK ADDRESS: anyone who can reach this server is user dev", "addr", c.Addr)
		// Also past any --log-level: this must not go unseen.
		fmt.Fprintf(stderr, "tokenrelay: WARNING: --dev on %s: no authentication, anyone who can reach this address is user dev\n", c.Addr)
	}
	if dev && hasKey {
		// A token's user and a tokenless one mix: the compatible paths
		// take the user_id a tokenless request names (COMPAT.md), so
		// anyone may act there as any user the tokens name.
		log.Warn("DEV MODE WITH A JWT KEY: a request without a token to the compatible paths acts as whatever user_id it names, token users included")
		fmt.Fprintf(stderr, "tokenrelay: WARNING: --dev with a JWT key: the compatible paths (/ws/chat, /api/…) take the user_id a request without a token names, so anyone can act there as any token's user\n")
	}
	cfg := auth.Config{Dev: dev, HS256Secret: []byte(c.JWTSecret), Issuer: c.JWTIssuer, Audience: c.JWTAudience}
	if c.JWTSecret == "" {
		cfg.HS256Secret = nil
	}
	if c.JWTPublicKey != "" {
		pem, err := readPEM(c.JWTPublicKey)
		if err != nil {
			return nil, err
		}
		cfg.PublicKeyPEM = pem
	}
	return auth.New(cfg)
}

func newRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

func gatewayConfig(c *config, log *slog.Logger, reg *prometheus.Registry, allowed func(string) bool, probes map[string]func(context.Context) error, dev bool) gateway.Config {
	// The node's name in health answers: its host and process, which
	// stay unique when several gateways share a host (--addr :0 does not).
	hostname, _ := os.Hostname()
	return gateway.Config{
		Limits: c.Limits, AllowedOrigins: splitList(c.AllowedOrigins), CompatOrigins: splitList(c.CompatOrigins), DefaultModel: defaultModel(c),
		ModelAllowed: allowed, DeltaTimestamps: c.DeltaTimestamps, CancelWait: c.CancelWait,
		PingInterval: c.PingInterval, IdleTimeout: c.IdleTimeout, QuietCheck: c.QuietCheck, WriteTimeout: c.WriteTimeout, ReadTimeout: c.ReadTimeout, ReadyProbes: probes,
		Static: web.Static(), NodeID: fmt.Sprintf("%s-%d", hostname, os.Getpid()), Logger: log, Registry: reg, Gatherer: reg,
		// Dev mode on a loopback address trusts whoever can reach it, which
		// a rebound name would extend to any web page.
		LoopbackHostsOnly: dev && auth.IsLoopback(c.Addr),
	}
}

func defaultModel(c *config) string {
	if c.Model != "" {
		return c.Model
	}
	if c.Provider == "sim" {
		return "sim"
	}
	return ""
}

func workerConfig(c *config, log *slog.Logger, reg prometheus.Registerer) worker.Config {
	wc := worker.Config{
		Concurrency: c.WorkerConcurrency, SnapshotInterval: c.SnapshotInterval, JournalSaveInterval: c.JournalSave,
		BatchWindow:     c.BatchWindow,
		DeltaTimestamps: c.DeltaTimestamps, StartGrace: c.StartGrace, StoreTimeout: c.StoreTimeout, QueuedTimeout: c.QueuedTimeout, Retention: c.Retention, Logger: log, Registry: reg,
	}
	if c.Provider == "sim" {
		wc.ContextMessages = 1 // the simulator reads only the message it answers
	}
	if c.TokensPerHour > 0 {
		wc.TokenBudget = &countedBudget{TokenBudget: worker.NewHourlyBudget(c.TokensPerHour, nil), reg: reg, log: log}
	}
	return wc
}

// countedBudget counts the turns its budget refuses or stops as
// tokenrelay_limit_hits_total{limit="tokens_per_hour"}, beside the
// gateway's own limits.
type countedBudget struct {
	worker.TokenBudget
	reg  prometheus.Registerer
	log  *slog.Logger
	once sync.Once
	hits prometheus.Counter // set by once
}

func (b *countedBudget) Allow(user string) (bool, string) {
	ok, msg := b.TokenBudget.Allow(user)
	if !ok {
		b.counter().Inc()
	}
	return ok, msg
}

// Take counts a turn that the budget stops while it streams.
func (b *countedBudget) Take(user string, c *worker.Charge) (bool, string) {
	ok, msg := b.TokenBudget.Take(user, c)
	if !ok {
		b.counter().Inc()
	}
	return ok, msg
}

// counter registers the counter on first use, not at start: serve's gateway
// registers the same vector after the worker is built, and an identical
// registration now returns the gateway's (a worker alone keeps its own).
func (b *countedBudget) counter() prometheus.Counter {
	b.once.Do(func() {
		vec := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenrelay_limit_hits_total",
			Help: "Requests refused by a limit, by limit."}, []string{"limit"})
		if b.reg != nil {
			var are prometheus.AlreadyRegisteredError
			err := b.reg.Register(vec)
			switch {
			case errors.As(err, &are):
				if existing, ok := are.ExistingCollector.(*prometheus.CounterVec); ok {
					vec = existing
				}
			case err != nil:
				b.log.Warn("token budget hits are not exported", "err", err)
			}
		}
		b.hits = vec.WithLabelValues("tokens_per_hour")
	})
	return b.hits
}

func providerProbe(p provider.Provider) map[string]func(context.Context) error {
	if pg, ok := p.(provider.Pinger); ok {
		return map[string]func(context.Context) error{"provider": pg.Ping}
	}
	return nil
}

// serveHTTP runs h on ln until ctx is done, then shuts it down. A request's
// headers must arrive within read (and the gateway bounds its body and its
// answer: see gateway.Server.ServeHTTP); a connection idle longer than idle
// between requests is closed, so that idle keep-alive connections do not
// hold file descriptors for good.
func serveHTTP(ln net.Listener, h http.Handler, read, idle time.Duration, log *slog.Logger) (*http.Server, <-chan error) {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: read, IdleTimeout: idle, ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	errc := make(chan error, 1)
	go func() {
		err := srv.Serve(ln)
		if errors.Is(err, http.ErrServerClosed) {
			err = nil
		}
		errc <- err
	}()
	return srv, errc
}
