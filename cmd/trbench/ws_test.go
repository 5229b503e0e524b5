package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// recorder is a wsHandler that passes what it reads to channels.
type recorder struct {
	msgs chan string
	end  chan error
}

func newRecorder() *recorder {
	return &recorder{msgs: make(chan string, 64), end: make(chan error, 1)}
}

func (r *recorder) message(data []byte) { r.msgs <- string(data) }
func (r *recorder) closed(err error)    { r.end <- err }

func (r *recorder) next(t *testing.T) string {
	t.Helper()
	select {
	case m := <-r.msgs:
		return m
	case err := <-r.end:
		t.Fatalf("connection ended (%v) while a message was awaited", err)
	case <-time.After(10 * time.Second):
		t.Fatal("no message within 10s")
	}
	return ""
}

func (r *recorder) ended(t *testing.T) error {
	t.Helper()
	select {
	case err := <-r.end:
		return err
	case m := <-r.msgs:
		t.Fatalf("message %.40q while the end was awaited", m)
	case <-time.After(10 * time.Second):
		t.Fatal("connection did not end within 10s")
	}
	return nil
}

// librarySide serves WebSocket connections with coder/websocket, the
// library the server uses, and does what each text message asks: "big N"
// sends N bytes in 64 KiB fragments, "ping" pings and reports the pong,
// "close" closes with 4008, anything else is echoed.
func librarySide(t *testing.T, serverEnded chan<- error) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer tok" {
			http.Error(w, "no token", http.StatusUnauthorized)
			return
		}
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer c.CloseNow()
		c.SetReadLimit(1 << 20)
		ctx := r.Context()
		for {
			_, data, err := c.Read(ctx)
			if err != nil {
				if serverEnded != nil {
					serverEnded <- err
				}
				return
			}
			msg := string(data)
			switch {
			case strings.HasPrefix(msg, "big "):
				var n int
				for _, ch := range msg[4:] {
					n = n*10 + int(ch-'0')
				}
				wr, err := c.Writer(ctx, websocket.MessageText)
				if err != nil {
					return
				}
				chunk := bytes.Repeat([]byte("x"), 64<<10)
				for sent := 0; sent < n; sent += len(chunk) {
					_, _ = wr.Write(chunk[:min(len(chunk), n-sent)])
				}
				_ = wr.Close()
			case msg == "ping":
				// Ping waits for the pong, which only a reader reads.
				go func() {
					pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
					defer cancel()
					if err := c.Ping(pctx); err != nil {
						_ = c.Write(ctx, websocket.MessageText, []byte("no pong: "+err.Error()))
					} else {
						_ = c.Write(ctx, websocket.MessageText, []byte("pong seen"))
					}
				}()
			case msg == "close":
				_ = c.Close(4008, "too slow")
				return
			default:
				_ = c.Write(ctx, websocket.MessageText, data)
			}
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

func wsURL(srv *httptest.Server) string { return "ws" + strings.TrimPrefix(srv.URL, "http") }

func dialTest(t *testing.T, url string) (*wsConn, *recorder) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := dialWS(ctx, &net.Dialer{}, url, http.Header{"Authorization": {"Bearer tok"}})
	if err != nil {
		t.Fatal(err)
	}
	r := newRecorder()
	c.start(r)
	return c, r
}

// eachReader runs f with the poll loops (where the platform has them)
// and with a goroutine per connection.
func eachReader(t *testing.T, f func(t *testing.T)) {
	t.Run("poll", f)
	t.Run("goroutine", func(t *testing.T) {
		noPoll = true
		t.Cleanup(func() { noPoll = false })
		f(t)
	})
}

func TestWSTalksToTheLibrary(t *testing.T) {
	eachReader(t, func(t *testing.T) {
		srv := librarySide(t, nil)
		c, r := dialTest(t, wsURL(srv))
		ctx := context.Background()
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()

		for _, m := range []string{"hello", strings.Repeat("é", 100), strings.Repeat("y", 70_000)} {
			if err := c.write(wctx, []byte(m)); err != nil {
				t.Fatal(err)
			}
			if got := r.next(t); got != m {
				t.Fatalf("echo of a %d-byte message came back as %d bytes", len(m), len(got))
			}
		}
		// A message over several reads and fragments.
		if err := c.write(wctx, []byte("big 3000000")); err != nil {
			t.Fatal(err)
		}
		if got := r.next(t); len(got) != 3_000_000 || strings.Trim(got, "x") != "" {
			t.Fatalf("fragmented message: got %d bytes, want 3000000 of x", len(got))
		}
		// The library's ping waits for our pong.
		if err := c.write(wctx, []byte("ping")); err != nil {
			t.Fatal(err)
		}
		if got := r.next(t); got != "pong seen" {
			t.Fatalf("after a ping: %q", got)
		}
		// The server's close frame ends the connection with its status.
		if err := c.write(wctx, []byte("close")); err != nil {
			t.Fatal(err)
		}
		err := r.ended(t)
		if closeCode(err) != 4008 || closeReason(err) != "close 4008" {
			t.Fatalf("ended with %v (%s), want close 4008", err, closeReason(err))
		}
		<-c.done
	})
}

func TestWSCloseNowEndsBothSides(t *testing.T) {
	eachReader(t, func(t *testing.T) {
		serverEnded := make(chan error, 1)
		srv := librarySide(t, serverEnded)
		c, r := dialTest(t, wsURL(srv))
		wctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := c.write(wctx, []byte("hello")); err != nil {
			t.Fatal(err)
		}
		r.next(t)
		c.closeNow() // returns once the reader has finished
		select {
		case <-c.done:
		default:
			t.Fatal("closeNow returned before the reader finished")
		}
		if err := r.ended(t); err == nil {
			t.Fatal("closed with no error")
		}
		select {
		case err := <-serverEnded:
			if websocket.CloseStatus(err) != -1 {
				t.Fatalf("server saw a close frame (%v); closeNow sends none", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the server did not see the connection end")
		}
		if err := c.write(wctx, []byte("late")); err == nil {
			t.Fatal("write after closeNow succeeded")
		}
	})
}

func TestWSCloseWithHandshake(t *testing.T) {
	eachReader(t, func(t *testing.T) {
		serverEnded := make(chan error, 1)
		srv := librarySide(t, serverEnded)
		c, r := dialTest(t, wsURL(srv))
		c.closeWith(statusNormal)
		select {
		case err := <-serverEnded:
			if s := websocket.CloseStatus(err); s != websocket.StatusNormalClosure {
				t.Fatalf("server read %v, want a 1000 close frame", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the server did not see the close")
		}
		r.ended(t)
	})
}

func TestWSHandshakeRefused(t *testing.T) {
	srv := librarySide(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := dialWS(ctx, &net.Dialer{}, wsURL(srv), http.Header{})
	if err == nil {
		t.Fatal("dial without the token succeeded")
	}
	if got := shortErr(err); got != "expected handshake response status code 101 but got 401" {
		t.Fatalf("error counted as %q (%v)", got, err)
	}
	for _, bad := range []string{"ftp://127.0.0.1/", "://x"} {
		if _, err := dialWS(ctx, &net.Dialer{}, bad, nil); err == nil {
			t.Fatalf("dial %q succeeded", bad)
		}
	}
}

// rawServer accepts one connection, answers its handshake and writes
// first right after the answer, in the same write: frames the client's
// handshake reader may buffer (the legacy socket's welcome does this).
func rawServer(t *testing.T, first []byte) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			return
		}
		defer nc.Close()
		req, err := http.ReadRequest(bufio.NewReader(nc))
		if err != nil {
			return
		}
		sum := sha1.Sum([]byte(req.Header.Get("Sec-WebSocket-Key") + wsGUID))
		resp := "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " +
			base64.StdEncoding.EncodeToString(sum[:]) + "\r\n\r\n"
		_, _ = nc.Write(append([]byte(resp), first...))
		_, _ = io.Copy(io.Discard, nc)
	}()
	return "ws://" + ln.Addr().String() + "/ws"
}

// serverFrame encodes an unmasked frame as a server sends it.
func serverFrame(fin bool, op byte, payload []byte) []byte {
	b0 := op
	if fin {
		b0 |= 0x80
	}
	b := []byte{b0}
	switch n := len(payload); {
	case n < 126:
		b = append(b, byte(n))
	case n < 1<<16:
		b = append(b, 126)
		b = binary.BigEndian.AppendUint16(b, uint16(n))
	default:
		b = append(b, 127)
		b = binary.BigEndian.AppendUint64(b, uint64(n))
	}
	return append(b, payload...)
}

func TestWSFramesReadWithTheHandshake(t *testing.T) {
	eachReader(t, func(t *testing.T) {
		first := append(serverFrame(true, opText, []byte(`{"type":"welcome"}`)), serverFrame(true, opText, []byte("second"))...)
		c, r := dialTest(t, rawServer(t, first))
		if got := r.next(t); got != `{"type":"welcome"}` {
			t.Fatalf("first message %q", got)
		}
		if got := r.next(t); got != "second" {
			t.Fatalf("second message %q", got)
		}
		c.closeNow()
	})
}

// TestWSFeedSplitAnywhere feeds a stream of frames in every split of
// one to three reads and checks the messages and the end are the same.
func TestWSFeedSplitAnywhere(t *testing.T) {
	long := bytes.Repeat([]byte("z"), 70_000)
	var stream []byte
	stream = append(stream, serverFrame(true, opText, []byte("a"))...)
	stream = append(stream, serverFrame(true, opText, bytes.Repeat([]byte("m"), 300))...)
	stream = append(stream, serverFrame(false, opText, []byte("frag-"))...)
	stream = append(stream, serverFrame(true, opPong, []byte("p"))...) // control frames may come between fragments
	stream = append(stream, serverFrame(false, opContinuation, []byte("ment"))...)
	stream = append(stream, serverFrame(true, opContinuation, nil)...)
	stream = append(stream, serverFrame(true, opBinary, long)...)
	stream = append(stream, serverFrame(true, opClose, append([]byte{0x03, 0xe9}, "bye"...))...) // 1001
	want := []string{"a", strings.Repeat("m", 300), "frag-ment", string(long)}

	run := func(parts ...[]byte) {
		t.Helper()
		r := newRecorder()
		c := &wsConn{h: r}
		var err error
		for _, p := range parts {
			if err = c.feed(append([]byte(nil), p...)); err != nil {
				break
			}
		}
		for i, w := range want {
			select {
			case got := <-r.msgs:
				if got != w {
					t.Fatalf("split %v: message %d is %.20q (%d bytes), want %.20q (%d)", lens(parts), i, got, len(got), w, len(w))
				}
			default:
				t.Fatalf("split %v: message %d missing", lens(parts), i)
			}
		}
		var ce *closeError
		if !errors.As(err, &ce) || ce.code != 1001 || ce.reason != "bye" {
			t.Fatalf("split %v: ended with %v, want close 1001 bye", lens(parts), err)
		}
	}
	run(stream)
	// Every split into two, and into three around the small frames.
	for i := 1; i < len(stream); i++ {
		if i > 400 && i < len(stream)-20 && i%997 != 0 {
			continue // inside the long frame, a sample is enough
		}
		run(stream[:i], stream[i:])
		for j := i + 1; j < min(len(stream), i+12); j++ {
			run(stream[:i], stream[i:j], stream[j:])
		}
	}
}

func lens(parts [][]byte) []int {
	var n []int
	for _, p := range parts {
		n = append(n, len(p))
	}
	return n
}

func TestWSRefusesBadFrames(t *testing.T) {
	for name, b := range map[string][]byte{
		"masked":                 {0x81, 0x81, 1, 2, 3, 4, 'x'},
		"reserved bit":           {0xc1, 0x01, 'x'},
		"unknown opcode":         {0x83, 0x00},
		"continuation first":     {0x80, 0x01, 'x'},
		"fragmented ping":        {0x09, 0x00},
		"long ping":              append([]byte{0x89, 126, 0, 126}, make([]byte, 126)...),
		"over the read limit":    {0x81, 127, 0, 0, 0, 0, 0x10, 0, 0, 1},
		"text inside a fragment": {0x01, 0x01, 'a', 0x81, 0x01, 'b'},
	} {
		c := &wsConn{h: newRecorder()}
		if err := c.feed(b); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
