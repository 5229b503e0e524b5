package trtest

import (
	"path/filepath"
	"testing"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/tokenrelay/tokenrelay/internal/bus"
)

// ScaleOutDeps starts what a gateway and a worker run against, for t alone:
// an embedded NATS server with JetStream, and a SQLite file both can open.
// It returns the server (to stop it, say) and the --nats-url and
// --store-url to give them.
func ScaleOutDeps(t testing.TB) (ns *bus.Embedded, natsURL, storeURL string) {
	t.Helper()
	dir := t.TempDir()
	ns, err := bus.StartEmbedded(bus.EmbeddedConfig{Options: &server.Options{
		JetStream: true, StoreDir: filepath.Join(dir, "js"), Host: "127.0.0.1", Port: -1, NoSigs: true, NoLog: true,
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Server.Shutdown)
	return ns, ns.Server.ClientURL(), "sqlite://" + filepath.Join(dir, "tr.db")
}

// StartScaleOut starts a worker and a gateway (on a free loopback port,
// with gatewayArgs) against ScaleOutDeps, for t alone, and waits until the
// gateway is ready. A test that kills the worker has a turn whose producer
// is gone.
func StartScaleOut(t testing.TB, gatewayArgs ...string) (g, w *Proc) {
	t.Helper()
	_, natsURL, storeURL := ScaleOutDeps(t)
	common := []string{"--nats-url", natsURL, "--store-url", storeURL}
	w = Start(t, append([]string{"worker"}, common...)...)
	g = Start(t, append(append([]string{"gateway", "--addr", "127.0.0.1:0"}, gatewayArgs...), common...)...)
	g.WaitReady(t)
	return g, w
}
