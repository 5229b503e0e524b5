package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/gateway"
	"github.com/tokenrelay/tokenrelay/internal/store"
	"github.com/tokenrelay/tokenrelay/internal/store/postgres"
	"github.com/tokenrelay/tokenrelay/internal/worker"
)

// runGateway runs only the gateway, against --nats-url and --store-url.
func runGateway(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	cp, log, err := load("gateway", roleGateway, args, getenv, stderr)
	if err != nil {
		return err
	}
	c := *cp
	if c.NATSURL == "" || c.StoreURL == "" {
		return errors.New("gateway needs --nats-url and --store-url")
	}
	log = log.With("role", "gateway")
	a, err := newAuth(&c, log, stderr)
	if err != nil {
		return err
	}
	_, allowed, err := newProvider(&c, log)
	if err != nil {
		return err
	}
	stopDebug, err := startDebug(c.DebugAddr, log, stderr)
	if err != nil {
		return fmt.Errorf("debug server: %w", err)
	}
	defer stopDebug()
	ln, err := net.Listen("tcp", c.Addr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", c.Addr, err)
	}
	defer ln.Close()
	st, b, closeBackends, err := openBackends(ctx, &c, "tokenrelay-gateway", log)
	if err != nil {
		return err
	}
	defer closeBackends()
	reg := newRegistry()
	gw := gateway.New(gatewayConfig(&c, log, reg, allowed, nil, a.Dev()), b, st, a)
	read, idle := gw.HTTPTimeouts()
	srv, httpDone := serveHTTP(ln, gw, read, idle, log)
	log.Info("listening", append([]any{"addr", ln.Addr().String(), "dev", a.Dev()}, startAttrs(&c)...)...)
	fmt.Fprintf(stdout, "tokenrelay gateway (version %s) listening on http://%s\n", version, ln.Addr())
	var runErr error
	select {
	case <-ctx.Done():
		gw.Drain()
		runErr = waitDrain(c.ShutdownDrain, httpDone, hurried(ctx), log)
	case runErr = <-httpDone:
	}
	sctx, cancel := context.WithTimeout(context.Background(), c.ShutdownTimeout)
	defer cancel()
	shutdownHTTP(sctx, gw, srv, log)
	log.Info("stopped")
	return runErr
}

// runWorker runs only a model worker. On SIGTERM it stops taking jobs and
// ends the turns it is producing as interrupted, text saved. A worker has no
// HTTP port unless --metrics-addr gives it one for /metrics and /healthz.
func runWorker(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	cp, log, err := load("worker", roleWorker, args, getenv, stderr)
	if err != nil {
		return err
	}
	c := *cp
	metricsAddr := &c.MetricsAddr
	if c.NATSURL == "" || c.StoreURL == "" {
		return errors.New("worker needs --nats-url and --store-url")
	}
	log = log.With("role", "worker")
	p, _, err := newProvider(&c, log)
	if err != nil {
		return err
	}
	stopDebug, err := startDebug(c.DebugAddr, log, stderr)
	if err != nil {
		return fmt.Errorf("debug server: %w", err)
	}
	defer stopDebug()
	var ln net.Listener
	if *metricsAddr != "" {
		if ln, err = net.Listen("tcp", *metricsAddr); err != nil {
			return fmt.Errorf("listen %s: %w", *metricsAddr, err)
		}
		defer ln.Close()
	}
	st, b, closeBackends, err := openBackends(ctx, &c, "tokenrelay-worker", log)
	if err != nil {
		return err
	}
	defer closeBackends()
	reg := newRegistry()
	w := worker.New(workerConfig(&c, log, reg), b, st, p)
	metrics := "none"
	if ln != nil {
		metrics = ln.Addr().String()
	}
	log.Info("starting", append([]any{"provider", c.Provider, "metrics_addr", metrics}, startAttrs(&c)...)...)
	if ln == nil {
		fmt.Fprintf(stdout, "tokenrelay worker %s running\n", version)
		return runWithin(ctx, w.Run, c.ShutdownTimeout, log)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok\n") })
	srv, _ := serveHTTP(ln, mux, 10*time.Second, time.Minute, log)
	fmt.Fprintf(stdout, "tokenrelay worker (version %s) running, metrics listening on http://%s\n", version, ln.Addr())
	err = runWithin(ctx, w.Run, c.ShutdownTimeout, log)
	_ = srv.Close()
	return err
}

// runWithin runs a worker's Run until it returns, but once ctx is done
// (SIGTERM) for at most timeout more: a worker ending its turns against a
// store or broker that does not answer would otherwise hold the process
// for as long as their calls wait (30 s for a publish, for ever for a hung
// database). Turns it had not ended by then are ended by recovery when
// their jobs come back to another worker.
func runWithin(ctx context.Context, run func(context.Context) error, timeout time.Duration, log *slog.Logger) error {
	done := make(chan error, 1)
	go func() { done <- run(ctx) }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case err := <-done:
		return err
	case <-t.C:
		log.Warn("turns still ending at the shutdown timeout; leaving them to recovery", "timeout", timeout)
		return nil
	}
}

// waitDrain waits d, the drain of a stopping gateway (--shutdown-drain),
// during which it answers /readyz with 503 and goes on serving: a load
// balancer's health checks see the 503 and send new clients elsewhere
// before the open connections are closed with 1001. It ends early, with
// its error, if the HTTP server stops, and when hurry is closed (a second
// signal).
func waitDrain(d time.Duration, httpDone <-chan error, hurry <-chan struct{}, log *slog.Logger) error {
	if d <= 0 {
		return nil
	}
	log.Info("draining before closing connections", "drain", d)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-hurry:
		log.Info("drain cut short by a second signal")
		return nil
	case err := <-httpDone:
		return err
	}
}

// closeGrace is how long a stopping process waits for a store to close.
const closeGrace = 2 * time.Second

// closeWithin calls closeFn, waiting for it at most closeGrace: a pool whose
// connections are held by calls that do not return (a hung database) waits
// for them to be released, and the process is stopping.
func closeWithin(what string, closeFn func(), log *slog.Logger) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		closeFn()
	}()
	t := time.NewTimer(closeGrace)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		log.Warn("still closing at the shutdown timeout; not waiting", "what", what)
	}
}

// runMigrate applies the store's migrations.
func runMigrate(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	// The log flags it takes are checked like every role's, though it
	// logs nothing of its own.
	c, _, err := load("migrate", roleMigrate, args, getenv, stderr)
	if err != nil {
		return err
	}
	if c.StoreURL == "" {
		return errors.New("migrate needs --store-url")
	}
	if len(c.StoreURL) > 8 && (c.StoreURL[:8] == "postgres") {
		if err := postgres.Migrate(ctx, c.StoreURL); err != nil {
			return err
		}
	} else {
		st, err := openStore(ctx, c.StoreURL, "")
		if err != nil {
			return err
		}
		st.Close()
	}
	fmt.Fprintln(stdout, "migrations applied")
	return nil
}

// openBackends opens the store of --store-url and the bus on --nats-url, as
// the gateway and worker roles share them; close releases both.
func openBackends(ctx context.Context, c *config, name string, log *slog.Logger) (_ store.Store, _ *bus.Bus, close func(), err error) {
	st, err := openStore(ctx, c.StoreURL, "")
	if err != nil {
		return nil, nil, nil, fmt.Errorf("open store: %w", err)
	}
	hold, err := holdStore(ctx, st, log)
	if err != nil {
		st.Close()
		return nil, nil, nil, err
	}
	nc, err := connectNATS(c, name, log)
	if err != nil {
		hold.Release()
		st.Close()
		return nil, nil, nil, err
	}
	b, err := openBus(ctx, c, nc, nil, nil, log)
	if err != nil {
		nc.Close()
		hold.Release()
		st.Close()
		return nil, nil, nil, err
	}
	return st, b, func() { nc.Close(); hold.Release(); closeWithin("store", func() { st.Close() }, log) }, nil
}

// shutdownHTTP closes the gateway's connections and then the HTTP server,
// saying so when they did not finish within the shutdown timeout (what was
// left is cut off).
func shutdownHTTP(ctx context.Context, gw *gateway.Server, srv *http.Server, log *slog.Logger) {
	if err := gw.Shutdown(ctx); err != nil {
		log.Warn("connections still open at the shutdown timeout; closing them", "err", err)
	}
	if err := srv.Shutdown(ctx); err != nil {
		log.Warn("requests still running at the shutdown timeout; closing them", "err", err)
		_ = srv.Close()
	}
}
