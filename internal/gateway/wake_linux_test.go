package gateway

import (
	"bufio"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t *testing.T) (server, client net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-accepted
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { server.Close(); client.Close() })
	return server, client
}

// waitFor polls cond until it holds, failing the test after 10s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 10s", what)
		}
		<-tick.C
	}
}

// The wake set reports a parked socket once bytes arrive, and its poke
// sets the read deadline that wakes the reader; unpoke clears it before
// anyone reads, and the bytes are all there.
func TestWakeSetPokesAReadableParkedSocket(t *testing.T) {
	if wakes == nil {
		t.Skip("no epoll")
	}
	server, client := tcpPair(t)
	r := &rawSocket{nc: server, br: bufio.NewReader(server)}
	r.prepare()
	if r.rc == nil {
		t.Fatal("no raw connection")
	}
	defer r.forgetWake()
	r.mu.Lock()
	r.parked = true
	r.mu.Unlock()
	r.armWake()
	wakes.poll()
	if r.poked {
		t.Fatal("poked before anything arrived")
	}
	if _, err := client.Write([]byte("cancel")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the wake set pokes the socket", func() bool {
		wakes.poll()
		r.mu.Lock()
		defer r.mu.Unlock()
		return r.poked
	})
	if _, err := server.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a read of the poked socket: %v, want the deadline", err)
	}
	r.mu.Lock()
	if !r.unpoke() {
		t.Fatal("unpoke found no poke")
	}
	r.parked = false
	r.mu.Unlock()
	if r.poke() {
		t.Fatal("poked a socket that is not parked")
	}
	got := make([]byte, 6)
	if _, err := io.ReadFull(server, got); err != nil || string(got) != "cancel" {
		t.Fatalf("read %q, %v", got, err)
	}
	// One-shot: reported once per arming.
	if _, err := client.Write([]byte("more")); err != nil {
		t.Fatal(err)
	}
	r.mu.Lock()
	r.parked = true
	r.mu.Unlock()
	wakes.poll()
	if r.poked {
		t.Fatal("reported again without being armed")
	}
}

// parkedSocket serves one WebSocket and returns its raw socket once its
// reader waits in park, with a raw client of it.
func parkedSocket(t *testing.T) (*rawSocket, net.Conn, *bufio.Reader) {
	t.Helper()
	s, srv := devServer(t, Config{QuietCheck: -1, PingInterval: -1})
	nc, br := rawUpgrade(t, srv.URL, "/v1/ws", nil)
	var r *rawSocket
	waitFor(t, "the socket parks", func() bool {
		s.mu.Lock()
		for _, o := range s.open {
			r = o.raw
		}
		s.mu.Unlock()
		if r == nil {
			return false
		}
		r.mu.Lock()
		defer r.mu.Unlock()
		return r.parked
	})
	return r, nc, br
}

// pingText is a masked {"type":"ping"} frame with id; the answer holds
// `"pong"` and the id.
func pingText(id string) []byte {
	ping := `{"type":"ping","id":"` + id + `"}`
	return append([]byte{0x81, 0x80 | byte(len(ping)), 0, 0, 0, 0}, ping...) // masked with key 0
}

// A reader poked with nothing to read parks again, and what the client
// sends next is read as ever: the deadline that woke it is gone.
func TestPokedReaderParksAgain(t *testing.T) {
	if wakes == nil {
		t.Skip("no epoll")
	}
	r, nc, br := parkedSocket(t)
	for i := range 3 {
		if !r.poke() {
			t.Fatalf("poke %d: the reader was not parked", i)
		}
		waitFor(t, "the poked reader parks again", func() bool {
			r.mu.Lock()
			defer r.mu.Unlock()
			return r.parked && !r.poked
		})
	}
	if _, err := nc.Write(pingText("p1")); err != nil {
		t.Fatal(err)
	}
	_, payload := readFrame(t, br)
	if !strings.Contains(string(payload), `"pong"`) || !strings.Contains(string(payload), `"p1"`) {
		t.Fatalf("answer %s", payload)
	}
}

// Pokes racing the runtime's own wake-ups, at every point of a reader's
// round, lose nothing: every frame is answered, in order, and the
// connection stays up.
func TestPokesRacingReadsLoseNothing(t *testing.T) {
	if wakes == nil {
		t.Skip("no epoll")
	}
	r, nc, br := parkedSocket(t)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			wakes.poll()
			r.poke()
		}
	}()
	defer func() { close(stop); wg.Wait() }()
	const n = 300
	for i := range n {
		frame := pingText("p" + itoa(i))
		if i%3 == 1 {
			frame = append([]byte{0x8A, 0x80, 1, 2, 3, 4}, frame...) // a pong in front
		}
		if _, err := nc.Write(frame); err != nil {
			t.Fatal(err)
		}
		_, payload := readFrame(t, br)
		if !strings.Contains(string(payload), `"p`+itoa(i)+`"`) {
			t.Fatalf("answer %d: %s", i, payload)
		}
	}
	t.Logf("%d polls woke a reader", wakes.polls.Load())
}
