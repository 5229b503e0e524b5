// Package bustest starts an embedded JetStream server for tests.
package bustest

import (
	"errors"
	"fmt"
	"net"
	"strings"
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

// FreePorts returns n loopback TCP ports that were free a moment ago: a
// cluster's route ports must be known before any node starts, so Port: -1
// does not do (a clash is unlikely, not ruled out).
func FreePorts(t testing.TB, n int) []int {
	t.Helper()
	ports := make([]int, n)
	lns := make([]net.Listener, n)
	for i := range lns {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lns[i] = ln
		ports[i] = ln.Addr().(*net.TCPAddr).Port
	}
	for _, ln := range lns {
		ln.Close()
	}
	return ports
}

// StartCluster runs an in-process JetStream cluster of n nodes in
// t.TempDir on loopback, waits until every node follows one JetStream meta
// leader, and returns the client URLs of the nodes, comma separated.
// Everything stops at the end of the test.
func StartCluster(t testing.TB, n int) string {
	t.Helper()
	ports := FreePorts(t, n)
	var routes []string
	for _, port := range ports {
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", port))
	}
	var nodes []*bus.Embedded
	var urls []string
	for i := range n {
		opts := &server.Options{
			ServerName: fmt.Sprintf("n%d", i+1),
			JetStream:  true,
			StoreDir:   t.TempDir(),
			Host:       "127.0.0.1",
			Port:       -1,
			Cluster:    server.ClusterOpts{Name: "bustest", Host: "127.0.0.1", Port: ports[i]},
			Routes:     server.RoutesFromStr(strings.Join(routes, ",")),
			NoLog:      true,
			NoSigs:     true,
		}
		emb, err := bus.StartEmbedded(bus.EmbeddedConfig{Options: opts})
		if err != nil {
			t.Fatalf("start nats node %d: %v", i+1, err)
		}
		t.Cleanup(emb.Shutdown)
		nodes = append(nodes, emb)
		urls = append(urls, emb.Server.ClientURL())
	}
	deadline := time.Now().Add(30 * time.Second)
	for !clusterReady(nodes) {
		if time.Now().After(deadline) {
			t.Fatalf("nats cluster: no JetStream meta leader followed by all %d nodes after 30s", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return strings.Join(urls, ",")
}

// clusterReady reports whether nodes have a meta leader that knows every
// one of them and that each is current with.
func clusterReady(nodes []*bus.Embedded) bool {
	var leader *server.Server
	for _, n := range nodes {
		if n.Server.JetStreamIsLeader() {
			leader = n.Server
		}
	}
	if leader == nil || len(leader.JetStreamClusterPeers()) != len(nodes) {
		return false
	}
	for _, n := range nodes {
		if !n.Server.JetStreamIsCurrent() {
			return false
		}
	}
	return true
}
