package gateway

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// A frame over --limit-frame-bytes whose header reaches the gateway in two
// pieces is still refused by the gateway, after the answers to the frames
// ahead of it, and not by the library, which closes at once. The first
// byte travels with a ping, so the reader holds it when the ping's answer
// comes back.
func TestOversizedFrameWithHeaderCutInTwo(t *testing.T) {
	_, nc, br, frame := headerCutInTwo(t)
	if _, err := nc.Write(frame[1:]); err != nil {
		t.Fatal(err)
	}
	op, payload := readFrame(t, br)
	if op&0x0F != 0x8 || len(payload) < 2 {
		t.Fatalf("frame %#x % x, want a close", op, payload)
	}
	code, reason := binary.BigEndian.Uint16(payload), payload[2:]
	if code != 1009 || !bytes.Equal(reason, []byte("frame over 1024 bytes")) {
		t.Fatalf("closed %d %q, want 1009 from the gateway", code, reason)
	}
}

// A peer that stops inside a frame's header is still closed by Shutdown,
// whose hard stop ends the reader's wait for the rest.
func TestShutdownClosesPeerStoppedInsideAHeader(t *testing.T) {
	s, nc, br, _ := headerCutInTwo(t)
	shutdownWithoutAnswer(t, s, nc, br)
}

// headerCutInTwo serves a gateway with a 1024-byte frame limit and sends
// it a ping and the first byte of a 1025-byte frame, which it returns, in
// one write; it returns once the ping is answered, when the gateway's
// reader holds that byte.
func headerCutInTwo(t *testing.T) (*Server, net.Conn, *bufio.Reader, []byte) {
	t.Helper()
	s, srv := devServer(t, Config{QuietCheck: -1, PingInterval: -1, Limits: Limits{FrameBytes: 1024}})
	nc, br := rawUpgrade(t, srv.URL, "/v1/ws", nil)
	frame := []byte{0x81, 0x80 | 126, 0, 0, 0, 0, 0, 0} // masked with key 0
	binary.BigEndian.PutUint16(frame[2:], 1025)
	frame = append(frame, bytes.Repeat([]byte(" "), 1025)...)
	if _, err := nc.Write(append(pingText("p1"), frame[:1]...)); err != nil {
		t.Fatal(err)
	}
	if _, payload := readFrame(t, br); !strings.Contains(string(payload), `"p1"`) {
		t.Fatalf("answer %s", payload)
	}
	return s, nc, br, frame
}

// A connection whose first frames came with its upgrade request, or before
// net/http let go of it, still gets the gateway's small reader: its reader
// parks once those frames are answered, and what follows is read as ever.
func TestFramesBehindTheUpgradeThenPark(t *testing.T) {
	s, srv := devServer(t, Config{QuietCheck: -1, PingInterval: -1})
	nc, br := rawUpgrade(t, srv.URL, "/v1/ws", append(pingText("p0"), pingText("p1")...))
	for _, id := range []string{"p0", "p1"} {
		if _, payload := readFrame(t, br); !strings.Contains(string(payload), `"`+id+`"`) {
			t.Fatalf("answer %s, want %s's", payload, id)
		}
	}
	waitFor(t, "the socket parks", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, o := range s.open {
			o.raw.mu.Lock()
			parked := o.raw.parked
			o.raw.mu.Unlock()
			return parked
		}
		return false
	})
	if _, err := nc.Write(pingText("p2")); err != nil {
		t.Fatal(err)
	}
	if _, payload := readFrame(t, br); !strings.Contains(string(payload), `"p2"`) {
		t.Fatalf("answer %s", payload)
	}
}

// A peer that leaves a frame unfinished has its connection closed all the
// same when the gateway closes it: the library's close handshake would
// read that frame to its end before it looked for the peer's close frame,
// and wait for bytes that never come.
func TestCloseOfPeerWithAFrameUnfinished(t *testing.T) {
	t.Parallel()
	_, srv := devServer(t, Config{QuietCheck: -1, PingInterval: -1, Limits: Limits{BadFrames: 1}})
	nc, br := rawUpgrade(t, srv.URL, "/v1/ws", nil)
	bad := []byte{0x81, 0x80 | 5, 0, 0, 0, 0, '{', 'n', 'o', 'p', 'e'}
	// Two bad frames close the connection with 1008; the first byte of a
	// third frame follows them.
	if _, err := nc.Write(append(append(bad, bad...), 0x81)); err != nil {
		t.Fatal(err)
	}
	for {
		op, _ := readFrame(t, br)
		if op&0x0F == 0x8 {
			break
		}
	}
	// The peer answers the close, as a client does.
	if _, err := nc.Write([]byte{0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE8}); err != nil {
		t.Fatal(err)
	}
	_ = nc.SetReadDeadline(time.Now().Add(closeHandshakeMax + 5*time.Second))
	if _, err := io.Copy(io.Discard, br); err != nil {
		t.Fatalf("reading the closed socket: %v, want EOF within %v", err, closeHandshakeMax)
	}
}
