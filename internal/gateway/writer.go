package gateway

import (
	"sync"

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
	merged   int               // merges since the last take; guarded by mu
	// spawn, the connection's writer, is started in a new goroutine
	// whenever items arrive and no writer is running: an idle connection
	// costs no writer goroutine. Until it is set, items only wait.
	spawn   func()
	writing bool            // a spawned writer runs; guarded by mu
	writers *sync.WaitGroup // counts spawned writers
	free    []*delta        // recycled deltas; guarded by mu
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
	return &outQueue{limit: limit, pending: make(map[string]*delta)}
}

// signal starts the writer unless one runs; called with mu held.
func (q *outQueue) signal() {
	if q.spawn == nil || q.writing {
		return
	}
	q.writing = true
	q.writers.Add(1)
	go func() {
		defer q.writers.Done()
		q.spawn()
	}()
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
func (q *outQueue) push(frame []byte) bool { return q.pushFrame(frame, false) }

// pushExempt enqueues a frame not counted against the limit (a joined frame,
// as large as the history the client asked for).
func (q *outQueue) pushExempt(frame []byte) bool { return q.pushFrame(frame, true) }

func (q *outQueue) pushFrame(frame []byte, exempt bool) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return false
	}
	q.items = append(q.items, outItem{frame: frame})
	if !exempt {
		q.bytes += len(frame)
	}
	return q.afterPushLocked()
}

// pushDelta enqueues delta seq (text from..seq) of a turn, merging it into
// that turn's delta still waiting in the queue when it continues it. The
// text of an exempt delta (catch-up) is not counted against the limit.
func (q *outQueue) pushDelta(conv, turn string, from, seq int64, text string, ts int64, exempt bool) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return false
	}
	if d := q.pending[turn]; d != nil && d.seq+1 == from {
		d.seq = seq
		d.text = append(d.text, text...)
		d.ts = ts
		if !exempt {
			q.bytes += len(text)
		}
		q.merged++
		return q.afterPushLocked()
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
	if !exempt {
		q.bytes += len(text)
	}
	return q.afterPushLocked()
}

// forget stops merging into turn's queued delta: a frame that must follow
// it (turn.end) is about to be queued.
func (q *outQueue) forget(turn string) {
	q.mu.Lock()
	delete(q.pending, turn)
	q.mu.Unlock()
}

func (q *outQueue) afterPushLocked() bool {
	if q.limit > 0 && q.bytes > q.limit {
		q.closed, q.overflow = true, true
		q.items = nil
		q.signal()
		return false
	}
	if len(q.items) == 1 {
		q.signal()
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
	merged, q.merged = q.merged, 0
	return frames, buf, merged, false
}

// close stops the queue; later pushes fail.
func (q *outQueue) close() {
	q.mu.Lock()
	if !q.closed {
		q.closed = true
		q.items = nil
		q.signal()
	}
	q.mu.Unlock()
}

// idle reports whether nothing is queued and no spawned writer runs.
func (q *outQueue) idle() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.items) == 0 && !q.writing
}

// writeBuffers are a writer's list of frames and the buffer its delta
// frames are encoded into. A writer lives for one burst of frames (see
// outQueue.spawn), so they are pooled rather than grown afresh by each: at
// 20,000 tokens/s, growing them was a sixth of the server's allocation.
type writeBuffers struct {
	frames [][]byte
	buf    []byte
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
	if cap(wb.frames) > maxPooledFrames || cap(wb.buf) > maxPooledWriteBuf {
		return
	}
	wb.frames, wb.buf = wb.frames[:0], wb.buf[:0]
	writeBufferPool.Put(wb)
}
