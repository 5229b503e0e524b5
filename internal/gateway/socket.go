package gateway

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coder/websocket"
)

// onOwnStack runs f on a goroutine of its own and waits for it. A socket's
// long-lived goroutine calls what runs deep (JSON decoding, store and bus
// calls) this way, so that its own stack stays at the few KiB an idle read
// needs instead of keeping whatever f grew it to for the connection's life.
func onOwnStack(f func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	<-done
}

// readLoop hands the socket's client frames to handle, in order, until
// the connection ends. It waits for the peer in raw.park; each frame is
// read and handled on a goroutine of its own, as reading runs deep in the
// library and handling deeper (JSON decoding, store and bus calls). The
// loop's own stack stays at the 2 KiB a park needs, and an idle connection
// keeps nothing bigger.
//
// settle waits, for the time it is given at most, until the answers to the
// frames handled so far are written: a frame over the limit closes the
// connection after them.
func (s *Server) readLoop(ws *websocket.Conn, raw *rawSocket, handle func(websocket.MessageType, []byte), settle func(time.Duration)) {
	var err error
	limit := int64(s.cfg.Limits.FrameBytes)
	read := func() {
		if raw.frameTooLarge(limit) {
			// Refused before the library reads it, which would close
			// with 1009 at once: the answers to the frames before it go
			// out first, for a second at most.
			s.m.limitHits.WithLabelValues("frame_bytes").Inc()
			settle(time.Second)
			_ = raw.close(ws, websocket.StatusMessageTooBig, fmt.Sprintf("frame over %d bytes", limit))
			err = errFrameTooLarge
			return
		}
		var typ websocket.MessageType
		var data []byte
		// No context: ending the connection closes the socket (see
		// serveSocket).
		if typ, data, err = ws.Read(context.Background()); err != nil {
			if errors.Is(err, websocket.ErrMessageTooBig) {
				// The library has already closed with 1009.
				s.m.limitHits.WithLabelValues("frame_bytes").Inc()
			}
			return
		}
		handle(typ, data)
	}
	for err == nil {
		raw.park()
		onOwnStack(read)
	}
}

// errFrameTooLarge ends a read loop that refused a frame over the limit.
var errFrameTooLarge = errors.New("frame too large")

// frameTooLarge reports whether the next frame from the peer is a data
// frame whose header announces more than limit bytes. It peeks, so the
// library still reads the frame from its start; it answers false when it
// cannot tell (no buffer of ours, a control frame, the connection
// closing), and the library's own read limit then applies (to a message
// cut in fragments, too).
//
// A header that arrived cut in two (br's last fill ended inside it, or the
// peer sent it in two writes) waits for the rest, as the library's read
// would: otherwise the library would refuse the frame itself, closing at
// once, before the answers to the frames ahead of it.
func (r *rawSocket) frameTooLarge(limit int64) bool {
	if r.br == nil || r.readable == nil || limit <= 0 {
		return false
	}
	for waited := false; ; waited = true {
		tooLarge, known := r.peekHeader(limit, waited)
		if known {
			return tooLarge
		}
		// Waiting holds no lock: a close may start meanwhile, and then
		// peekHeader answers false without touching br.
		if r.rc.Read(hasData) != nil {
			return false
		}
	}
}

// moreFrames reports whether a client frame other than pings and pongs
// has arrived behind the ones read: in br, or in the socket, which br then
// takes (one read, which does not wait). It is called between frames, on
// the goroutine that reads them, and answers false when it cannot tell.
func (r *rawSocket) moreFrames() bool {
	if r.br == nil || r.readable == nil {
		return false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closing {
		return false
	}
	if r.br.Buffered() > 0 {
		return true
	}
	arrived := false
	if r.rc.Control(func(fd uintptr) { arrived = frameArrived(fd) }) != nil || !arrived {
		return false
	}
	_, err := r.br.Peek(1)
	return err == nil
}

// peekHeader looks at the frame header at the front of br, under mu and
// only while not closing, as park does: the close handshake reads br once
// closing is set. known is false when the header is not all there and the
// socket must be waited on for the rest. br takes what the socket has
// when it holds nothing (park returned, so the socket has data) or after
// the caller waited for more: one read, which does not wait.
func (r *rawSocket) peekHeader(limit int64, waited bool) (tooLarge, known bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closing {
		return false, true
	}
	if waited || r.br.Buffered() == 0 {
		if _, err := r.br.Peek(r.br.Buffered() + 1); err != nil {
			return false, true // the library reads the error
		}
	}
	h, _ := r.br.Peek(min(r.br.Buffered(), 10))
	if len(h) < 2 {
		return false, false
	}
	if h[0]&0x0F > 2 { // opcodes 0-2: continuation, text, binary
		return false, true
	}
	n := int64(h[1] & 0x7F)
	switch {
	case n == 126 && len(h) >= 4:
		n = int64(binary.BigEndian.Uint16(h[2:]))
	case n == 127 && len(h) >= 10:
		u := binary.BigEndian.Uint64(h[2:])
		if u > math.MaxInt64 {
			return true, true
		}
		n = int64(u)
	case n >= 126:
		return false, false // the length is not all here yet
	}
	return n > limit, true
}

// waitIdle waits until q has nothing queued and no writer runs, for d at
// most.
func waitIdle(q *outQueue, d time.Duration) {
	wait := time.NewTimer(d)
	defer wait.Stop()
	for !q.idle() {
		select {
		case <-wait.C:
			return
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// keepAlive pings the peer every PingInterval until ctx ends; a peer that
// has not answered a ping within IdleTimeout is closed with closeWith
// (1001), so dead connections are reaped within PingInterval +
// IdleTimeout. A PingInterval of 0 disables it. While the ping still
// waits behind what was queued ahead of it (a long joined frame on a slow
// link), a peer whose socket keeps taking that is given another
// IdleTimeout each time; once the ping is out, the peer has IdleTimeout
// from then to answer, whatever it reads after it.
//
// The ping is a frame in the connection's queue, written by its writer
// (see rawSocket.writeFrames), and any pong ends the wait, whether the
// library read it (OnPongReceived) or the parked reader did (see
// rawSocket.park). A pong only clears a flag: the reader's stack stays
// shallow. One timer, touched only when it fires, paces the pings and
// checks the answers: an idle connection keeps no goroutine and no context
// for this, and a ping allocates nothing.
func (s *Server) keepAlive(ctx context.Context, raw *rawSocket, q *outQueue, closeWith func(websocket.StatusCode, string)) {
	if s.cfg.PingInterval <= 0 {
		return
	}
	p := &raw.pinger
	p.s, p.ctx, p.q, p.closeWith, p.written = s, ctx, q, closeWith, &raw.written
	p.sent = time.Now()
	p.base = p.sent
	// Armed once p.t is set, which fire reads.
	p.t = time.AfterFunc(math.MaxInt64, p.fire)
	p.t.Reset(s.cfg.PingInterval)
}

type pinger struct {
	s         *Server
	ctx       context.Context
	q         *outQueue
	closeWith func(websocket.StatusCode, string)
	t         *time.Timer
	sent      time.Time // the last ping (or the start); owned by fire
	// waiting is set while a ping is out, and cleared by any pong.
	waiting atomic.Bool
	// written is the socket's count of bytes taken (rawSocket.written);
	// seen is what it was when the ping was queued or the wait last
	// renewed, owned by fire.
	written *atomic.Uint64
	seen    uint64
	// out is when the socket took the ping (see wentOut), as the time
	// since base (set once, by keepAlive); 0 while it waits in the queue.
	out  atomic.Int64
	base time.Time
}

// wentOut notes that the socket has taken frames, the ping perhaps among
// them: the wait for its pong then runs from now.
func (p *pinger) wentOut(frames [][]byte) {
	for _, f := range frames {
		if len(f) == len(pingFrame) && f[0] == pingFrame[0] {
			p.out.CompareAndSwap(0, int64(max(time.Since(p.base), 1)))
			return
		}
	}
}

func (p *pinger) fire() {
	if p.ctx.Err() != nil {
		return
	}
	now := time.Now()
	interval, timeout := p.s.cfg.PingInterval, p.s.cfg.IdleTimeout
	var next time.Time
	switch {
	case p.waiting.Load() && p.out.Load() != 0:
		// The ping is out: what the peer reads after it does not excuse
		// its silence.
		out := p.base.Add(time.Duration(p.out.Load()))
		if now.Sub(out) >= timeout {
			p.idle()
			return
		}
		next = out.Add(timeout)
	case p.waiting.Load() && now.Sub(p.sent) >= timeout && p.written.Load() != p.seen:
		// The ping still waits behind what was queued before it (a long
		// joined frame on a slow link), which the socket keeps taking: the
		// peer must read that before it can answer. The wait starts again;
		// a peer that is gone stops taking anything once its socket's
		// buffers are full.
		p.sent, p.seen = now, p.written.Load()
		next = now.Add(timeout)
	case p.waiting.Load() && now.Sub(p.sent) >= timeout:
		p.idle()
		return
	case p.waiting.Load():
		next = p.sent.Add(timeout)
	case now.Sub(p.sent) >= interval:
		p.sent, p.seen = now, p.written.Load()
		p.out.Store(0)
		p.waiting.Store(true)
		p.q.pushPing(pingFrame)
		next = now.Add(min(interval, timeout))
	default:
		next = p.sent.Add(interval)
	}
	p.t.Reset(next.Sub(now))
}

func (p *pinger) idle() {
	p.s.m.limitHits.WithLabelValues("idle_timeout").Inc()
	p.closeWith(websocket.StatusGoingAway, "idle timeout")
}

// pong ends the wait for a pong; one that comes unasked changes nothing.
func (p *pinger) pong() { p.waiting.Store(false) }

// pingFrame is the server's ping: FIN, opcode 9, unmasked, no payload.
var pingFrame = []byte{0x89, 0x00}

// isControlFrame reports whether f, a frame from a connection's queue, is a
// control frame encoded whole (the keep-alive's ping, the answer to a
// client's ping) rather than the payload of a text frame: text is UTF-8,
// in which no string starts with a byte 0x88–0x8A.
func isControlFrame(f []byte) bool { return len(f) >= 2 && f[0] >= 0x88 && f[0] <= 0x8A }

// rawSocket is an accepted WebSocket's TCP connection as the gateway keeps
// it beneath the library: to close it, to write its frames, and to park
// the connection's reader while the peer is quiet.
//
// An idle connection's goroutine waits in the library's Read, a chain of
// calls about 2.3 KiB deep, so its stack is 4 KiB, and the Go collector
// counts the stack in use towards the heap goal as well. park waits for
// the socket to become readable on a few hundred bytes of stack instead,
// and the reading itself runs on a short-lived goroutine (see readLoop),
// so the long-lived one never grows past 2 KiB (a stack that grew would
// not shrink back: Go shrinks one only below a quarter in use). A pong,
// all an idle peer ever sends, is read in park too, and so is a client's
// own ping (answered through the queue), so the goroutine stays parked
// between pings.
//
// The gateway writes its frames itself (writeFrames, writeNow): text
// frames, unmasked and uncompressed, encoded beside their payload, so that
// a burst of frames is one system call. The library writes only frames of
// its own (a close, the answer to a ping it read), through libWriter. wmu
// orders all of them, so that frames never interleave.
type rawSocket struct {
	nc net.Conn
	// br is the library's buffered reader (see smallReader): park reads
	// the socket only when br holds nothing. nil leaves the socket
	// unparked.
	br       *bufio.Reader
	held     int                   // bytes br held at the upgrade (see takeHeld)
	rc       syscall.RawConn       // nil when the system's socket is out of reach
	readable func(fd uintptr) bool // park's test; nil when the socket is not parked
	pinger   pinger
	q        *outQueue // where park answers a client's ping

	// closing is set before the WebSocket is closed: the library's close
	// handshake then reads br on the closing goroutine, and park keeps
	// off it. parked is set while the reader waits in park, poked once
	// the wake set has woken it (see poke). Guarded by mu.
	mu      sync.Mutex
	closing bool
	parked  bool
	poked   bool
	wakeID  uint64 // in the wake set (see armWake); 0 = not yet; owned by the reader

	// wmu is held for every write to nc. It may be released by another
	// goroutine than the one that took it (see writeNow).
	wmu sync.Mutex
	// sealed is set before the close frame is written: no frame of the
	// gateway's follows it.
	sealed atomic.Bool
	// written counts the bytes the gateway's writes have handed the
	// socket (see writeAll); written under wmu, read by the stallTimer.
	written atomic.Uint64
}

// close closes ws with code and reason, the close handshake included. All
// of a connection's closes go through here (see closing). The handshake
// takes closeHandshakeMax at most: then the TCP connection is closed,
// whatever the peer sends or does not.
func (r *rawSocket) close(ws *websocket.Conn, code websocket.StatusCode, reason string) error {
	r.mu.Lock()
	r.closing = true
	r.unpoke() // the handshake may read before park looks
	r.mu.Unlock()
	r.sealed.Store(true)
	hard := time.AfterFunc(closeHandshakeMax, func() { _ = r.nc.Close() })
	defer hard.Stop()
	return ws.Close(code, reason)
}

// closeHandshakeMax bounds a close handshake. The library waits five
// seconds for a peer's close frame, but not for the rest of a frame the
// peer left unfinished, which it reads to its end first: a peer that sent
// a frame's first bytes (or the header of a frame over the limit) and
// nothing more would otherwise keep its connection, and a graceful
// shutdown, waiting.
const closeHandshakeMax = 5 * time.Second

// errSealed is writeFrames' answer once the close frame is on its way: the
// frames are dropped, and the close handshake, not the writer, ends the
// connection.
var errSealed = errors.New("connection closing")

// libWriter is where the library's writes go: to the socket, under wmu.
// The library writes a frame of its own with one Write (a control frame
// fits in its buffer), so the frame is written whole.
type libWriter struct{ r *rawSocket }

func (w libWriter) Write(p []byte) (int, error) {
	w.r.wmu.Lock()
	defer w.r.wmu.Unlock()
	return w.r.nc.Write(p)
}

// Frames of a connection's queue as they go on the wire (see encode).
const (
	maxHeader = 10 // bytes of a text frame's header, at most
	// A frame up to copyMax bytes is copied beside its header; a larger
	// one is written from where it is.
	copyMax = 2 << 10
	// writeNow writes at most directMax bytes; more goes to the writer.
	directMax = 16 << 10
)

// appendHeader appends the header of a final, unmasked text frame of n
// bytes (RFC 6455, section 5.2).
func appendHeader(b []byte, n int) []byte {
	switch {
	case n < 126:
		return append(b, 0x81, byte(n))
	case n <= math.MaxUint16:
		return append(b, 0x81, 126, byte(n>>8), byte(n))
	default:
		return binary.BigEndian.AppendUint64(append(b, 0x81, 127), uint64(n))
	}
}

// encode lays out wb's frames as they go on the wire: wb.iov, to be written
// in order, holding wb.wire (the headers, control frames, and the frames
// up to copyMax bytes) and the larger frames.
func (wb *writeBuffers) encode() {
	need := 0
	for _, f := range wb.frames {
		need += maxHeader
		if len(f) <= copyMax {
			need += len(f)
		}
	}
	// Grown once, so that the slices of wire in iov stay valid.
	wire := slices.Grow(wb.wire[:0], need)
	iov := wb.iov[:0]
	start := 0
	for _, f := range wb.frames {
		if !isControlFrame(f) {
			wire = appendHeader(wire, len(f))
		}
		if len(f) <= copyMax {
			wire = append(wire, f...)
			continue
		}
		iov = append(iov, wire[start:], f)
		start = len(wire)
	}
	if start < len(wire) {
		iov = append(iov, wire[start:])
	}
	wb.wire, wb.iov = wire, iov
}

// writeFrames writes wb's frames (or, after a direct write that the socket
// took only part of, the rest of them), blocking until the socket has
// taken them all or failed: it is the connection's writer's.
func (r *rawSocket) writeFrames(wb *writeBuffers) error {
	if wb.rest != nil {
		// Part of a frame is on the wire: the rest must follow it, and
		// wmu has been held since (see writeNow).
		rest := wb.rest
		wb.rest = nil
		err := r.writeAll(net.Buffers{rest})
		r.wmu.Unlock()
		return err
	}
	wb.encode()
	r.wmu.Lock()
	defer r.wmu.Unlock()
	if r.sealed.Load() {
		return errSealed
	}
	return r.writeAll(wb.iov)
}

// writeChunk is the most writeAll hands the socket at once: a peer that
// reads less than this in --write-timeout has stopped reading (see
// stallTimer).
const writeChunk = 64 << 10

// writeAll writes bufs, which it consumes, counting in written what the
// socket has taken: a batch larger than writeChunk (a joined frame with a
// long history, a resume's catch-up) goes in pieces of at most writeChunk,
// so that a peer reading it steadily, however slowly, shows progress. wmu
// is held.
func (r *rawSocket) writeAll(bufs net.Buffers) error {
	total := 0
	for _, b := range bufs {
		total += len(b)
	}
	if total <= writeChunk {
		var n int64
		var err error
		if len(bufs) == 1 {
			var m int
			m, err = r.nc.Write(bufs[0])
			n = int64(m)
		} else {
			n, err = bufs.WriteTo(r.nc)
		}
		r.written.Add(uint64(n))
		return err
	}
	for len(bufs) > 0 {
		if len(bufs[0]) > writeChunk {
			n, err := r.nc.Write(bufs[0][:writeChunk])
			r.written.Add(uint64(n))
			if err != nil {
				return err
			}
			bufs[0] = bufs[0][writeChunk:]
			continue
		}
		i, size := 0, 0
		for i < len(bufs) && size+len(bufs[i]) <= writeChunk {
			size += len(bufs[i])
			i++
		}
		piece := bufs[:i:i]
		n, err := piece.WriteTo(r.nc)
		r.written.Add(uint64(n))
		if err != nil {
			return err
		}
		bufs = bufs[i:]
	}
	return nil
}

// writeNow writes wb's frames with one system call that does not block,
// on the caller's goroutine (see outQueue.direct), when they come to at
// most directMax bytes, no other write is under way and the socket takes
// them all: then it reports true. Otherwise they are left to the
// connection's writer: wb's frames as they were, or, when the socket took
// part of them, the rest in wb.rest, with wmu held until the writer has
// written it.
func (r *rawSocket) writeNow(wb *writeBuffers) bool {
	if r.rc == nil {
		return false
	}
	wb.encode()
	if len(wb.iov) != 1 || len(wb.wire) > directMax || !r.wmu.TryLock() {
		return false
	}
	if r.sealed.Load() {
		r.wmu.Unlock()
		return false
	}
	b := wb.wire
	fw := fdWritePool.Get().(*fdWrite)
	fw.b, fw.n = b, 0 // n stays 0 when the descriptor is closed and fn never runs
	// Under the descriptor's write lock: it cannot be closed meanwhile.
	_ = r.rc.Write(fw.fn)
	n := fw.n
	fw.b = nil
	fdWritePool.Put(fw)
	if n == len(b) {
		r.wmu.Unlock()
		return true
	}
	wb.rest = b[n:]
	return false
}

// fdWrite is writeNow's call of writeOnce, pooled: a closure made per
// write would be garbage per frame.
type fdWrite struct {
	b  []byte
	n  int
	fn func(fd uintptr) bool
}

var fdWritePool = sync.Pool{New: func() any {
	fw := new(fdWrite)
	fw.fn = func(fd uintptr) bool {
		fw.n = writeOnce(fd, fw.b)
		return true
	}
	return fw
}}

// park returns once the library has something to read: a frame other than
// a ping or a pong, the end of the stream, or an error (the connection
// closed). Pings and pongs that arrive meanwhile are consumed (see
// control).
//
// A close handshake that starts while the socket is parked waits to read
// until park returns, which it does when the peer's close frame arrives,
// or when the handshake gives up and closes the connection.
//
// While parked the socket is also in the wake set, so that a busy gateway
// notices its frame without waiting for the runtime (see wakeSet).
func (r *rawSocket) park() {
	if r.readable == nil {
		return
	}
	for {
		r.mu.Lock()
		idle := !r.closing && r.br.Buffered() == 0
		r.parked = idle
		r.mu.Unlock()
		if !idle {
			return
		}
		r.armWake()
		err := r.rc.Read(r.readable)
		r.mu.Lock()
		poked := r.unpoke()
		r.parked = false
		r.mu.Unlock()
		if !poked || err == nil {
			return
		}
		// Woken by the deadline, maybe before the runtime's poller let
		// readable look: look now (the loop), and wait again if what
		// arrived was a ping or a pong.
	}
}

// unpoke clears the read deadline that poke set, if it did, before anyone
// reads the socket, and reports whether it did; called with mu held.
func (r *rawSocket) unpoke() bool {
	if !r.poked {
		return false
	}
	r.poked = false
	_ = r.nc.SetReadDeadline(time.Time{})
	return true
}

// controlFrames reports the length of the complete client pings and pongs
// (FIN, opcode 9 or 10, masked, payload ≤ 125 bytes) that b consists of, or
// 0 when b holds anything else or a frame cut short.
func controlFrames(b []byte) int {
	n := 0
	for n < len(b) {
		if len(b)-n < 2 || (b[n] != 0x89 && b[n] != 0x8A) || b[n+1]&0x80 == 0 || b[n+1]&0x7F > 125 {
			return 0
		}
		end := n + 6 + int(b[n+1]&0x7F)
		if end > len(b) {
			return 0
		}
		n = end
	}
	return n
}

// control acts on client control frames that park consumed (b holds whole
// frames, see controlFrames): a pong ends the keep-alive's wait, a ping is
// answered with a pong through the queue.
func (r *rawSocket) control(b []byte) {
	for len(b) > 0 {
		size := 6 + int(b[1]&0x7F)
		if b[0] == 0x8A {
			r.pinger.pong()
		} else if r.q != nil {
			key, payload := b[2:6], b[6:size]
			pong := make([]byte, 2+len(payload))
			pong[0], pong[1] = 0x8A, byte(len(payload))
			for i, c := range payload {
				pong[2+i] = c ^ key[i&3]
			}
			// Counted against the outbound limit: a client that pings
			// without reading is a slow consumer like any other.
			r.q.push(pong)
		}
		b = b[size:]
	}
}

// stallTimer closes a connection whose writer has been blocked for
// WriteTimeout: a slow consumer whose socket is too full to even carry the
// 4008. The writer arms it before a batch of writes and stops it after;
// sockets are written without a context, which would cost a timer and a
// registration per write. Ending the connection closes its TCP connection,
// which fails the blocked write.
//
// Blocked means that the socket took nothing in that time (see
// rawSocket.written): a large batch written to a peer that reads it
// steadily but slowly (a long history on a slow link) takes as long as it
// takes, as the peer is reading. Progress is looked at when the timer
// fires, so a write that stalls midway is ended between one and two
// WriteTimeout after the socket last took something.
type stallTimer struct {
	mu    sync.Mutex
	t     *time.Timer
	armed bool      // between arm and stop; guarded by mu
	seen  uint64    // the socket's written count when last armed or checked; guarded by mu
	due   time.Time // when the timer set last is due; guarded by mu
}

// arm starts the timer; written counts what the socket has taken, and end
// ends the connection whose context is ctx.
func (st *stallTimer) arm(s *Server, ctx context.Context, written *atomic.Uint64, slow, end func()) {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.armed, st.seen, st.due = true, written.Load(), time.Now().Add(s.cfg.WriteTimeout)
	if st.t != nil {
		st.t.Reset(s.cfg.WriteTimeout)
		return
	}
	st.t = time.AfterFunc(s.cfg.WriteTimeout, func() {
		st.mu.Lock()
		// Not armed, or armed again since this firing was due (the write it
		// was for ended as it fired, and the next one reset the timer,
		// which fires again for it).
		if !st.armed || ctx.Err() != nil || time.Now().Before(st.due) {
			st.mu.Unlock()
			return
		}
		if n := written.Load(); n != st.seen {
			st.seen, st.due = n, time.Now().Add(s.cfg.WriteTimeout)
			st.t.Reset(s.cfg.WriteTimeout)
			st.mu.Unlock()
			return
		}
		st.armed = false
		st.mu.Unlock()
		slow()
		s.log.Debug("write stalled; closing", "timeout", s.cfg.WriteTimeout)
		end()
	})
}

func (st *stallTimer) stop() {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.armed = false
	if st.t != nil {
		st.t.Stop()
	}
}
