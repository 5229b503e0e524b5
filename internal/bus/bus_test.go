package bus_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
	"github.com/tokenrelay/tokenrelay/internal/chat"
)

func TestToken(t *testing.T) {
	tests := []struct{ id, tok string }{
		{"abc", "abc"}, {"a.b", "a/b"}, {"a:b", "a=b"}, {"x.y:z-_", "x/y=z-_"},
	}
	for _, tt := range tests {
		if got := bus.Token(tt.id); got != tt.tok {
			t.Errorf("Token(%q) = %q, want %q", tt.id, got, tt.tok)
		}
		if got := bus.Untoken(tt.tok); got != tt.id {
			t.Errorf("Untoken(%q) = %q, want %q", tt.tok, got, tt.id)
		}
	}
}

func TestMarkCancelledOnce(t *testing.T) {
	b := bustest.Start(t)
	for _, id := range []string{"t1", "t.2", "t:3"} {
		first, err := b.MarkCancelled(t.Context(), id)
		if err != nil || !first {
			t.Fatalf("first MarkCancelled(%s) = %v, %v; want true", id, first, err)
		}
		again, err := b.MarkCancelled(t.Context(), id)
		if err != nil || again {
			t.Fatalf("second MarkCancelled(%s) = %v, %v; want false", id, again, err)
		}
		if ok, err := b.IsCancelled(t.Context(), id); !ok || err != nil {
			t.Fatalf("IsCancelled(%s) = %v, %v", id, ok, err)
		}
	}
	if ok, _ := b.IsCancelled(t.Context(), "other"); ok {
		t.Fatal("IsCancelled of an unmarked turn")
	}
}

func TestSnapshotChunksAndIndex(t *testing.T) {
	b := bustest.Start(t)
	w := b.NewSnapshotWriter("c.1", "t:1")
	var text []byte
	var ends []int64
	var seq int64
	// Grow past three text chunks and several index chunks, with deltas of
	// varying size, writing a snapshot now and then.
	for len(text) < 3*bus.ChunkSize+1000 || seq < 3*bus.IndexSize+7 {
		seq++
		piece := strings.Repeat(string(rune('a'+seq%26)), int(seq%97)+1)
		text = append(text, piece...)
		ends = append(ends, int64(len(text)))
		w.Record(len(text))
		if seq%50 == 0 {
			if err := w.Write(t.Context(), text, seq, uint64(seq*10), chat.StatusStreaming); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := w.Write(t.Context(), text, seq, uint64(seq*10), chat.StatusStreaming); err != nil {
		t.Fatal(err)
	}
	s, err := b.ReadSnapshot(t.Context(), "c.1", "t:1")
	if err != nil {
		t.Fatal(err)
	}
	if s.Text != string(text) || s.Seq != seq || s.StreamSeq != uint64(seq*10) || s.ConversationID != "c.1" {
		t.Fatalf("snapshot seq=%d sseq=%d len=%d conv=%s, want seq=%d len=%d", s.Seq, s.StreamSeq, len(s.Text), s.ConversationID, seq, len(text))
	}
	h, err := b.ReadHead(t.Context(), "c.1", "t:1")
	if err != nil {
		t.Fatal(err)
	}
	for _, have := range []int64{0, 1, 2, bus.IndexSize - 1, bus.IndexSize, bus.IndexSize + 1, 2*bus.IndexSize + 5, seq - 1, seq} {
		end, ok, err := b.EndOf(t.Context(), h, have)
		if err != nil || !ok {
			t.Fatalf("EndOf(%d) = %v, %v", have, ok, err)
		}
		want := int64(0)
		if have > 0 {
			want = ends[have-1]
		}
		if end != want {
			t.Fatalf("EndOf(%d) = %d, want %d", have, end, want)
		}
		rest, err := b.ReadText(t.Context(), h, end)
		if err != nil || rest != string(text[end:]) {
			t.Fatalf("ReadText(%d): %d bytes, %v; want %d bytes", end, len(rest), err, len(text)-int(end))
		}
	}
	if _, ok, _ := b.EndOf(t.Context(), h, seq+1); ok {
		t.Fatal("EndOf past the snapshot answered")
	}
	if _, err := b.ReadSnapshot(t.Context(), "c.1", "missing"); err != bus.ErrNoSnapshot {
		t.Fatalf("missing snapshot: %v", err)
	}
	// The turn id of a deleted conversation may be taken by another's
	// turn: neither reads the other's snapshot.
	if _, err := b.ReadHead(t.Context(), "c.2", "t:1"); err != bus.ErrNoSnapshot {
		t.Fatalf("snapshot of another conversation's turn of the same id: %v, want ErrNoSnapshot", err)
	}
}

func TestJobCarriesQueuedTurnOnFirstDelivery(t *testing.T) {
	turn := chat.Turn{ID: "t1", ConversationID: "c1", Owner: "u", ReplyTo: "m1", Model: "sim",
		Status: chat.StatusQueued, CreatedAt: time.UnixMilli(1_700_000_000_123).UTC()}
	got, ok := (&bus.JobMsg{Job: bus.JobOf(turn)}).QueuedTurn()
	if !ok || got != turn {
		t.Fatalf("first delivery: %+v, %v; want %+v", got, ok, turn)
	}
	if _, ok := (&bus.JobMsg{Job: bus.JobOf(turn), Redelivered: true}).QueuedTurn(); ok {
		t.Fatal("a redelivered job's turn may have started: it must be read")
	}
	if _, ok := (&bus.JobMsg{Job: bus.Job{TurnID: "t1", ConversationID: "c1"}}).QueuedTurn(); ok {
		t.Fatal("a job without its turn must be read")
	}
}

// A worker stopped as it starts (its context ended before its pull
// began) ends cleanly: ConsumeJobs returns nil once ctx is done, whichever
// step it was at.
func TestConsumeJobsStoppedBeforeItPulls(t *testing.T) {
	b := bustest.Start(t)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := b.ConsumeJobs(ctx, 16, func(*bus.JobMsg) {}); err != nil {
		t.Fatalf("ConsumeJobs of a done context: %v, want nil", err)
	}
}

// A worker whose job consumer is deleted under it would take no job again:
// ConsumeJobs says so instead of waiting on.
func TestConsumeJobsEndsWhenTheConsumerIsDeleted(t *testing.T) {
	b := bustest.Start(t)
	done := make(chan error, 1)
	go func() { done <- b.ConsumeJobs(t.Context(), 16, func(*bus.JobMsg) {}) }()
	js, err := jetstream.New(b.Conn())
	if err != nil {
		t.Fatal(err)
	}
	cons, err := js.Consumer(t.Context(), bus.JobsStream, bus.JobsConsumer)
	if err != nil {
		t.Fatal(err)
	}
	for { // until the pull request waits on the consumer
		info, err := cons.Info(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		if info.NumWaiting > 0 {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("ConsumeJobs returned before pulling: %v", err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	if err := js.DeleteConsumer(t.Context(), bus.JobsStream, bus.JobsConsumer); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), bus.JobsConsumer) {
			t.Fatalf("ConsumeJobs after its consumer was deleted: %v", err)
		}
		t.Log(err)
	case <-time.After(10 * time.Second):
		t.Fatal("ConsumeJobs still waits for jobs 10s after its consumer was deleted")
	}
}

// When the watch of the cancel bucket ends under a live context (here the
// bucket is deleted, so its consumer cannot be recreated), WatchCancels
// says so once, and the core signals still reach the callback.
func TestWatchCancelsReportsTheWatchsEnd(t *testing.T) {
	b := bustest.Start(t)
	cancels := make(chan string, 4)
	ended, err := b.WatchCancels(t.Context(), func(turn string) { cancels <- turn })
	if err != nil {
		t.Fatal(err)
	}
	js, err := jetstream.New(b.Conn())
	if err != nil {
		t.Fatal(err)
	}
	if err := js.DeleteKeyValue(t.Context(), bus.CancelBucket); err != nil {
		t.Fatal(err)
	}
	// nats.go checks the watch's heartbeats every 10 s and recreates its
	// consumer at the first check that saw none, 10 to 20 s after the
	// deletion; that fails.
	select {
	case err, ok := <-ended:
		if !ok || err == nil || !strings.Contains(err.Error(), bus.CancelBucket) {
			t.Fatalf("the watch's end reported as %v, %v", err, ok)
		}
		t.Log(err)
	case <-time.After(40 * time.Second):
		t.Fatal("no word of the watch's end 40s after its bucket was deleted")
	}
	b.SignalCancel("t1")
	wantCancel(t, cancels, "t1")
}

// wantCancel waits for the cancel of turn on cancels, for 5 s at most.
func wantCancel(t *testing.T, cancels <-chan string, turn string) {
	t.Helper()
	select {
	case got := <-cancels:
		if got != turn {
			t.Fatalf("cancel of %q, want %s", got, turn)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("the cancel signal of %s did not arrive", turn)
	}
}

// ProducerAlive hears the worker that serves the turn, also one that starts
// answering only after the first question (a producer reconnecting), and
// reports false when nobody answers for the turn.
func TestProducerAlive(t *testing.T) {
	b := bustest.Start(t)
	asked := make(chan string, 64)
	sub, err := b.ServeProducing(func(id string) bool { return id == "a.t:1" })
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if ok, err := b.ProducerAlive(t.Context(), "a.t:1", 2*time.Second); !ok || err != nil {
		t.Fatalf("ProducerAlive of a served turn: %v %v", ok, err)
	}
	if ok, err := b.ProducerAlive(t.Context(), "other", 300*time.Millisecond); ok || err != nil {
		t.Fatalf("ProducerAlive of a turn nobody produces: %v %v", ok, err)
	}
	// A producer that answers from its second question on.
	var late bus.Subscription
	late, err = b.ServeProducing(func(id string) bool {
		asked <- id
		return id == "late" && len(asked) > 1
	})
	if err != nil {
		t.Fatal(err)
	}
	defer late.Unsubscribe()
	if ok, err := b.ProducerAlive(t.Context(), "late", 2*time.Second); !ok || err != nil {
		t.Fatalf("ProducerAlive of a producer heard late: %v %v", ok, err)
	}
}

func TestUnavailable(t *testing.T) {
	for _, err := range []error{
		nats.ErrConnectionClosed,
		fmt.Errorf("join: %w", nats.ErrConnectionReconnecting),
		fmt.Errorf("mark cancelled: %w", jetstream.ErrNoStreamResponse),
		nats.ErrNoResponders,
		&jetstream.APIError{Code: 503, ErrorCode: 10008, Description: "JetStream system temporarily unavailable"},
	} {
		if !bus.Unavailable(err) {
			t.Errorf("Unavailable(%v) = false", err)
		}
	}
	for _, err := range []error{nil, errors.New("boom"), jetstream.ErrKeyExists, &jetstream.APIError{Code: 400}} {
		if bus.Unavailable(err) {
			t.Errorf("Unavailable(%v) = true", err)
		}
	}
}

// PingWorkers names a worker that can reach its model server, whichever
// answers first; when the only workers answering cannot, it says so with
// ErrProviderUnreachable; with none subscribed it fails at once.
func TestPingWorkersPrefersAWorkerThatReachesItsModel(t *testing.T) {
	b := bustest.Start(t)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if _, err := b.PingWorkers(ctx); err == nil || errors.Is(err, bus.ErrProviderUnreachable) {
		t.Fatalf("no worker: %v", err)
	}
	down, err := b.ServeWorkerPing("down", func() string { return "connection refused" })
	if err != nil {
		t.Fatal(err)
	}
	defer down.Unsubscribe()
	if _, err := b.PingWorkers(ctx); !errors.Is(err, bus.ErrProviderUnreachable) || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("only a worker whose model is down: %v", err)
	}
	up, err := b.ServeWorkerPing("up", func() string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	defer up.Unsubscribe()
	for range 5 {
		if id, err := b.PingWorkers(ctx); id != "up" || err != nil {
			t.Fatalf("with a worker whose model is up: %q %v", id, err)
		}
	}
}
