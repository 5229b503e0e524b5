package security_test

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// deadSocket opens a WebSocket on a raw TCP connection with token and then
// never reads or answers again: a peer that vanished without a FIN.
func deadSocket(t *testing.T, p *trtest.Proc, token string) net.Conn {
	t.Helper()
	addr := strings.TrimPrefix(p.URL, "http://")
	nc, err := net.DialTimeout("tcp", addr, wait)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	req := "GET /v1/ws HTTP/1.1\r\nHost: " + addr + "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" +
		"Authorization: Bearer " + token + "\r\n\r\n"
	if _, err := io.WriteString(nc, req); err != nil {
		t.Fatal(err)
	}
	nc.SetReadDeadline(time.Now().Add(wait))
	resp, err := http.ReadResponse(bufio.NewReader(nc), nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("raw upgrade: %v %v", resp, err)
	}
	return nc
}

// TestIdleTimeout checks --ping-interval and --idle-timeout: a connection
// whose peer stops answering pings is closed and its per-user slot freed,
// while a live connection that answers them stays open however quiet it
// is.
func TestIdleTimeout(t *testing.T) {
	t.Parallel()
	p := serveJWT(t, "--ping-interval", "200ms", "--idle-timeout", "500ms", "--limit-connections", "2")
	tok := tokenFor(t, "alice")
	live := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: tok})
	start := time.Now()
	dead := deadSocket(t, p, tok)
	waitMetric(t, p.URL, "tokenrelay_limit_hits_total", `limit="idle_timeout"`, 1)
	// The slot is freed: alice may connect again (limit 2: live + new).
	trtest.WaitMetric(t, p.URL, "tokenrelay_connections", "", wait, func(v float64) bool { return v <= 1 })
	reaped := time.Since(start)
	t.Logf("dead connection reaped after %v (ping 200ms + idle timeout 500ms + close handshake)", reaped.Round(10*time.Millisecond))
	if code := closeCode(t, p.WSURL(), &trtest.DialOptions{Token: tok}, 300*time.Millisecond); code != -1 {
		t.Fatalf("a new connection after the reap: close %d", code)
	}
	// The server closed the TCP connection.
	dead.SetReadDeadline(time.Now().Add(wait))
	if _, err := io.Copy(io.Discard, dead); err != nil {
		t.Fatalf("dead socket: %v, want EOF", err)
	}
	// The live connection, quiet all along, is still open.
	live.Send(`{"type":"ping","id":"still"}`)
	if f := reply(t, live, "still"); f.Type() != "pong" {
		t.Fatalf("live connection: %v", f)
	}
	if got := trtest.Metric(t, p.URL, "tokenrelay_limit_hits_total", `limit="idle_timeout"`); got != 1 {
		t.Errorf("idle_timeout hits = %v, want 1", got)
	}
}

// An HTTP connection kept alive after its request is closed once it has
// been idle --idle-timeout: idle keep-alive connections, which need no
// token, cannot hold the server's file descriptors for good.
func TestIdleKeepAliveConnectionIsClosed(t *testing.T) {
	t.Parallel()
	p := serveJWT(t, "--idle-timeout", "1s")
	nc := rawHTTP(t, p, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(nc), nil)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /healthz: %v %v", resp, err)
	}
	if _, err := io.Copy(io.Discard, nc); err != nil {
		t.Fatalf("the idle connection was not closed: %v", err)
	}
}

// A request whose body does not arrive within --read-timeout is answered
// 400, saying so, and does not hold its connection for longer.
func TestTrickledBodyTimesOut(t *testing.T) {
	t.Parallel()
	p := serveJWT(t, "--read-timeout", "1s")
	for _, tc := range []struct{ name, path string }{
		{"native", "/v1/conversations/trickle/messages"},
		{"compat", "/api/chat"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nc := rawHTTP(t, p, "POST "+tc.path+" HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "+tokenFor(t, "alice")+
				"\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"text\":\"")
			resp, err := http.ReadResponse(bufio.NewReader(nc), nil)
			if err != nil {
				t.Fatalf("no answer to a trickled body: %v", err)
			}
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "did not arrive within 1s") {
				t.Fatalf("trickled body: %d %s", resp.StatusCode, body)
			}
		})
	}
}

// rawHTTP opens a TCP connection to p, writes req, and returns the
// connection, which reads fail on after the test's wait.
func rawHTTP(t *testing.T, p *trtest.Proc, req string) net.Conn {
	t.Helper()
	nc, err := net.Dial("tcp", strings.TrimPrefix(p.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	if err := nc.SetDeadline(time.Now().Add(wait)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(nc, req); err != nil {
		t.Fatal(err)
	}
	return nc
}

// TestHugeWriteTimeout: a --write-timeout set huge, to mean "none", does not
// overflow the deadline of a plain HTTP answer (30 times it), which wrapped
// around into the past would drop every answer unwritten.
func TestHugeWriteTimeout(t *testing.T) {
	t.Parallel()
	p := serveJWT(t, "--write-timeout", "1000000h")
	if code, _, b := do(t, "GET", p.URL+"/v1/conversations", tokenFor(t, "alice"), "", nil); code != 200 {
		t.Fatalf("GET /v1/conversations: %d %s", code, b)
	}
}
