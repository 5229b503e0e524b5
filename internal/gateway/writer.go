package gateway

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"

	"github.com/tokenrelay/tokenrelay/internal/protocol"
)

// outQueue is a connection's outbound queue: everybody enqueues without
// blocking, one writer drains it. Queued deltas of the same turn are merged
// into one frame (lossless: from..seq); past limit bytes the queue closes
// and the connection is ended as a slow consumer.
type outQueue struct {
	limit int // bytes; 0 = unlimited

	mu       sync.Mutex
	items    []outItem         // guarded by mu
	pending  map[string]*delta // turn id → its delta still in items; guarded by mu
	bytes    int               // bytes queued; guarded by mu
	closed   bool              // guarded by mu
	overflow bool              // closed for passing limit; guarded by mu
	// asked is the bytes of the frames a client asked for (see pushAsked)
	// queued uncounted since the queue was last taken; guarded by mu.
	asked  int
	merged int // merges since the last take; guarded by mu
	// spawn, the connection's writer, is started in a new goroutine
	// whenever items arrive and no writer is running: an idle connection
	// costs no writer goroutine. Until it is set, items only wait. Its
	// argument is what it must write first, or nil.
	spawn func(*writeBuffers)
	// direct, when set, is tried first: the pusher that finds no writer
	// running takes what is queued and calls direct on its own goroutine,
	// which writes it without blocking, or reports false to leave the rest
	// (in its argument) to a spawned writer. A connection keeping up with a
	// stream then costs no goroutine per frame and no scheduler hand-off.
	//
	// Frames that come less than directGap apart go to a spawned writer
	// all the same: while it writes, the queue merges a turn's deltas, so
	// a fast stream costs fewer, larger frames (and its producer does not
	// wait for the socket). A turn's end is the exception (pushEnd).
	direct     func(*writeBuffers) bool
	directGap  time.Duration
	lastDirect time.Duration   // when the last direct write began (see clock); guarded by mu
	writing    bool            // a writer (spawned, or a pusher in direct) runs; guarded by mu
	writers    *sync.WaitGroup // counts running writers
	free       []*delta        // recycled deltas; guarded by mu
	// onSlow counts the connection as a slow consumer (see slowConsumer);
	// set before the queue is used, or nil.
	onSlow   func()
	slowSeen atomic.Bool
}

type outItem struct {
	frame []byte // a pre-encoded frame, or nil for a delta
	delta *delta
}

type delta struct {
	conv, turn string
	from, seq  int64
	text       []byte
	ts         int64
}

const deltaOverhead = 96 // bytes of a delta frame besides its text

func newOutQueue(limit int) *outQueue {
	return &outQueue{limit: limit, pending: make(map[string]*delta), directGap: directGap}
}

// signal starts the writer unless one runs; called with mu held. It
// reports true when the caller is to be the writer (see direct): it then
// calls writeDirect once it has released mu. last says that the frame
// just queued ends its turn, so that directGap does not apply (see
// pushEnd).
func (q *outQueue) signal(last bool) (direct bool) {
	if q.spawn == nil || q.writing {
		return false
	}
	q.writing = true
	q.writers.Add(1)
	if q.direct != nil && !q.closed {
		if now := clock(); last || now-q.lastDirect >= q.directGap {
			q.lastDirect = now
			return true
		}
	}
	q.start(nil)
	return false
}

// directGap is how far apart frames must come for a pusher to write them
// itself (see outQueue.direct): a stream of up to 500 tokens/s per
// connection, which is every model's.
const directGap = 2 * time.Millisecond

var clockStart = time.Now()

// clock reads the monotonic clock.
func clock() time.Duration { return time.Since(clockStart) }

// start runs the writer, already counted in writers, on a new goroutine.
func (q *outQueue) start(wb *writeBuffers) {
	go func() {
		defer q.writers.Done()
		q.spawn(wb)
	}()
}

// writeDirect is the writer for one go, on a pusher's goroutine, after
// signal said so: it takes everything queued and hands it to direct. What
// direct cannot write at once, and anything queued meanwhile, goes to a
// spawned writer.
func (q *outQueue) writeDirect() {
	wb := getWriteBuffers()
	wb.frames, wb.buf, wb.merged, _ = q.take(wb.frames[:0], wb.buf[:0])
	if len(wb.frames) == 0 || !q.direct(wb) {
		// Closed meanwhile (the writer reports an overflow), or the
		// socket did not take it all.
		q.start(wb)
		return
	}
	wb.put()
	pollWakes()
	q.mu.Lock()
	if len(q.items) > 0 || q.closed {
		q.mu.Unlock()
		q.start(nil)
		return
	}
	q.writing = false
	q.mu.Unlock()
	q.writers.Done()
}

// next is take for a spawned writer: when nothing is queued (or the queue
// has closed) it marks the writer gone and reports ok=false, so the writer
// returns and the next push starts a new one.
func (q *outQueue) next(frames [][]byte, buf []byte) (_ [][]byte, _ []byte, merged int, overflow, ok bool) {
	q.mu.Lock()
	empty := q.closed || len(q.items) == 0
	if empty {
		q.writing = false
		overflow = q.overflow
		q.mu.Unlock()
		return frames, buf, 0, overflow, false
	}
	q.mu.Unlock()
	frames, buf, merged, overflow = q.take(frames, buf)
	return frames, buf, merged, overflow, true
}

// push enqueues a pre-encoded frame. It reports false when the queue is
// closed or overflowed (the queue is then closed).
func (q *outQueue) push(frame []byte) bool { return q.pushFrame(frame, false, false) }

// pushPing enqueues a ping, which the limit does not count.
func (q *outQueue) pushPing(frame []byte) bool { return q.pushFrame(frame, true, false) }

// askedPerLimit is how many times the limit the frames a client asked for
// may take in the queue uncounted (see pushAsked).
const askedPerLimit = 16

// pushAsked enqueues a frame the client asked for (a joined frame, as large
// as the history it asked for), which the limit does not count, nor the
// catch-up text that follows a join (pushDelta): a long history never
// closes a socket. They have a budget of their own, askedPerLimit times the
// limit, beyond the first of them queued: a client that asks again and
// again without reading, or faster than it reads, is closed as a slow
// consumer once what it asked for passes that, rather than growing the
// queue by a history each time. (A client that switches between
// conversations with long histories on a slow link asks faster than it
// reads; the budget lets it switch a few times before a write would be
// blocked for --write-timeout anyway.)
func (q *outQueue) pushAsked(frame []byte) bool {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return false
	}
	q.items = append(q.items, outItem{frame: frame})
	// What follows a joined frame continues its snapshot, not a delta
	// queued before it: a re-join while the previous view's delta still
	// waits must not have the new view's deltas merged into that one,
	// ahead of the snapshot they continue.
	clear(q.pending)
	q.countAskedLocked(len(frame))
	return q.unlockAfterPush(false)
}

// countAskedLocked counts n bytes a client asked for: uncounted while
// within their budget (or the first of them queued), against the limit
// past it, which then closes the queue. q.mu is held.
func (q *outQueue) countAskedLocked(n int) {
	if q.limit > 0 && q.asked > 0 && q.asked+n > askedPerLimit*q.limit {
		q.bytes += n
		return
	}
	q.asked += n
}

// pushEnd enqueues a turn's end. No frame of the turn comes behind it to
// share a write with, so when no writer runs the pusher writes it itself
// however soon after the last direct write it comes (directGap is for a
// stream of deltas): an end right behind the turn's last delta, or a
// cancelled turn's, does not wait for a writer goroutine to be scheduled.
func (q *outQueue) pushEnd(frame []byte) bool { return q.pushFrame(frame, false, true) }

func (q *outQueue) pushFrame(frame []byte, exempt, last bool) bool {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return false
	}
	q.items = append(q.items, outItem{frame: frame})
	if !exempt {
		q.bytes += len(frame)
	}
	return q.unlockAfterPush(last)
}

// pushDelta enqueues delta seq (text from..seq) of a turn, merging it into
// that turn's delta still waiting in the queue when it continues it. The
// text of a catch-up delta is counted as what the client asked for (see
// pushAsked).
func (q *outQueue) pushDelta(conv, turn string, from, seq int64, text string, ts int64, catchUp bool) bool {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return false
	}
	if d := q.pending[turn]; d != nil && d.seq+1 == from {
		d.seq = seq
		d.text = append(d.text, text...)
		d.ts = ts
		if catchUp {
			q.countAskedLocked(len(text))
		} else {
			q.bytes += len(text)
		}
		q.merged++
		return q.unlockAfterPush(false)
	}
	var d *delta
	if n := len(q.free); n > 0 {
		d, q.free = q.free[n-1], q.free[:n-1]
	} else {
		d = new(delta)
	}
	d.conv, d.turn, d.from, d.seq, d.ts = conv, turn, from, seq, ts
	d.text = append(d.text[:0], text...)
	q.pending[turn] = d
	q.items = append(q.items, outItem{delta: d})
	q.bytes += deltaOverhead
	if catchUp {
		q.countAskedLocked(len(text))
	} else {
		q.bytes += len(text)
	}
	return q.unlockAfterPush(false)
}

// forget stops merging into turn's queued delta: a frame that must follow
// it (turn.end) is about to be queued.
func (q *outQueue) forget(turn string) {
	q.mu.Lock()
	delete(q.pending, turn)
	q.mu.Unlock()
}

// unlockAfterPush ends a push: it closes the queue when the push took it
// past its limit, starts the writer when none runs, and releases mu. It
// reports false when the queue closed. last is signal's.
func (q *outQueue) unlockAfterPush(last bool) bool {
	if q.limit > 0 && q.bytes > q.limit {
		q.closed, q.overflow = true, true
		q.items = nil
		q.signal(false) // closed: never direct
		q.mu.Unlock()
		q.slowConsumer()
		return false
	}
	direct := len(q.items) == 1 && q.signal(last)
	q.mu.Unlock()
	if direct {
		q.writeDirect()
	}
	return true
}

// take returns everything queued, encoded, appending to buf's storage; it
// reports overflow once the queue was closed for passing its limit. After
// close, take returns nothing.
func (q *outQueue) take(frames [][]byte, buf []byte) (_ [][]byte, _ []byte, merged int, overflow bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return frames, buf, 0, q.overflow
	}
	for _, it := range q.items {
		if it.frame != nil {
			frames = append(frames, it.frame)
			continue
		}
		d := it.delta
		start := len(buf)
		buf = protocol.AppendDelta(buf, d.conv, d.turn, d.from, d.seq, d.text, d.ts)
		frames = append(frames, buf[start:len(buf):len(buf)])
		delete(q.pending, d.turn)
		if cap(d.text) <= 4096 {
			q.free = append(q.free, d)
		}
	}
	clear(q.items)
	q.items = q.items[:0]
	q.bytes = 0
	q.asked = 0
	merged, q.merged = q.merged, 0
	return frames, buf, merged, false
}

// slowConsumer counts the connection as a slow consumer, once however
// many ways it shows it: its queue overflowed, or a write was blocked for
// --write-timeout (often both, one after the other).
func (q *outQueue) slowConsumer() {
	if q.onSlow != nil && q.slowSeen.CompareAndSwap(false, true) {
		q.onSlow()
	}
}

// close stops the queue; later pushes fail.
func (q *outQueue) close() {
	q.mu.Lock()
	if !q.closed {
		q.closed = true
		q.items = nil
		q.signal(false) // closed: never direct
	}
	q.mu.Unlock()
}

// stopped reports whether the queue was closed: what a client asks for
// then can no longer be answered, so its frames need not be handled.
func (q *outQueue) stopped() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.closed
}

// idle reports whether nothing is queued and no writer runs.
func (q *outQueue) idle() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.items) == 0 && !q.writing
}

// writeBuffers are what a writer works with: the frames it took from the
// queue, the buffer their delta frames are encoded into, and the bytes
// that go on the wire (see rawSocket.writeFrames). A writer lives for one
// burst of frames (see outQueue.spawn), so they are pooled rather than
// grown afresh by each: at 20,000 tokens/s, growing them was a sixth of the
// server's allocation.
type writeBuffers struct {
	frames [][]byte
	buf    []byte
	merged int // deltas merged into frames

	wire []byte      // headers, and the frames small enough to copy
	iov  net.Buffers // wire and the larger frames, in order
	// rest, when set, is the end of frames' encoding that a direct write
	// left unwritten (see rawSocket.writeNow); the write lock is held for
	// it, and the writer writes it first.
	rest []byte
}

var writeBufferPool = sync.Pool{New: func() any { return new(writeBuffers) }}

// Larger ones (a burst of catch-up text) are left to the collector.
const (
	maxPooledFrames   = 1024
	maxPooledWriteBuf = 64 << 10
)

func getWriteBuffers() *writeBuffers { return writeBufferPool.Get().(*writeBuffers) }

// put returns wb to the pool, holding on to no frame.
func (wb *writeBuffers) put() {
	clear(wb.frames[:cap(wb.frames)])
	clear(wb.iov[:cap(wb.iov)])
	if cap(wb.frames) > maxPooledFrames || cap(wb.buf) > maxPooledWriteBuf || cap(wb.wire) > maxPooledWriteBuf {
		return
	}
	wb.frames, wb.buf, wb.wire, wb.iov, wb.rest, wb.merged = wb.frames[:0], wb.buf[:0], wb.wire[:0], wb.iov[:0], nil, 0
	writeBufferPool.Put(wb)
}

// connWriter writes a connection's queue to its socket.
type connWriter struct {
	s         *Server
	raw       *rawSocket
	q         *outQueue
	ctx       context.Context // the connection's lifetime
	cancel    context.CancelFunc
	closeWith func(websocket.StatusCode, string)
	// resolve, when set, turns the frames taken from the queue into the
	// frames to write, in place (see compatConn.resolve).
	resolve func([][]byte) [][]byte
	stall   stallTimer // owned by the writer (drain)
}

// drain is the connection's writer (the queue's spawn): started when
// frames arrive and none runs, it writes wb (when not nil) and then
// everything queued until the queue is empty, and returns. It and direct
// writes (writeNow) are the only code that writes data frames to the
// socket, one at a time.
func (w *connWriter) drain(wb *writeBuffers) {
	if wb == nil {
		wb = getWriteBuffers()
	}
	defer wb.put()
	for {
		if !w.write(wb) {
			return
		}
		var overflow, ok bool
		wb.frames, wb.buf, wb.merged, overflow, ok = w.q.next(wb.frames[:0], wb.buf[:0])
		if overflow {
			// Counted by the push that overflowed the queue.
			w.closeWith(closeSlowConsumer, "slow consumer")
			return
		}
		if !ok {
			return
		}
	}
}

// write writes wb, blocking, and reports false when the socket failed (the
// connection is then ended).
func (w *connWriter) write(wb *writeBuffers) bool {
	if w.resolve != nil && wb.rest == nil {
		wb.frames = w.resolve(wb.frames)
	}
	if len(wb.frames) == 0 {
		return true
	}
	// A write that blocks for WriteTimeout means the peer stopped reading
	// (see stallTimer).
	w.stall.arm(w.s, w.ctx, &w.raw.written, w.q.slowConsumer, w.cancel)
	err := w.raw.writeFrames(wb)
	w.stall.stop()
	if errors.Is(err, errSealed) {
		// The close frame is being written (rawSocket.close): ending the
		// connection now would close the socket before it went out.
		w.q.close()
		return false
	}
	if err != nil {
		if w.ctx.Err() == nil {
			w.s.m.writeErrors.Inc()
		}
		w.cancel()
		w.q.close()
		return false
	}
	w.sent(wb)
	return true
}

// writeNow is the queue's direct writer (see outQueue.direct).
func (w *connWriter) writeNow(wb *writeBuffers) bool {
	if !w.raw.writeNow(wb) {
		return false
	}
	w.sent(wb)
	return true
}

func (w *connWriter) sent(wb *writeBuffers) {
	w.raw.pinger.wentOut(wb.frames)
	n := 0
	for _, f := range wb.frames {
		n += len(f)
	}
	w.s.m.framesSent.Add(float64(len(wb.frames)))
	w.s.m.bytesSent.Add(float64(n))
	if wb.merged > 0 {
		w.s.m.mergedFrames.Add(float64(wb.merged))
	}
}
