// Package bustest starts an embedded JetStream server for tests.
package bustest

import (
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/tokenrelay/tokenrelay/internal/bus"
)

// Start runs an in-process nats-server with JetStream in t.TempDir on a
// random port and returns a Bus on a fresh connection. Everything stops at
// the end of the test.
func Start(t testing.TB) *bus.Bus {
	t.Helper()
	emb, err := bus.StartEmbedded(bus.EmbeddedConfig{Options: &server.Options{
		JetStream: true, StoreDir: t.TempDir(), Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true,
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(emb.Shutdown)
	return Open(t, emb.Server.ClientURL())
}

// Open connects a new Bus to url.
func Open(t testing.TB, url string) *bus.Bus {
	t.Helper()
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	b, err := bus.Open(t.Context(), nc, bus.Config{AckWait: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return b
}
