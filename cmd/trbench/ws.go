package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha1"
	"crypto/tls"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// The tool's own WebSocket client (RFC 6455, client side, no extensions).
// It reads every frame of thousands of connections on the same two cores
// as the server it measures, so it reads the way a library cannot: on
// Linux one epoll loop per processor reads each plain TCP connection when
// the kernel says it has data, once per wake-up, and parses the frames in
// place (see ws_poll_linux.go). A general-purpose client parks a goroutine
// per connection and, as Go's poller is edge-triggered, reads until the
// socket is empty: two read(2) calls and a goroutine wake-up per frame.
// Connections over TLS, and every connection elsewhere than Linux, are
// read by a goroutine of their own.

// wsHandler receives what a connection reads. Its methods run on the
// connection's reader, one at a time, and must not block: on Linux the
// reader serves many connections.
type wsHandler interface {
	// message is one complete text or binary message; data is valid until
	// message returns.
	message(data []byte)
	// closed is called once, when the connection has ended: with a
	// *closeError when the server closed it with a close frame, io.EOF
	// when it closed the TCP connection, or another read error.
	closed(err error)
}

// closeError is the server's close frame.
type closeError struct {
	code   int
	reason string
}

func (e *closeError) Error() string {
	return fmt.Sprintf("closed by the server: status %d %q", e.code, e.reason)
}

// closeCode is the status of the server's close frame in err, or -1.
func closeCode(err error) int {
	var ce *closeError
	if errors.As(err, &ce) {
		return ce.code
	}
	return -1
}

// errProtocol is a frame the client refuses.
var errProtocol = errors.New("websocket: protocol error")

const (
	opContinuation = 0x0
	opText         = 0x1
	opBinary       = 0x2
	opClose        = 0x8
	opPing         = 0x9
	opPong         = 0xa

	statusNormal = 1000
	// A joined snapshot of a 100k-token turn is large.
	wsReadLimit = 256 << 20
)

// wsConn is one client WebSocket connection. Any goroutine may write; one
// reader (an epoll loop or the connection's goroutine) reads.
type wsConn struct {
	nc  net.Conn
	tcp *net.TCPConn // nc when it is plain TCP; such a connection is read by a poll loop on Linux
	fd  int          // tcp's descriptor; valid until the reader closes nc
	h   wsHandler

	wmu  sync.Mutex
	wbuf []byte // guarded by wmu

	polled  bool          // read by a poll loop; set by start
	closing atomic.Bool   // the tool is closing it
	done    chan struct{} // closed once the reader has closed nc and called h.closed
	err     error         // why reading ended; set before done closes

	// Reader-owned.
	rest  []byte // the start of a frame not yet complete
	msg   []byte // a fragmented message's payload so far
	inMsg bool
}

// dialWS opens a WebSocket connection to rawURL through nd. The caller
// starts its reader with start.
func dialWS(ctx context.Context, nd *net.Dialer, rawURL string, header http.Header) (*wsConn, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, err
	}
	var secure bool
	switch u.Scheme {
	case "ws", "http":
	case "wss", "https":
		secure = true
	default:
		return nil, fmt.Errorf("websocket: unsupported scheme %q", u.Scheme)
	}
	addr := u.Host
	if u.Port() == "" {
		port := "80"
		if secure {
			port = "443"
		}
		addr = net.JoinHostPort(u.Hostname(), port)
	}
	nc, err := nd.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { _ = nc.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if dl, ok := ctx.Deadline(); ok {
		_ = nc.SetDeadline(dl)
	}
	c := &wsConn{nc: nc, done: make(chan struct{})}
	if secure {
		tc := tls.Client(nc, &tls.Config{ServerName: u.Hostname()})
		if err := tc.HandshakeContext(ctx); err != nil {
			nc.Close()
			return nil, err
		}
		c.nc = tc
	} else if tcp, ok := nc.(*net.TCPConn); ok {
		c.tcp = tcp
		rc, err := tcp.SyscallConn()
		if err == nil {
			err = rc.Control(func(fd uintptr) { c.fd = int(fd) })
		}
		if err != nil {
			nc.Close()
			return nil, err
		}
	}
	if err := c.handshake(u, header); err != nil {
		c.nc.Close()
		return nil, err
	}
	if !stop() { // ctx ended as the handshake did
		c.nc.Close()
		return nil, ctx.Err()
	}
	if err := c.nc.SetDeadline(time.Time{}); err != nil {
		c.nc.Close()
		return nil, err
	}
	return c, nil
}

// noPoll makes every connection read by a goroutine of its own (tests
// cover that reader with it).
var noPoll bool

const wsGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

func (c *wsConn) handshake(u *url.URL, header http.Header) error {
	var nonce [16]byte
	_, _ = rand.Read(nonce[:])
	key := base64.StdEncoding.EncodeToString(nonce[:])
	req := &http.Request{
		Method: http.MethodGet, URL: &url.URL{Scheme: "http", Host: u.Host, Path: u.Path, RawPath: u.RawPath, RawQuery: u.RawQuery},
		Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1, Host: u.Host, Header: header.Clone(),
	}
	if req.Header == nil {
		req.Header = http.Header{}
	}
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Sec-WebSocket-Key", key)
	req.Header.Set("Sec-WebSocket-Version", "13")
	if err := req.Write(c.nc); err != nil {
		return fmt.Errorf("websocket: send handshake: %w", err)
	}
	br := bufio.NewReaderSize(c.nc, 4096)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		return fmt.Errorf("websocket: read handshake: %w", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusSwitchingProtocols {
		// Worded as the error tables of earlier runs count it.
		return fmt.Errorf("websocket: expected handshake response status code 101 but got %d", resp.StatusCode)
	}
	sum := sha1.Sum([]byte(key + wsGUID))
	if !strings.EqualFold(resp.Header.Get("Upgrade"), "websocket") ||
		resp.Header.Get("Sec-WebSocket-Accept") != base64.StdEncoding.EncodeToString(sum[:]) {
		return fmt.Errorf("websocket: the server's handshake answer is not an upgrade to this request")
	}
	if ext := resp.Header.Get("Sec-WebSocket-Extensions"); ext != "" {
		return fmt.Errorf("websocket: the server chose extension %q, which was not offered", ext)
	}
	// Frames the server sent right after its answer (the legacy socket's
	// welcome) may sit in br.
	if n := br.Buffered(); n > 0 {
		b, _ := br.Peek(n)
		c.rest = append([]byte(nil), b...)
	}
	return nil
}

// start hands what the connection reads to h from now on.
func (c *wsConn) start(h wsHandler) {
	c.h = h
	if len(c.rest) > 0 {
		// Frames read with the handshake come first.
		rest := c.rest
		c.rest = nil
		if err := c.feed(rest); err != nil {
			c.abort(err)
			return
		}
	}
	if c.polled = c.tcp != nil && !noPoll && startPolled(c); !c.polled {
		go c.readLoop()
	}
}

// readLoop reads a connection that no poll loop reads.
func (c *wsConn) readLoop() {
	buf := make([]byte, 16<<10)
	for {
		n, err := c.nc.Read(buf)
		if n > 0 {
			if ferr := c.feed(buf[:n]); ferr != nil {
				err = ferr
			}
		}
		if err != nil {
			c.end(err)
			return
		}
	}
}

// abort ends a connection whose reader has not started.
func (c *wsConn) abort(err error) { go c.end(err) }

// end finishes the connection once its reader has stopped reading it:
// answers the server's close frame, closes the socket and tells the
// handler.
func (c *wsConn) end(err error) {
	if ce := (*closeError)(nil); errors.As(err, &ce) && !c.closing.Load() {
		var p [2]byte
		binary.BigEndian.PutUint16(p[:], uint16(ce.code))
		if ce.code == 1005 {
			_ = c.writeFrame(opClose, nil, time.Now().Add(time.Second))
		} else {
			_ = c.writeFrame(opClose, p[:], time.Now().Add(time.Second))
		}
	}
	_ = c.nc.Close()
	c.err = err
	c.h.closed(err)
	close(c.done)
}

// feed parses the frames in p, after what an earlier read left over, and
// keeps an incomplete last frame for the next read. An error ends the
// connection.
func (c *wsConn) feed(p []byte) error {
	if len(c.rest) > 0 {
		c.rest = append(c.rest, p...)
		p = c.rest
	}
	for len(p) > 0 {
		n, err := c.frame(p)
		if err != nil {
			return err
		}
		if n == 0 {
			break
		}
		p = p[n:]
	}
	// append copies forwards, so p may lie within c.rest.
	c.rest = append(c.rest[:0], p...)
	if len(c.rest) == 0 && cap(c.rest) > 1<<20 {
		c.rest = nil // do not keep a joined snapshot's buffer
	}
	return nil
}

// frame handles the frame at the start of p and returns its length, or 0
// when p does not hold all of it yet.
func (c *wsConn) frame(p []byte) (int, error) {
	if len(p) < 2 {
		return 0, nil
	}
	b0, b1 := p[0], p[1]
	fin, op := b0&0x80 != 0, b0&0x0f
	if b0&0x70 != 0 {
		return 0, fmt.Errorf("%w: reserved bits set (no extension was negotiated)", errProtocol)
	}
	if b1&0x80 != 0 {
		return 0, fmt.Errorf("%w: a masked frame from the server", errProtocol)
	}
	h, n := 2, uint64(b1&0x7f)
	switch n {
	case 126:
		if len(p) < 4 {
			return 0, nil
		}
		h, n = 4, uint64(binary.BigEndian.Uint16(p[2:]))
	case 127:
		if len(p) < 10 {
			return 0, nil
		}
		h, n = 10, binary.BigEndian.Uint64(p[2:])
	}
	if n > wsReadLimit || (op == opContinuation && uint64(len(c.msg))+n > wsReadLimit) {
		return 0, fmt.Errorf("websocket: a message over the read limit of %d bytes", wsReadLimit)
	}
	if uint64(len(p)-h) < n {
		return 0, nil
	}
	payload := p[h : h+int(n)]
	if op >= opClose && (!fin || n > 125) {
		return 0, fmt.Errorf("%w: a fragmented or long control frame", errProtocol)
	}
	switch op {
	case opText, opBinary:
		if c.inMsg {
			return 0, fmt.Errorf("%w: a new message inside a fragmented one", errProtocol)
		}
		if fin {
			c.h.message(payload)
		} else {
			c.msg, c.inMsg = append(c.msg[:0], payload...), true
		}
	case opContinuation:
		if !c.inMsg {
			return 0, fmt.Errorf("%w: a continuation with no message", errProtocol)
		}
		c.msg = append(c.msg, payload...)
		if fin {
			c.h.message(c.msg)
			c.msg, c.inMsg = c.msg[:0], false
			if cap(c.msg) > 1<<20 {
				c.msg = nil
			}
		}
	case opClose:
		ce := &closeError{code: 1005}
		if len(payload) >= 2 {
			ce.code, ce.reason = int(binary.BigEndian.Uint16(payload)), string(payload[2:])
		}
		return 0, ce
	case opPing:
		// Answered off the reader, which must not wait for a socket.
		data := append([]byte(nil), payload...)
		go func() { _ = c.writeFrame(opPong, data, time.Now().Add(10*time.Second)) }()
	case opPong:
	default:
		return 0, fmt.Errorf("%w: opcode %d", errProtocol, op)
	}
	return h + int(n), nil
}

// write sends data as one text message; ctx's deadline bounds the write.
func (c *wsConn) write(ctx context.Context, data []byte) error {
	dl, _ := ctx.Deadline()
	return c.writeFrame(opText, data, dl)
}

// writeFrame sends one masked frame in one write.
func (c *wsConn) writeFrame(op byte, data []byte, deadline time.Time) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	b := append(c.wbuf[:0], 0x80|op)
	switch n := len(data); {
	case n < 126:
		b = append(b, 0x80|byte(n))
	case n < 1<<16:
		b = append(b, 0x80|126)
		b = binary.BigEndian.AppendUint16(b, uint16(n))
	default:
		b = append(b, 0x80|127)
		b = binary.BigEndian.AppendUint64(b, uint64(n))
	}
	key := mrand.Uint32()
	b = binary.LittleEndian.AppendUint32(b, key)
	mask := b[len(b)-4:]
	start := len(b)
	b = append(b, data...)
	for i := range data {
		b[start+i] ^= mask[i&3]
	}
	if cap(b) <= 4<<10 {
		c.wbuf = b
	}
	_ = c.nc.SetWriteDeadline(deadline)
	_, err := c.nc.Write(b)
	return err
}

// closeNow ends the connection without a close handshake (a dropped tab)
// and waits until its reader has finished.
func (c *wsConn) closeNow() {
	c.closing.Store(true)
	c.shut()
	<-c.done
}

// closeWith sends a close frame with code and waits up to 5s for the
// server to end the connection, then ends it anyway.
func (c *wsConn) closeWith(code int) {
	c.closing.Store(true)
	var p [2]byte
	binary.BigEndian.PutUint16(p[:], uint16(code))
	if c.writeFrame(opClose, p[:], time.Now().Add(time.Second)) == nil {
		t := time.NewTimer(5 * time.Second)
		defer t.Stop()
		select {
		case <-c.done:
			return
		case <-t.C:
		}
	}
	c.shut()
	<-c.done
}

// shut makes the reader see the connection end. A polled socket is shut
// down, not closed, so that its descriptor cannot be reused while the
// poll loop may still read it; the loop closes it.
func (c *wsConn) shut() {
	if !c.polled {
		_ = c.nc.Close()
		return
	}
	if rc, err := c.tcp.SyscallConn(); err == nil {
		// Control holds the descriptor open; once closed it fails.
		_ = rc.Control(func(fd uintptr) { shutdown(int(fd)) })
	}
}

// readError names a failed read of the socket.
func readError(err error) error {
	if errors.Is(err, io.EOF) {
		return io.EOF
	}
	return &net.OpError{Op: "read", Net: "tcp", Err: err}
}
