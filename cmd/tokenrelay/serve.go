package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/gateway"
	"github.com/tokenrelay/tokenrelay/internal/worker"
)

// runServe runs gateway, worker, an embedded NATS JetStream and the store in
// one process.
func runServe(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	cp, log, err := load("serve", roleServe, args, getenv, stderr)
	if err != nil {
		return err
	}
	c := *cp
	a, err := newAuth(&c, log, stderr)
	if err != nil {
		return err
	}
	p, allowed, err := newProvider(&c, log)
	if err != nil {
		return err
	}
	stopDebug, err := startDebug(c.DebugAddr, log, stderr)
	if err != nil {
		return fmt.Errorf("debug server: %w", err)
	}
	defer stopDebug()
	if err := checkWritable(c.DataDir); err != nil {
		return err
	}
	unlock, err := lockDataDir(c.DataDir)
	if err != nil {
		return err
	}
	defer unlock()
	ln, err := net.Listen("tcp", c.Addr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", c.Addr, err)
	}
	defer ln.Close()

	st, err := openStore(ctx, c.StoreURL, c.DataDir)
	if err != nil {
		return fmt.Errorf("open store: %w", err)
	}
	defer closeWithin("store", func() { st.Close() }, log)
	hold, err := holdStore(ctx, st, log)
	if err != nil {
		return err
	}
	defer hold.Release()

	var emb *bus.Embedded
	if c.NATSURL == "" {
		natsDir := filepath.Join(c.DataDir, "nats")
		if err := os.MkdirAll(natsDir, 0o755); err != nil {
			return fmt.Errorf("nats store: %w", err)
		}
		if c.NATSListen != "" {
			warnUnauthenticated("--nats-listen", c.NATSListen, "the embedded NATS server (every conversation's text)", log, stderr)
		}
		emb, err = bus.StartEmbedded(bus.EmbeddedConfig{StoreDir: natsDir, Listen: c.NATSListen})
		if err != nil {
			return err
		}
		defer emb.Shutdown()
		if a := emb.Server.Addr(); a != nil {
			log.Info("nats listening", "addr", a.String())
			// The start line names the port taken, not a :0 asked for.
			c.NATSListen = a.String()
		}
	}
	gwNC, err := connect(&c, emb, "tokenrelay-gateway", log)
	if err != nil {
		return err
	}
	defer gwNC.Close()
	wkNC, err := connect(&c, emb, "tokenrelay-worker", log)
	if err != nil {
		return err
	}
	defer wkNC.Close()
	// With no other process able to reach the embedded server, the
	// gateway is the only live subscriber: the worker hands it live
	// events in-process (bus.Local) instead of through NATS, and its
	// deltas are live once in the delta journal, which keeps them until
	// the turn's snapshot does (see startJournal).
	var local *bus.Local
	if c.NATSURL == "" && c.NATSListen == "" {
		local = bus.NewLocal()
	}
	gwBus, err := openBus(ctx, &c, gwNC, local, nil, log)
	if err != nil {
		return err
	}
	journal, err := startJournal(ctx, &c, local, gwBus, log)
	if err != nil {
		return err
	}
	if journal != nil {
		// Deferred after the worker's connection is, so closed before
		// it, once the worker has stopped (below).
		defer journal.Close()
	}
	wkBus, err := openBus(ctx, &c, wkNC, local, journal, log)
	if err != nil {
		return err
	}

	reg := newRegistry()
	w := worker.New(workerConfig(&c, log, reg), wkBus, st, p)
	if local != nil {
		// serve is the only producer of its embedded bus: a turn left
		// unfinished belonged to a previous run that stopped or died.
		// (With --nats-listen, workers of other processes may be
		// producing theirs; the jobs of the previous run's turns are
		// redelivered, and whoever takes one ends its turn if its
		// producer is gone.) Only when no other process uses the store:
		// theirs may be running.
		err := whileAlone(ctx, hold, log, "ending the previous run's unfinished turns", func() error {
			n, err := w.RecoverAll(ctx)
			if err != nil {
				return fmt.Errorf("recover unfinished turns: %w", err)
			}
			if n > 0 {
				log.Info("ended unfinished turns of the previous run as interrupted", "turns", n)
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	gwc := gatewayConfig(&c, log, reg, allowed, providerProbe(p), a.Dev())
	gwc.ModelUnreachable = w.ModelUnreachable
	gw := gateway.New(gwc, gwBus, st, a)

	workerCtx, stopWorker := context.WithCancel(context.WithoutCancel(ctx))
	defer stopWorker()
	workerDone := make(chan error, 1)
	go func() { workerDone <- w.Run(workerCtx) }()

	read, idle := gw.HTTPTimeouts()
	srv, httpDone := serveHTTP(ln, gw, read, idle, log)
	log.Info("listening", append([]any{"addr", ln.Addr().String(), "provider", c.Provider, "dev", a.Dev()}, startAttrs(&c)...)...)
	fmt.Fprintf(stdout, "tokenrelay serve (version %s) listening on http://%s\n", version, ln.Addr())

	var runErr error
	select {
	case <-ctx.Done():
		// Its turns go on during the drain: a short one may end there.
		gw.Drain()
		if c.ShutdownDrain > 0 {
			log.Info("draining before closing connections", "drain", c.ShutdownDrain)
			t := time.NewTimer(c.ShutdownDrain)
			select {
			case <-t.C:
			case <-hurried(ctx):
				log.Info("drain cut short by a second signal")
			case runErr = <-httpDone:
			case runErr = <-workerDone:
				workerDone <- runErr
			}
			t.Stop()
		}
	case runErr = <-httpDone:
	case runErr = <-workerDone:
		workerDone <- runErr
	}
	gw.Drain()
	log.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), c.ShutdownTimeout)
	defer cancel()
	// The worker first: its running turns end as interrupted, saved and
	// announced while the sockets are still open to hear it. No turn is
	// taken meanwhile, since none would be produced.
	gw.StopSends(sctx)
	stopWorker()
	select {
	case err := <-workerDone:
		if err != nil && runErr == nil {
			runErr = err
		}
		if local != nil {
			// The turns still queued would wait for the next start, which
			// ends them as interrupted (above): end them now, while their
			// clients are still connected to hear it.
			_ = whileAlone(sctx, hold, log, "ending the queued turns", func() error {
				n, err := w.RecoverAll(sctx)
				if err != nil {
					log.Warn("end queued turns", "err", err)
				} else if n > 0 {
					log.Info("ended queued turns as interrupted", "turns", n)
				}
				return nil
			})
		}
	case <-sctx.Done():
	}
	_ = gwNC.Flush()
	shutdownHTTP(sctx, gw, srv, log)
	log.Info("stopped")
	return runErr
}

// connect opens a NATS connection: in-process to the embedded server, or to
// --nats-url.
func connect(c *config, emb *bus.Embedded, name string, log *slog.Logger) (*nats.Conn, error) {
	if emb != nil {
		nc, err := emb.Connect(name)
		if err == nil {
			nc.SetErrorHandler(logNATSError(log))
		}
		return nc, err
	}
	return connectNATS(c, name, log)
}

// startJournal opens serve's delta journal (see bus.Journal) when live
// events stay in the process, first storing in the stream, through b, the
// deltas the previous run journaled and announced but had not saved in a
// snapshot when it died: recovery, which comes next, reads them there. Where the journal
// is not supported, deltas are announced once stored, as without a Local.
func startJournal(ctx context.Context, c *config, local *bus.Local, b *bus.Bus, log *slog.Logger) (*bus.Journal, error) {
	if local == nil {
		return nil, nil
	}
	j, err := bus.OpenJournal(filepath.Join(c.DataDir, "journal"), log)
	if err != nil {
		return nil, err
	}
	n, err := j.Replay(ctx, b)
	if err != nil {
		return nil, err
	}
	if n > 0 {
		log.Info("stored the previous run's journaled deltas", "deltas", n)
	}
	if err := j.Start(); err != nil {
		if errors.Is(err, errors.ErrUnsupported) {
			log.Info("no delta journal on this system: deltas are announced once stored")
			return nil, nil
		}
		return nil, err
	}
	return j, nil
}
