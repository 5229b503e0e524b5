package gateway

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// A Shutdown whose context ends before a peer answers the close handshake
// still closes that peer's socket at once. Sockets are read without a
// context, so nothing but the hard stop would close it before the
// library's own five-second wait for the peer's close frame.
func TestShutdownClosesSocketsOfPeersThatDoNotAnswer(t *testing.T) {
	s, srv := devServer(t, Config{QuietCheck: -1, PingInterval: -1})

	// A peer that upgrades and then never reads or answers again.
	nc, br := rawUpgrade(t, srv.URL, "/v1/ws", nil)
	// A ping answered: the socket is registered and its read loop runs.
	ping := `{"type":"ping","id":"p"}`
	frame := append([]byte{0x81, 0x80 | byte(len(ping)), 0, 0, 0, 0}, ping...) // masked with key 0
	if _, err := nc.Write(frame); err != nil {
		t.Fatal(err)
	}
	hdr := make([]byte, 2)
	if _, err := io.ReadFull(br, hdr); err != nil {
		t.Fatal(err)
	}
	pong := make([]byte, hdr[1]&0x7f)
	if _, err := io.ReadFull(br, pong); err != nil || !strings.Contains(string(pong), `"pong"`) {
		t.Fatalf("answer to ping: %q %v", pong, err)
	}

	shutdownWithoutAnswer(t, s, nc, br)
}

// shutdownWithoutAnswer shuts s down with a context that ends before the
// peer nc, which never answers, could; the server's close frame, then the
// end of the stream, must reach the peer well before the library's five
// seconds.
func shutdownWithoutAnswer(t *testing.T, s *Server, nc net.Conn, br *bufio.Reader) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	if err := s.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown = %v, want the context's deadline (the peer never answers)", err)
	}
	_ = nc.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.Copy(io.Discard, br); err != nil {
		t.Fatalf("reading the closed socket: %v, want EOF within 2s", err)
	}
}
