package cluster_test

import (
	"net"
	"net/url"
	"sync"
	"testing"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// holdProxy is a TCP proxy between a process and a NATS server that a test
// can hold: nothing goes through it either way, and its connections stay
// open, as when the server is frozen (SIGSTOP) or the network drops the
// packets without a reset, until it is released.
type holdProxy struct {
	addr string

	mu     sync.Mutex
	held   bool
	resume chan struct{} // closed on release; guarded by mu
	conns  int           // connections accepted; guarded by mu
}

// newHoldProxy starts a proxy to target (host:port); it is closed at the end
// of the test.
func newHoldProxy(t testing.TB, target string) *holdProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &holdProxy{addr: ln.Addr().String(), resume: make(chan struct{})}
	var conns sync.Map
	t.Cleanup(func() {
		ln.Close()
		p.release()
		conns.Range(func(k, _ any) bool { k.(net.Conn).Close(); return true })
	})
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.mu.Lock()
			held := p.held
			p.conns++
			p.mu.Unlock()
			if held {
				c.Close() // a frozen server takes no new connection either
				continue
			}
			s, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			conns.Store(c, true)
			conns.Store(s, true)
			go p.pipe(s, c)
			go p.pipe(c, s)
		}
	}()
	return p
}

// pipe copies src to dst, waiting before each read and each write while
// the proxy is held.
func (p *holdProxy) pipe(dst, src net.Conn) {
	defer dst.Close()
	defer src.Close()
	buf := make([]byte, 32<<10)
	for {
		p.wait()
		n, err := src.Read(buf)
		if n > 0 {
			p.wait()
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (p *holdProxy) wait() {
	p.mu.Lock()
	held, resume := p.held, p.resume
	p.mu.Unlock()
	if held {
		<-resume
	}
}

// hold stops everything going through the proxy.
func (p *holdProxy) hold() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.held {
		p.held, p.resume = true, make(chan struct{})
	}
}

// release lets it through again.
func (p *holdProxy) release() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.held {
		p.held = false
		close(p.resume)
	}
}

// accepted is how many connections the proxy has accepted.
func (p *holdProxy) accepted() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.conns
}

// natsAddr is the host:port of a nats:// URL.
func natsAddr(t testing.TB, u string) string {
	t.Helper()
	pu, err := url.Parse(u)
	if err != nil {
		t.Fatal(err)
	}
	return pu.Host
}

// A gateway whose NATS server stops answering (frozen, or the packets
// dropped: the connection stays open) answers each request that needs
// the broker with an error frame, unavailable, rather than never: a send,
// a cancel and a join, each on a connection of its own.
func TestGatewayBrokerThatHangs(t *testing.T) {
	pg := postgresURL(t)
	nc := startNATS(t)
	px := newHoldProxy(t, natsAddr(t, nc.nodes[0].Server.ClientURL()))
	c := &cluster{nats: nc, store: pg}
	c.common = []string{"--nats-url", nc.URLs(), "--store-url", pg, "--replicas", "3"}
	migrate(t, pg)
	c.startWorker(t)
	c.startGateway(t, "--nats-url", "nats://"+px.addr)

	running := trtest.Dial(t, c.gw[0].WSURL(), nil)
	running.Join("hang-running", nil)
	send(running, "hang-running", "t-long", "go on [sim tokens=5000 rate=50]")
	until(t, running, &trtest.Turn{ID: "t-long"}, 3)

	px.hold()
	clients := map[string]*trtest.Client{}
	for _, id := range []string{"send", "cancel", "join"} {
		clients[id] = trtest.Dial(t, c.gw[0].WSURL(), nil)
	}
	send(clients["send"], "hang-send", "send", "hello [sim tokens=5 rate=0]")
	clients["cancel"].Send(map[string]any{"type": "cancel", "turn_id": "t-long", "id": "cancel"})
	clients["join"].Send(map[string]any{"type": "join", "conversation_id": "hang-join", "id": "join"})
	for id, cl := range clients {
		fs := cl.Until(wait, func(f trtest.Frame) bool {
			return f.Str("id") == id && (f.Type() == "error" || f.Type() == "ack" || f.Type() == "joined")
		})
		if f := fs[len(fs)-1]; f.Type() != "error" || f.Str("code") != "unavailable" {
			t.Errorf("%s while the broker hangs answered %v, want an unavailable error", id, f)
		}
	}
}

// A worker whose NATS server stops answering while it streams a turn (the
// server frozen, or the packets dropped: the connection stays open) finds
// the connection stale within seconds and goes on through another server
// of the cluster: the turn completes. Left on the dead connection for
// nats.go's default of two missed pings two minutes apart, its deltas'
// retries would run out long before, and the turn would wait for that.
func TestWorkerBrokerThatHangs(t *testing.T) {
	pg := postgresURL(t)
	nc := startNATS(t)
	pa := newHoldProxy(t, natsAddr(t, nc.nodes[0].Server.ClientURL()))
	pb := newHoldProxy(t, natsAddr(t, nc.nodes[1].Server.ClientURL()))
	c := &cluster{nats: nc, store: pg, workerX: []string{"--nats-url", "nats://" + pa.addr + ",nats://" + pb.addr}}
	c.common = []string{"--nats-url", nc.URLs(), "--store-url", pg, "--replicas", "3"}
	migrate(t, pg)
	c.startWorker(t)
	c.startGateway(t)
	used := pa
	if pb.accepted() > 0 {
		used = pb
	}

	cl := trtest.Dial(t, c.gw[0].WSURL(), nil)
	cl.Join("hang-worker", nil)
	send(cl, "hang-worker", "t-hang", "go on [sim tokens=60 rate=20]")
	tr := &trtest.Turn{ID: "t-hang"}
	until(t, cl, tr, 3)
	used.hold()
	finish(t, cl, tr)
	if tr.Status != "complete" || tr.Ends != 1 {
		t.Fatalf("the turn ended %d× %s after %d deltas, want once complete", tr.Ends, tr.Status, tr.Seq)
	}
}
