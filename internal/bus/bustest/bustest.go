// Package bustest starts an embedded JetStream server for tests.
package bustest

import (
	"errors"
	"net"
	"sync"
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

// StartUnlistened starts an embedded JetStream server in t.TempDir that
// accepts no other process, as serve's; it stops at the end of the test.
func StartUnlistened(t testing.TB) *bus.Embedded {
	t.Helper()
	emb, err := bus.StartEmbedded(bus.EmbeddedConfig{Options: &server.Options{
		JetStream: true, StoreDir: t.TempDir(), NoLog: true, NoSigs: true, DontListen: true,
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(emb.Shutdown)
	return emb
}

// StartJournaled starts what serve runs in one process: an embedded server
// that accepts no other process, and a Bus on an in-process connection to
// it with a Local and a delta journal in t.TempDir. Everything stops at the
// end of the test, the journal first.
func StartJournaled(t testing.TB) *bus.Bus {
	t.Helper()
	b, _ := StartJournaledIn(t, t.TempDir())
	return b
}

// StartJournaledIn is StartJournaled with the journal in dir, returned too.
func StartJournaledIn(t testing.TB, dir string) (*bus.Bus, *bus.Journal) {
	t.Helper()
	emb := StartUnlistened(t)
	nc, err := nats.Connect(emb.Server.ClientURL(), nats.InProcessServer(emb.Server))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	j, err := bus.OpenJournal(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := j.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { j.Close() })
	b, err := bus.Open(t.Context(), nc, bus.Config{Local: bus.NewLocal(), Journal: j})
	if err != nil {
		t.Fatal(err)
	}
	return b, j
}

// Open connects a new Bus to url.
func Open(t testing.TB, url string, opts ...nats.Option) *bus.Bus {
	t.Helper()
	nc, err := nats.Connect(url, opts...)
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

// Cutter dials NATS for a connection that a test can cut off, as a network
// failure would: Cut closes its sockets and refuses new ones until Restore.
// Use it with nats.SetCustomDialer.
type Cutter struct {
	mu    sync.Mutex
	conns []net.Conn // guarded by mu
	cut   bool       // guarded by mu
}

// Dial implements nats.CustomDialer.
func (c *Cutter) Dial(network, address string) (net.Conn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cut {
		return nil, &net.OpError{Op: "dial", Net: network, Err: errCut}
	}
	conn, err := net.Dial(network, address)
	if err != nil {
		return nil, err
	}
	c.conns = append(c.conns, conn)
	return conn, nil
}

// Cut closes every socket dialled so far and refuses new ones.
func (c *Cutter) Cut() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cut = true
	for _, conn := range c.conns {
		conn.Close()
	}
	c.conns = nil
}

// Restore lets the connection dial again.
func (c *Cutter) Restore() {
	c.mu.Lock()
	c.cut = false
	c.mu.Unlock()
}

var errCut = errors.New("connection cut by the test")

// OpenCuttable connects a new Bus to url through a Cutter, reconnecting
// every 20ms while it is cut.
func OpenCuttable(t testing.TB, url string) (*bus.Bus, *Cutter) {
	t.Helper()
	c := &Cutter{}
	b := Open(t, url, nats.SetCustomDialer(c), nats.MaxReconnects(-1),
		nats.ReconnectWait(20*time.Millisecond), nats.ReconnectJitter(0, 0))
	return b, c
}
