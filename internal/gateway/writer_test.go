package gateway

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/coder/websocket"
	"github.com/prometheus/client_golang/prometheus"
)

func TestOutQueueMerge(t *testing.T) {
	type step struct {
		turn      string
		from, seq int64
		text      string
		end       bool // forget + push an end frame
	}
	tests := []struct {
		name   string
		steps  []step
		frames []string // "turn:from-seq:text" or "end"
		merged int
	}{
		{"consecutive deltas merge", []step{{"t", 1, 1, "a", false}, {"t", 2, 2, "b", false}, {"t", 3, 4, "cd", false}},
			[]string{"t:1-4:abcd"}, 2},
		{"a gap does not merge", []step{{"t", 1, 1, "a", false}, {"t", 3, 3, "c", false}},
			[]string{"t:1-1:a", "t:3-3:c"}, 0},
		{"turns merge separately", []step{{"a", 1, 1, "x", false}, {"b", 1, 1, "y", false}, {"a", 2, 2, "z", false}},
			[]string{"a:1-2:xz", "b:1-1:y"}, 1},
		{"nothing merges across an end", []step{{"t", 1, 1, "a", false}, {"t", 0, 0, "", true}, {"t", 2, 2, "b", false}},
			[]string{"t:1-1:a", "end", "t:2-2:b"}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			q := newOutQueue(0)
			for _, s := range tt.steps {
				if s.end {
					q.forget(s.turn)
					q.push([]byte(`{"type":"turn.end"}`))
					continue
				}
				q.pushDelta("c", s.turn, s.from, s.seq, s.text, 0, false)
			}
			frames, _, merged, overflow := q.take(nil, nil)
			if overflow {
				t.Fatal("overflow")
			}
			if merged != tt.merged {
				t.Errorf("merged = %d, want %d", merged, tt.merged)
			}
			var got []string
			for _, f := range frames {
				var d struct {
					Type, TurnID, Text string
					Seq, From          int64
				}
				if err := json.Unmarshal(f, &d); err != nil {
					t.Fatalf("invalid frame %s", f)
				}
				if d.Type == "turn.end" {
					got = append(got, "end")
					continue
				}
				var m map[string]any
				json.Unmarshal(f, &m)
				from := d.Seq
				if v, ok := m["from"]; ok {
					from = int64(v.(float64))
				}
				got = append(got, m["turn_id"].(string)+":"+itoa(int(from))+"-"+itoa(int(d.Seq))+":"+d.Text)
			}
			if len(got) != len(tt.frames) {
				t.Fatalf("frames = %v, want %v", got, tt.frames)
			}
			for i := range got {
				if got[i] != tt.frames[i] {
					t.Fatalf("frames = %v, want %v", got, tt.frames)
				}
			}
		})
	}
}

func TestOutQueueOverflow(t *testing.T) {
	q := newOutQueue(1000)
	if !q.pushAsked(make([]byte, 5000)) {
		t.Fatal("a joined frame overflowed the queue")
	}
	if !q.pushDelta("c", "t", 1, 1, string(make([]byte, 4000)), 0, true) {
		t.Fatal("exempt catch-up text overflowed the queue")
	}
	if !q.pushDelta("c", "t", 2, 2, string(make([]byte, 500)), 0, false) {
		t.Fatal("overflow below the limit")
	}
	if q.pushDelta("c", "t", 3, 3, string(make([]byte, 600)), 0, false) {
		t.Fatal("no overflow past the limit")
	}
	if q.push([]byte("{}")) {
		t.Fatal("push after overflow succeeded")
	}
	if _, _, _, overflow := q.take(nil, nil); !overflow {
		t.Fatal("take did not report the overflow")
	}
}

// What a client asks for is not counted against the limit up to its own
// budget (askedPerLimit times the limit), however large the first of it
// queued; past the budget it counts, and a queue taken starts it afresh.
func TestOutQueueAskedBudget(t *testing.T) {
	q := newOutQueue(100) // a budget of 1600 bytes
	if !q.pushAsked(make([]byte, 5000)) || !q.pushAsked(make([]byte, 10)) {
		t.Fatal("the first asked-for frame, however large, overflowed the queue")
	}
	q.take(nil, nil)
	if !q.pushAsked(make([]byte, 1000)) || !q.pushDelta("c", "t", 1, 1, string(make([]byte, 500)), 0, true) {
		t.Fatal("asked-for frames within their budget overflowed the queue")
	}
	if q.pushAsked(make([]byte, 200)) {
		t.Fatal("an asked-for frame past the budget was not counted")
	}
	if _, _, _, overflow := q.take(nil, nil); !overflow {
		t.Fatal("take did not report the overflow")
	}
}

// A delta that follows a joined frame is not merged into its turn's delta
// queued before that frame: on a re-join the new view's deltas continue the
// snapshot, and merged ahead of it they would reach the client before the
// snapshot they continue (a gap).
func TestOutQueueDoesNotMergeAcrossAJoinedFrame(t *testing.T) {
	q := newOutQueue(0)
	q.pushDelta("c", "t", 4, 10, "old", 0, false)
	q.pushAsked([]byte(`{"type":"joined"}`))
	q.pushDelta("c", "t", 11, 11, "new", 0, false)
	q.pushDelta("c", "t", 12, 12, "er", 0, false)
	frames, _, _, _ := q.take(nil, nil)
	var got []string
	for _, f := range frames {
		got = append(got, string(f))
	}
	if len(got) != 3 || !strings.Contains(got[0], `"seq":10`) || got[1] != `{"type":"joined"}` ||
		!strings.Contains(got[2], `"seq":12`) || !strings.Contains(got[2], `"from":11`) {
		t.Fatalf("queued frames:\n%s", strings.Join(got, "\n"))
	}
}

// A frame that comes after the close frame was sealed in is dropped, and
// the writer leaves the connection to the close handshake: ending it would
// close the socket before the close frame went out, and the client would
// see the connection drop without its close code.
func TestWriterLeavesASealedSocketToTheHandshake(t *testing.T) {
	client, server := net.Pipe()
	defer client.Close()
	defer server.Close()
	raw := &rawSocket{nc: server}
	raw.sealed.Store(true)
	var ended atomic.Bool
	q := newOutQueue(1 << 20)
	w := connWriter{
		s: &Server{cfg: Config{WriteTimeout: time.Minute}, m: newMetrics(prometheus.NewRegistry())}, raw: raw, q: q,
		ctx: context.Background(), cancel: func() { ended.Store(true) },
	}
	wb := getWriteBuffers()
	defer wb.put()
	wb.frames = append(wb.frames, []byte(`{"type":"pong"}`))
	if w.write(wb) {
		t.Fatal("a frame was written after the close frame")
	}
	if ended.Load() {
		t.Fatal("the writer ended the connection while its close frame was being written")
	}
	if q.push([]byte("{}")) {
		t.Fatal("the queue still takes frames")
	}
}

// newTestWriter returns a writer to nc whose connection's end sets ended.
func newTestWriter(nc net.Conn, writeTimeout time.Duration, ended *atomic.Bool) *connWriter {
	s := &Server{cfg: Config{WriteTimeout: writeTimeout}, m: newMetrics(prometheus.NewRegistry()), log: slog.New(slog.DiscardHandler)}
	return &connWriter{s: s, raw: &rawSocket{nc: nc}, q: newOutQueue(1 << 20), ctx: context.Background(), cancel: func() { ended.Store(true) }}
}

// A peer that reads a batch larger than it can take in --write-timeout
// (a long history on a slow link), but reads it steadily, is not taken for
// one that stopped reading: the write goes on as long as the socket takes
// something.
func TestWriterWaitsForAPeerThatReadsSlowly(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		client, server := net.Pipe()
		defer client.Close()
		defer server.Close()
		var ended atomic.Bool
		w := newTestWriter(server, time.Second, &ended)
		frame := []byte(`{"type":"joined","text":"` + strings.Repeat("x", 1<<20) + `"}`)
		want := len(frame) + maxHeader // its header has the 8-byte length
		read := make(chan int)
		go func() { // 32 KiB every 100 ms: the frame takes more than 3 s
			buf := make([]byte, 32<<10)
			n := 0
			for n < want {
				m, err := client.Read(buf)
				n += m
				if err != nil {
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
			read <- n
		}()
		wb := getWriteBuffers()
		defer wb.put()
		wb.frames = append(wb.frames, frame)
		if !w.write(wb) {
			t.Fatal("the write failed")
		}
		if n := <-read; n != want {
			t.Fatalf("the peer read %d bytes, want %d", n, want)
		}
		if ended.Load() {
			t.Fatal("the connection of a peer that reads steadily was ended as stalled")
		}
	})
}

// A peer that stops reading in the middle of a batch is ended once the
// socket has taken nothing for --write-timeout.
func TestWriterEndsAPeerThatStopsReading(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		client, server := net.Pipe()
		defer server.Close()
		var ended atomic.Bool
		w := newTestWriter(server, time.Second, &ended)
		frame := []byte(`{"type":"joined","text":"` + strings.Repeat("x", 1<<20) + `"}`)
		go func() { // reads 256 KiB, then nothing
			_, _ = io.ReadFull(client, make([]byte, 256<<10))
		}()
		done := make(chan bool)
		go func() {
			wb := getWriteBuffers()
			defer wb.put()
			wb.frames = append(wb.frames, frame)
			done <- w.write(wb)
		}()
		// The socket took the 256 KiB at once: the connection is ended
		// between one and two --write-timeout later (see stallTimer).
		time.Sleep(900 * time.Millisecond)
		synctest.Wait()
		if ended.Load() {
			t.Fatal("the connection was ended before --write-timeout without progress")
		}
		time.Sleep(1200 * time.Millisecond)
		synctest.Wait()
		if !ended.Load() {
			t.Fatal("the connection of a peer that stopped reading was not ended")
		}
		client.Close() // as ending the connection closes its socket
		if <-done {
			t.Fatal("the write to a closed socket succeeded")
		}
	})
}

// keptAlive returns a writer to nc whose writes run on writer goroutines
// counted in writers, with the keep-alive running (a ping every second,
// an idle timeout of 2 s) until cancel; idle is called when it closes the
// connection as idle.
func keptAlive(nc net.Conn, ended *atomic.Bool, idle func()) (w *connWriter, writers *sync.WaitGroup, cancel context.CancelFunc) {
	w = newTestWriter(nc, time.Second, ended)
	w.s.cfg.PingInterval, w.s.cfg.IdleTimeout = time.Second, 2*time.Second
	writers = new(sync.WaitGroup)
	w.q.spawn, w.q.writers = w.drain, writers
	ctx, cancel := context.WithCancel(context.Background())
	w.s.keepAlive(ctx, w.raw, w.q, func(websocket.StatusCode, string) { idle() })
	return w, writers, cancel
}

// A peer still reading, however slowly, a batch queued before the
// keep-alive's ping (a long joined frame) cannot answer the ping until it
// has read that: it is not closed as idle meanwhile.
func TestKeepAliveWaitsForAPeerReadingWhatCameBeforeItsPing(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		client, server := net.Pipe()
		defer client.Close()
		defer server.Close()
		var ended, idle atomic.Bool
		w, writers, cancel := keptAlive(server, &ended, func() { idle.Store(true) })
		defer cancel()
		frame := []byte(`{"type":"joined","text":"` + strings.Repeat("x", 2<<20) + `"}`)
		want := len(frame) + maxHeader + len(pingFrame)
		read := make(chan int)
		go func() { // 32 KiB every 100 ms: the frame takes more than 6 s
			buf := make([]byte, 32<<10)
			n := 0
			for n < want {
				m, err := client.Read(buf[:min(len(buf), want-n)])
				n += m
				if err != nil {
					break
				}
				time.Sleep(100 * time.Millisecond)
			}
			w.raw.pinger.pong() // the ping came last: it is answered
			read <- n
		}()
		if !w.q.pushAsked(frame) {
			t.Fatal("the queue refused the frame")
		}
		if n := <-read; n != want {
			t.Fatalf("the peer read %d bytes, want %d", n, want)
		}
		writers.Wait()
		if idle.Load() {
			t.Fatal("a peer reading what came before its ping was closed as idle")
		}
		if ended.Load() {
			t.Fatal("a peer reading steadily was ended as stalled")
		}
	})
}

// A peer that has been handed the ping, and reads on what came after it
// (a turn streaming) without ever answering, is closed as idle: only what
// was queued ahead of the ping, which the peer must read first, earns it
// more time.
func TestKeepAliveClosesAPeerThatReadsOnButNeverAnswers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		client, server := net.Pipe()
		defer client.Close()
		defer server.Close()
		var ended atomic.Bool
		idle := make(chan struct{})
		var once sync.Once
		w, writers, cancel := keptAlive(server, &ended, func() { once.Do(func() { close(idle) }) })
		defer cancel()
		go io.Copy(io.Discard, client) // reads everything, answers nothing
		frame := []byte(`{"type":"delta","text":"` + strings.Repeat("x", 100) + `"}`)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		giveUp := time.After(time.Minute)
		for {
			select {
			case <-idle:
				cancel()
				writers.Wait()
				return
			case <-giveUp:
				t.Fatal("a peer that never answers a ping was not closed as idle")
			case <-tick.C:
				w.q.push(frame)
			}
		}
	})
}
