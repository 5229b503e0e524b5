package gateway

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// queueSocket is one accepted WebSocket with a queue and a writer wired as
// a connection's are, for tests to push to and read from.
type queueSocket struct {
	ws  *websocket.Conn
	q   *outQueue
	raw *rawSocket
	w   *connWriter
	// spawned counts writers started; handed counts those that began with
	// the rest of a direct write.
	spawned, handed atomic.Int32
}

// serveQueueSocket accepts one WebSocket; setup, when set, runs on its TCP
// connection first. It returns the socket and a raw client of it.
func serveQueueSocket(t *testing.T, setup func(*net.TCPConn)) (*queueSocket, net.Conn, *bufio.Reader) {
	t.Helper()
	s, _ := devServer(t, Config{QuietCheck: -1, PingInterval: -1})
	ch := make(chan *queueSocket, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		ws, raw, err := acceptWS(rw, r, &websocket.AcceptOptions{CompressionMode: websocket.CompressionDisabled})
		if err != nil {
			t.Error(err)
			return
		}
		if setup != nil {
			setup(raw.nc.(*net.TCPConn))
		}
		ctx, cancel := context.WithCancel(context.Background())
		qs := &queueSocket{ws: ws, q: newOutQueue(0), raw: raw}
		qs.q.directGap = 0 // every push may write: see TestFastFramesGoToTheWriter
		qs.w = &connWriter{s: s, raw: raw, q: qs.q, ctx: ctx,
			cancel:    func() { cancel(); _ = raw.nc.Close() },
			closeWith: func(code websocket.StatusCode, reason string) { _ = raw.close(ws, code, reason) },
		}
		var writers sync.WaitGroup
		qs.q.spawn = func(wb *writeBuffers) {
			qs.spawned.Add(1)
			if wb != nil && wb.rest != nil {
				qs.handed.Add(1)
			}
			qs.w.drain(wb)
		}
		qs.q.direct, qs.q.writers = qs.w.writeNow, &writers
		t.Cleanup(func() {
			qs.w.cancel()
			qs.q.close()
			writers.Wait()
			ws.CloseNow()
		})
		ch <- qs
	}))
	t.Cleanup(srv.Close)
	nc, br := rawUpgrade(t, srv.URL, "/", nil)
	return <-ch, nc, br
}

// gapOfAnHour sets the queue's directGap to an hour, the last direct
// write an hour ago: the next push may write, and one behind it may not.
func (qs *queueSocket) gapOfAnHour() {
	qs.q.mu.Lock()
	qs.q.directGap = time.Hour
	qs.q.lastDirect = clock() - time.Hour
	qs.q.mu.Unlock()
}

// readFrame reads one unmasked frame from the server.
func readFrame(t *testing.T, br *bufio.Reader) (op byte, payload []byte) {
	t.Helper()
	hdr := make([]byte, 2)
	if _, err := io.ReadFull(br, hdr); err != nil {
		t.Fatal(err)
	}
	if hdr[1]&0x80 != 0 {
		t.Fatalf("a masked frame from the server: % x", hdr)
	}
	n := uint64(hdr[1] & 0x7F)
	switch n {
	case 126:
		ext := make([]byte, 2)
		if _, err := io.ReadFull(br, ext); err != nil {
			t.Fatal(err)
		}
		n = uint64(binary.BigEndian.Uint16(ext))
	case 127:
		ext := make([]byte, 8)
		if _, err := io.ReadFull(br, ext); err != nil {
			t.Fatal(err)
		}
		n = binary.BigEndian.Uint64(ext)
	}
	payload = make([]byte, n)
	if _, err := io.ReadFull(br, payload); err != nil {
		t.Fatal(err)
	}
	return hdr[0], payload
}

// A frame pushed to an idle connection is written at once, on the
// pushing goroutine: no writer is started, and the queue is idle again
// when the push returns.
func TestDirectWriteOnAnIdleSocket(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("direct writes are Linux only")
	}
	qs, _, br := serveQueueSocket(t, nil)
	for i := range 5 {
		text := fmt.Sprintf("word %d ", i)
		qs.q.pushDelta("c", "t", int64(i+1), int64(i+1), text, 0, false)
		if !qs.q.idle() {
			t.Fatalf("push %d returned with the queue busy", i)
		}
		op, payload := readFrame(t, br)
		if op != 0x81 || !bytes.Contains(payload, []byte(`"text":"`+text+`"`)) {
			t.Fatalf("frame %d: op %#x %s", i, op, payload)
		}
	}
	qs.q.pushPing(pingFrame)
	if op, payload := readFrame(t, br); op != 0x89 || len(payload) != 0 {
		t.Fatalf("ping written as op %#x, % x", op, payload)
	}
	if n := qs.spawned.Load(); n != 0 {
		t.Fatalf("%d writers started for frames an idle socket took at once", n)
	}
}

// Frames that come less than directGap apart go to a spawned writer,
// which leaves the queue to merge a fast stream's deltas meanwhile.
func TestFastFramesGoToTheWriter(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("direct writes are Linux only")
	}
	qs, _, br := serveQueueSocket(t, nil)
	qs.gapOfAnHour()
	qs.q.pushDelta("c", "t", 1, 1, "first ", 0, false)
	if !qs.q.idle() || qs.spawned.Load() != 0 {
		t.Fatal("the first frame was not written at once")
	}
	readFrame(t, br)
	qs.q.pushDelta("c", "t", 2, 2, "second ", 0, false)
	if _, payload := readFrame(t, br); !bytes.Contains(payload, []byte(`"text":"second "`)) {
		t.Fatalf("second frame %s", payload)
	}
	if n := qs.spawned.Load(); n != 1 {
		t.Fatalf("%d writers started for a frame right behind another, want 1", n)
	}
}

// A turn's end right behind its last delta is written by its pusher, as
// nothing of the turn comes behind it to share a write with: it does not
// wait for a writer goroutine to be scheduled. A frame behind a running
// writer still goes to it, in order.
func TestTurnEndIsWrittenByItsPusher(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("direct writes are Linux only")
	}
	qs, _, br := serveQueueSocket(t, nil)
	qs.gapOfAnHour()
	qs.q.pushDelta("c", "t", 1, 1, "last ", 0, false)
	readFrame(t, br)
	qs.q.pushEnd([]byte(`{"type":"turn.end"}`))
	if !qs.q.idle() {
		t.Fatal("the end's push returned with the queue busy")
	}
	if _, payload := readFrame(t, br); string(payload) != `{"type":"turn.end"}` {
		t.Fatalf("frame %s, want the end", payload)
	}
	if n := qs.spawned.Load(); n != 0 {
		t.Fatalf("%d writers started for an end right behind a delta, want none", n)
	}

	// Behind a writer: hold the socket's write lock so that a delta's
	// writer cannot finish, then push the end.
	qs.raw.wmu.Lock()
	qs.q.pushDelta("c", "t2", 1, 1, "one ", 0, false)
	qs.q.pushEnd([]byte(`{"type":"turn.end","turn_id":"t2"}`))
	qs.raw.wmu.Unlock()
	if _, payload := readFrame(t, br); !bytes.Contains(payload, []byte(`"text":"one "`)) {
		t.Fatalf("frame %s, want the delta", payload)
	}
	if _, payload := readFrame(t, br); string(payload) != `{"type":"turn.end","turn_id":"t2"}` {
		t.Fatalf("frame %s, want the end behind the delta", payload)
	}
	if n := qs.spawned.Load(); n != 1 {
		t.Fatalf("%d writers started, want the delta's", n)
	}
}

// When the socket takes only part of a direct write, the writer writes the
// rest before anything else: a slow reader gets every frame whole and in
// order, those queued behind the cut one included.
func TestDirectWriteCutShortIsFinishedByTheWriter(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("direct writes are Linux only")
	}
	qs, nc, br := serveQueueSocket(t, func(c *net.TCPConn) { _ = c.SetWriteBuffer(4096) })
	_ = nc.(*net.TCPConn).SetReadBuffer(4096)
	frame := func(i int) string { return fmt.Sprintf("%06d:%s", i, bytes.Repeat([]byte{'a' + byte(i%26)}, 1500)) }
	// Push, while the client reads nothing, until a push leaves a writer
	// running: the socket's buffers are full.
	n := 0
	for ; qs.q.idle(); n++ {
		if n == 10000 {
			t.Fatal("15 MB pushed and the socket still takes it all")
		}
		qs.q.push([]byte(frame(n)))
	}
	for range 20 {
		qs.q.push([]byte(frame(n)))
		n++
	}
	for i := range n {
		op, payload := readFrame(t, br)
		if op != 0x81 || string(payload) != frame(i) {
			t.Fatalf("frame %d of %d: op %#x, %.20q (%d bytes)", i, n, op, payload, len(payload))
		}
	}
	if qs.handed.Load() == 0 {
		t.Fatalf("no direct write was cut short in %d frames (%d writers)", n, qs.spawned.Load())
	}
	t.Logf("%d frames, %d writers, %d finishing a direct write", n, qs.spawned.Load(), qs.handed.Load())
}

// The writer's frames of every size, control frames among them, go on the
// wire with the right header, in order, whether copied beside their
// header or written from where they are.
func TestWriterFramesOfEverySize(t *testing.T) {
	qs, _, br := serveQueueSocket(t, nil)
	sizes := []int{0, 1, 125, 126, copyMax, copyMax + 1, 65535, 65536, 200_000, 3}
	wb := getWriteBuffers()
	defer wb.put()
	var want [][]byte
	for i, n := range sizes {
		f := bytes.Repeat([]byte{'a' + byte(i)}, n)
		want = append(want, f)
		wb.frames = append(wb.frames, f)
		if i == 4 {
			wb.frames = append(wb.frames, pingFrame)
			want = append(want, nil)
		}
	}
	done := make(chan bool)
	go func() { done <- qs.w.write(wb) }()
	for i, f := range want {
		op, payload := readFrame(t, br)
		switch {
		case f == nil && op != 0x89:
			t.Fatalf("frame %d: op %#x, want the ping", i, op)
		case f != nil && (op != 0x81 || !bytes.Equal(payload, f)):
			t.Fatalf("frame %d: op %#x, %d bytes, want a text frame of %d", i, op, len(payload), len(f))
		}
	}
	select {
	case ok := <-done:
		if !ok {
			t.Fatal("write failed")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("write did not return")
	}
}

// A frame the library writes itself (here the close frame) waits for the
// gateway's frame being written, however long the socket takes, and no
// frame of the gateway's follows it.
func TestLibraryFramesGoBetweenWholeFrames(t *testing.T) {
	qs, nc, br := serveQueueSocket(t, func(c *net.TCPConn) { _ = c.SetWriteBuffer(64 << 10) })
	_ = nc.(*net.TCPConn).SetReadBuffer(64 << 10)
	big := bytes.Repeat([]byte("x"), 4<<20)
	qs.q.push(big)
	// Wait until the writer is in the middle of it: holding the write
	// lock, on a socket that cannot take 4 MiB while nobody reads.
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for qs.raw.wmu.TryLock() {
		qs.raw.wmu.Unlock()
		<-tick.C
	}
	closed := make(chan error, 1)
	go func() { closed <- qs.raw.close(qs.ws, websocket.StatusNormalClosure, "bye") }()
	if op, payload := readFrame(t, br); op != 0x81 || !bytes.Equal(payload, big) {
		t.Fatalf("op %#x, %d bytes, want the whole text frame", op, len(payload))
	}
	op, payload := readFrame(t, br)
	if op != 0x88 || binary.BigEndian.Uint16(payload) != uint16(websocket.StatusNormalClosure) {
		t.Fatalf("op %#x % x, want the close frame", op, payload)
	}
	// Pushed after the close frame: the writer refuses it and ends the
	// connection.
	qs.q.push([]byte("late"))
	if _, err := br.ReadByte(); err == nil {
		t.Fatal("a frame after the close frame")
	}
	<-closed
}
