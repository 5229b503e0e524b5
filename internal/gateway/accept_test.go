package gateway

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// echoServer upgrades with acceptWS and echoes one message.
func echoServer(t *testing.T) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, _, err := acceptWS(w, r, &websocket.AcceptOptions{CompressionMode: websocket.CompressionDisabled})
		if err != nil {
			return
		}
		defer ws.CloseNow()
		ws.SetReadLimit(-1)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		typ, data, err := ws.Read(ctx)
		if err != nil {
			return
		}
		if err := ws.Write(ctx, typ, data); err != nil {
			return
		}
		_, _, _ = ws.Read(ctx) // until the client closes
	}))
	t.Cleanup(srv.Close)
	return srv
}

// Messages far larger than the connection's small buffers go through
// whole, both ways.
func TestAcceptWSCarriesLargeMessages(t *testing.T) {
	srv := echoServer(t)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	c, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(srv.URL, "http"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.CloseNow()
	c.SetReadLimit(-1)
	msg := bytes.Repeat([]byte("0123456789abcdef"), 64<<10/16+7)
	if err := c.Write(ctx, websocket.MessageText, msg); err != nil {
		t.Fatal(err)
	}
	_, got, err := c.Read(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("echoed %d bytes, sent %d", len(got), len(msg))
	}
	c.Close(websocket.StatusNormalClosure, "")
}

// rawUpgrade dials the server at url over plain TCP and upgrades path to a
// WebSocket, sending behind right after the request, in the same write. It
// returns the connection and the reader the upgrade's answer was read with.
func rawUpgrade(t *testing.T, url, path string, behind []byte) (net.Conn, *bufio.Reader) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	req := "GET " + path + " HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
	if _, err := conn.Write(append([]byte(req), behind...)); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade answered %s", resp.Status)
	}
	return conn, br
}

// A frame the client sends right behind its upgrade request, in the same
// packet, is read: net/http has buffered it, and its reader is kept.
func TestAcceptWSKeepsBytesBehindTheUpgrade(t *testing.T) {
	srv := echoServer(t)
	// A masked text frame "hi" (RFC 6455 5.2), mask key 1 2 3 4.
	frame := []byte{0x81, 0x80 | 2, 1, 2, 3, 4, 'h' ^ 1, 'i' ^ 2}
	_, br := rawUpgrade(t, srv.URL, "/", frame)
	echo := make([]byte, 4)
	if _, err := io.ReadFull(br, echo); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(echo, []byte{0x81, 2, 'h', 'i'}) {
		t.Fatalf("echo frame % x, want 81 02 68 69", echo)
	}
}
