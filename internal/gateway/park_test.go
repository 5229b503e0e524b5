package gateway

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/tokenrelay/tokenrelay/internal/auth"
	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
)

func TestControlFrames(t *testing.T) {
	pong := []byte{0x8A, 0x80, 1, 2, 3, 4}
	pong2 := []byte{0x8A, 0x82, 1, 2, 3, 4, 'a', 'b'}
	ping := []byte{0x89, 0x81, 1, 2, 3, 4, 'x'}
	cat := func(bs ...[]byte) []byte { return bytes.Join(bs, nil) }
	for _, c := range []struct {
		name string
		b    []byte
		want int
	}{
		{"empty", nil, 0},
		{"pong", pong, 6},
		{"pong with payload", pong2, 8},
		{"ping", ping, 7},
		{"pong, ping, pong", cat(pong, ping, pong2), 21},
		{"pong, then text", cat(pong, []byte{0x81, 0x80, 0, 0, 0, 0}), 0},
		{"pong cut short", pong2[:7], 0},
		{"header cut short", pong[:1], 0},
		{"unmasked pong", []byte{0x8A, 0x00}, 0},
		{"fragment", []byte{0x0A, 0x80, 1, 2, 3, 4}, 0},
		{"close", []byte{0x88, 0x80, 1, 2, 3, 4}, 0},
		{"long payload length", []byte{0x89, 0xFE, 0, 200, 1, 2, 3, 4}, 0},
	} {
		if got := controlFrames(c.b); got != c.want {
			t.Errorf("%s: controlFrames(% x) = %d, want %d", c.name, c.b, got, c.want)
		}
	}
}

// devServer serves a gateway with cfg and development auth, without a
// store, and shuts it down when the test ends.
func devServer(t *testing.T, cfg Config) (*Server, *httptest.Server) {
	t.Helper()
	a, err := auth.New(auth.Config{Dev: true})
	if err != nil {
		t.Fatal(err)
	}
	s := New(cfg, bustest.Start(t), nil, a)
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = s.Shutdown(ctx)
	})
	return s, srv
}

// keepAlivePeer is a raw WebSocket client of a server that pings every
// few milliseconds.
type keepAlivePeer struct {
	t  *testing.T
	nc net.Conn
	br *bufio.Reader
}

// nextPing reads the server's next frame, which must be its ping.
func (p *keepAlivePeer) nextPing() {
	p.t.Helper()
	hdr := make([]byte, 2)
	if _, err := io.ReadFull(p.br, hdr); err != nil {
		p.t.Fatalf("waiting for a ping: %v", err)
	}
	if hdr[0] != 0x89 || hdr[1] != 0 {
		rest, _ := p.br.Peek(p.br.Buffered())
		p.t.Fatalf("server sent % x % x, want a ping", hdr, rest)
	}
}

func (p *keepAlivePeer) write(b []byte) {
	p.t.Helper()
	if _, err := p.nc.Write(b); err != nil {
		p.t.Fatal(err)
	}
}

// A socket answers the keep-alive however its pong arrives: alone (read
// beneath the library by a parked reader), ahead of or behind a frame in
// the same packet, or cut in two (read by the library). A pong that went
// unseen would let IdleTimeout close the socket before the next ping. A
// client's own ping is answered, with its payload, either way.
func TestKeepAliveSeesEveryPong(t *testing.T) {
	s, srv := devServer(t, Config{QuietCheck: -1, PingInterval: 20 * time.Millisecond, IdleTimeout: 300 * time.Millisecond})
	nc, br := rawUpgrade(t, srv.URL, "/v1/ws", nil)
	p := &keepAlivePeer{t: t, nc: nc, br: br}

	pong := []byte{0x8A, 0x80, 9, 8, 7, 6}
	ping := `{"type":"ping","id":"p"}`
	text := append([]byte{0x81, 0x80 | byte(len(ping)), 0, 0, 0, 0}, ping...) // masked with key 0
	readPong := func() {
		t.Helper()
		hdr := make([]byte, 2)
		for {
			if _, err := io.ReadFull(br, hdr); err != nil {
				t.Fatal(err)
			}
			if hdr[0] == 0x89 {
				p.write(pong) // a ping crossing the answer
				continue
			}
			body := make([]byte, hdr[1]&0x7f)
			if _, err := io.ReadFull(br, body); err != nil || !strings.Contains(string(body), `"pong"`) {
				t.Fatalf("answer to a ping frame: % x %q %v", hdr, body, err)
			}
			return
		}
	}
	clientPing := []byte{0x89, 0x83, 1, 2, 3, 4, 'a' ^ 1, 'b' ^ 2, 'c' ^ 3}
	// readClientPong reads up to the answer to clientPing, and the JSON
	// pong when a text frame went with it (the two come in either order).
	readClientPong := func(withText bool) {
		t.Helper()
		hdr := make([]byte, 2)
		for answered := false; !answered || withText; {
			if _, err := io.ReadFull(br, hdr); err != nil {
				t.Fatal(err)
			}
			body := make([]byte, hdr[1]&0x7f)
			if _, err := io.ReadFull(br, body); err != nil {
				t.Fatal(err)
			}
			switch {
			case hdr[0] == 0x89:
				p.write(pong)
			case hdr[0] == 0x8A && !answered && string(body) == "abc":
				answered = true
			case hdr[0] == 0x81 && withText && strings.Contains(string(body), `"pong"`):
				withText = false
			default:
				t.Fatalf("waiting for the answer to a client ping: % x %q", hdr, body)
			}
		}
	}
	for round := range 3 {
		// A lone frame answered: the reader is parked again, with
		// nothing buffered, before the next bytes arrive.
		p.write(text)
		readPong()
		p.nextPing()
		p.write(pong) // read beneath the library
		p.write(clientPing)
		readClientPong(false)
		// Read by the library: a pong or a ping with a frame, or cut in
		// two.
		p.nextPing()
		p.write(append(append([]byte{}, pong...), text...))
		readPong()
		p.nextPing()
		p.write(pong[:3])
		p.write(pong[3:])
		p.nextPing()
		p.write(append(append([]byte{}, text...), pong...))
		readPong()
		p.write(append(append([]byte{}, text...), clientPing...))
		readClientPong(true)
		t.Logf("round %d: every pong seen, every ping answered", round)
	}
	// Each ping was answered within IdleTimeout: none was counted late.
	var m dto.Metric
	if err := s.m.limitHits.WithLabelValues("idle_timeout").Write(&m); err != nil || m.GetCounter().GetValue() != 0 {
		t.Fatalf("idle timeouts: %v (%v)", m.GetCounter().GetValue(), err)
	}
}

// An idle socket's reader waits in park, not in the library's Read.
func TestIdleSocketParks(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("sockets are parked on Linux only")
	}
	_, srv := devServer(t, Config{QuietCheck: -1, PingInterval: -1})
	rawUpgrade(t, srv.URL, "/v1/ws", nil)
	deadline := time.Now().Add(10 * time.Second)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	buf := make([]byte, 1<<20)
	for {
		stacks := string(buf[:runtime.Stack(buf, true)])
		parked, deep := strings.Contains(stacks, "(*rawSocket).park"), strings.Contains(stacks, "(*Server).readLoop")
		if parked {
			for g := range strings.SplitSeq(stacks, "\n\n") {
				if strings.Contains(g, "(*Server).readLoop") && strings.Contains(g, "websocket.(*Conn).Read") {
					t.Fatalf("an idle socket's reader waits in the library:\n%s", g)
				}
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no reader parked within 10s (a read loop running: %v)", deep)
		}
		<-tick.C
	}
}
