package worker_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/provider"
	"github.com/tokenrelay/tokenrelay/internal/provider/sim"
	"github.com/tokenrelay/tokenrelay/internal/store"
	"github.com/tokenrelay/tokenrelay/internal/store/sqlite"
	"github.com/tokenrelay/tokenrelay/internal/worker"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// nats-server keeps a few process-wide goroutines once started.
		goleak.IgnoreAnyFunction("github.com/nats-io/nats-server/v2/server.(*Server).startGoRoutine.func1"),
		goleak.IgnoreTopFunction("github.com/nats-io/nats-server/v2/server.(*ipQueue[...]).push"),
		goleak.IgnoreTopFunction("time.Sleep"),
	)
}

// countingProvider wraps a provider and counts its calls.
type countingProvider struct {
	provider.Provider
	calls atomic.Int64
}

func (p *countingProvider) Stream(ctx context.Context, req provider.Request, emit func(string) error) (provider.Result, error) {
	p.calls.Add(1)
	return p.Provider.Stream(ctx, req, emit)
}

type env struct {
	bus   *bus.Bus
	store store.Store
	prov  *countingProvider
	w     *worker.Worker
	stop  func()
}

func setup(t *testing.T, cfg worker.Config, run bool) *env {
	t.Helper()
	return setupWith(t, cfg, run, nil)
}

// setupWith is setup with the worker's store wrapped by wrap (when not
// nil), which may make some of its calls fail.
func setupWith(t *testing.T, cfg worker.Config, run bool, wrap func(store.Store) store.Store) *env {
	t.Helper()
	b := bustest.Start(t)
	st, err := sqlite.Open(t.Context(), t.TempDir()+"/t.db")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	p := &countingProvider{Provider: sim.New(sim.Config{Rate: 0, Tokens: 20})}
	ws := store.Store(st)
	if wrap != nil {
		ws = wrap(st)
	}
	e := &env{bus: b, store: st, prov: p, w: worker.New(cfg, b, ws, p), stop: func() {}}
	if run {
		e.start(t)
	}
	return e
}

func (e *env) start(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := e.w.Run(ctx); err != nil {
			t.Error(err)
		}
	}()
	var once sync.Once
	e.stop = func() { once.Do(func() { cancel(); <-done }) }
	t.Cleanup(e.stop)
	// Ready once it answers pings.
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, c := context.WithTimeout(t.Context(), 200*time.Millisecond)
		_, err := e.bus.PingWorkers(ctx)
		c()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("worker not up")
		}
	}
}

// send stores a turn and enqueues its job; it returns a channel with the
// turn's end event.
func (e *env) send(t *testing.T, conv, turn, text string, enqueue bool) <-chan bus.Event {
	t.Helper()
	ends := make(chan bus.Event, 4)
	sub, err := e.bus.SubscribeTurnEnd(t.Context(), turn, func(ev bus.Event) { ends <- ev })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sub.Unsubscribe() })
	e.bus.Conn().Flush()
	res, err := e.store.Send(t.Context(), store.SendRequest{ConversationID: conv, Owner: "u", MessageID: "m-" + turn, TurnID: turn, Text: text, Now: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	if enqueue {
		// As the gateway enqueues it: the job carries the turn.
		if err := e.bus.EnqueueJob(t.Context(), bus.JobOf(res.Turn)); err != nil {
			t.Fatal(err)
		}
	}
	return ends
}

func waitEnd(t *testing.T, ends <-chan bus.Event) bus.Event {
	t.Helper()
	return receive(t, ends, "no end event")
}

// receive returns the next value from ch, failing the test with failure
// when none comes within 20 s.
func receive[T any](t *testing.T, ch <-chan T, failure string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(20 * time.Second):
		t.Fatal(failure)
		var zero T
		return zero
	}
}

func TestProducesTurn(t *testing.T) {
	e := setup(t, worker.Config{}, true)
	end := waitEnd(t, e.send(t, "c", "t1", "hello", true))
	st, err := e.store.Turn(t.Context(), "t1")
	if err != nil {
		t.Fatal(err)
	}
	if end.Status != chat.StatusComplete || st.Status != chat.StatusComplete || end.Seq != 20 || st.Seq != 20 {
		t.Fatalf("end %+v, stored %+v", end, st)
	}
	// The stream holds exactly the stored text.
	var text strings.Builder
	var seq int64
	e.bus.ReadTurn(t.Context(), "c", "t1", 1, func(ev bus.Event) bool {
		if ev.Kind == bus.KindDelta {
			if ev.Seq != seq+1 || ev.Off != int64(text.Len()) {
				t.Fatalf("delta %d at offset %d after seq %d, %d bytes", ev.Seq, ev.Off, seq, text.Len())
			}
			seq = ev.Seq
			text.WriteString(ev.Text)
		}
		return true
	})
	if text.String() != st.Content {
		t.Fatalf("stream %q, stored %q", text.String(), st.Content)
	}
}

func TestCancelledBeforePickupNeverCallsProvider(t *testing.T) {
	e := setup(t, worker.Config{}, false)
	ends := e.send(t, "c", "t1", "hello", true)
	if _, err := e.bus.MarkCancelled(t.Context(), "t1"); err != nil {
		t.Fatal(err)
	}
	e.start(t)
	end := waitEnd(t, ends)
	if end.Status != chat.StatusCancelled || end.Seq != 0 {
		t.Fatalf("end %+v", end)
	}
	if n := e.prov.calls.Load(); n != 0 {
		t.Fatalf("provider called %d times", n)
	}
}

// TestJobWithoutTurnIsProduced: a job that names only its turn, as an older
// gateway enqueued it, is produced from the stored turn.
func TestJobWithoutTurnIsProduced(t *testing.T) {
	e := setup(t, worker.Config{}, true)
	ends := e.send(t, "c", "t1", "hello", false)
	if err := e.bus.EnqueueJob(t.Context(), bus.Job{TurnID: "t1", ConversationID: "c"}); err != nil {
		t.Fatal(err)
	}
	if end := waitEnd(t, ends); end.Status != chat.StatusComplete || end.Seq != 20 {
		t.Fatalf("end %+v", end)
	}
}

// TestTurnEndedWhileQueuedIsLeftAlone: the gateway ended a queued turn on a
// cancel (stored, tombstoned, its end published) before any worker took the
// job, which still describes the turn as queued. The worker acks the job
// without calling the provider or ending the turn a second time.
func TestTurnEndedWhileQueuedIsLeftAlone(t *testing.T) {
	e := setup(t, worker.Config{}, false)
	ends := e.send(t, "c", "t1", "hello", true)
	if _, won, err := e.store.FinishTurn(t.Context(), store.TurnResult{TurnID: "t1", Status: chat.StatusCancelled, Now: time.Now()}, chat.StatusQueued); !won || err != nil {
		t.Fatal(won, err)
	}
	if _, err := e.bus.MarkCancelled(t.Context(), "t1"); err != nil {
		t.Fatal(err)
	}
	acks := jobAcks(t, e.bus)
	e.start(t)
	waitAck(t, acks)
	select {
	case end := <-ends:
		t.Fatalf("the worker ended the turn again: %+v", end)
	default:
	}
	if n := e.prov.calls.Load(); n != 0 {
		t.Fatalf("provider called %d times", n)
	}
	if st, err := e.store.Turn(t.Context(), "t1"); err != nil || st.Status != chat.StatusCancelled {
		t.Fatalf("stored %+v, %v", st, err)
	}
}

// TestDeletedWhileQueued: the conversation was deleted after the send; the
// worker acks the job without calling the provider.
func TestDeletedWhileQueued(t *testing.T) {
	e := setup(t, worker.Config{}, false)
	e.send(t, "c", "t1", "hello", true)
	if err := e.store.DeleteConversation(t.Context(), "c", "u"); err != nil {
		t.Fatal(err)
	}
	acks := jobAcks(t, e.bus)
	e.start(t)
	if n := waitAck(t, acks); n != 1 {
		t.Fatalf("the job was acked on its delivery %d; want the first", n)
	}
	if n := e.prov.calls.Load(); n != 0 {
		t.Fatalf("provider called %d times", n)
	}
}

// jobAcks reports, for each job a worker acks from now on, how many
// times the job had been delivered, read from the ack's subject.
func jobAcks(t *testing.T, b *bus.Bus) <-chan uint64 {
	t.Helper()
	acks := make(chan uint64, 16)
	sub, err := b.Conn().Subscribe("$JS.ACK.>", func(m *nats.Msg) {
		if string(m.Data) != "+ACK" {
			return // a progress report
		}
		// $JS.ACK.<stream>.<consumer>.<delivered>.… or, with a domain
		// and account hash, $JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.…
		tok := strings.Split(m.Subject, ".")
		i := 2
		if len(tok) >= 11 {
			i = 4
		}
		var n uint64
		err := fmt.Errorf("%d tokens", len(tok))
		if len(tok) >= 9 {
			n, err = strconv.ParseUint(tok[i+2], 10, 64)
		}
		if err != nil {
			t.Errorf("ack subject %q not understood: %v", m.Subject, err)
			return
		}
		if tok[i] == bus.JobsStream {
			acks <- n
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sub.Unsubscribe() })
	if err := b.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	return acks
}

// waitAck waits for the next job ack and returns the job's delivery count.
func waitAck(t *testing.T, acks <-chan uint64) uint64 {
	t.Helper()
	return receive(t, acks, "the job was not acked")
}

// waitStreaming waits until the turn's snapshot is past seq.
func waitStreaming(t *testing.T, b *bus.Bus, turn string, seq int64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if s, err := b.ReadSnapshot(t.Context(), "c", turn); err == nil && s.Seq > seq {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("turn %s did not stream", turn)
		}
		time.Sleep(10 * time.Millisecond) // polling the snapshot
	}
}

func TestCancelStreamingTurn(t *testing.T) {
	e := setup(t, worker.Config{}, true)
	ends := e.send(t, "c", "t1", "[sim tokens=100000 rate=500] long", true)
	waitStreaming(t, e.bus, "t1", 5)
	if _, err := e.bus.MarkCancelled(t.Context(), "t1"); err != nil {
		t.Fatal(err)
	}
	end := waitEnd(t, ends)
	st, _ := e.store.Turn(t.Context(), "t1")
	if end.Status != chat.StatusCancelled || st.Status != chat.StatusCancelled || st.Seq != end.Seq || st.Seq >= 100000 {
		t.Fatalf("end %+v, stored %s at %d", end, st.Status, st.Seq)
	}
}

func TestShutdownInterruptsRunningTurns(t *testing.T) {
	e := setup(t, worker.Config{}, true)
	ends := e.send(t, "c", "t1", "[sim tokens=100000 rate=200] long", true)
	waitStreaming(t, e.bus, "t1", 2)
	e.stop()
	end := waitEnd(t, ends)
	st, _ := e.store.Turn(t.Context(), "t1")
	if end.Status != chat.StatusInterrupted || st.Status != chat.StatusInterrupted || st.Content == "" {
		t.Fatalf("end %+v, stored %s %q", end, st.Status, st.Content)
	}
}

// runLongTurn runs the worker, whose Run's result done gives, and a long
// turn t1 until it streams; it returns the turn's end events and a
// JetStream handle to break the worker's bus with.
func (e *env) runLongTurn(t *testing.T) (done <-chan error, ends <-chan bus.Event, js jetstream.JetStream) {
	t.Helper()
	ran := make(chan error, 1)
	go func() { ran <- e.w.Run(t.Context()) }()
	ends = e.send(t, "c", "t1", "[sim tokens=100000 rate=200] long", true)
	waitStreaming(t, e.bus, "t1", 2)
	js, err := jetstream.New(e.bus.Conn())
	if err != nil {
		t.Fatal(err)
	}
	return ran, ends, js
}

// A worker whose watch of the cancel bucket ends (here the bucket is
// deleted) could miss a cancel: it stops as on shutdown, its turn ended
// interrupted with the text saved, and Run says why.
func TestWorkerStopsWhenItCannotWatchCancels(t *testing.T) {
	e := setup(t, worker.Config{}, false)
	done, ends, js := e.runLongTurn(t)
	var err error
	if err := js.DeleteKeyValue(t.Context(), bus.CancelBucket); err != nil {
		t.Fatal(err)
	}
	// nats.go checks the watch's heartbeats every 10 s and recreates its
	// consumer at the first check that saw none, 10 to 20 s after the
	// deletion; that fails.
	select {
	case err = <-done:
	case <-time.After(40 * time.Second):
		t.Fatal("the worker still runs 40 s after the cancel bucket was deleted")
	}
	if err == nil || !strings.Contains(err.Error(), bus.CancelBucket) {
		t.Fatalf("Run returned %v", err)
	}
	end := waitEnd(t, ends)
	st, _ := e.store.Turn(t.Context(), "t1")
	if end.Status != chat.StatusInterrupted || st.Status != chat.StatusInterrupted || st.Content == "" {
		t.Fatalf("end %+v, stored %s %q", end, st.Status, st.Content)
	}
}

// A worker whose job consumer is deleted cannot take jobs: Run returns,
// saying why, also while its sweep of queued turns runs.
func TestWorkerStopsWhenItsConsumerIsDeleted(t *testing.T) {
	e := setup(t, worker.Config{QueuedTimeout: 30 * time.Second}, false)
	done, ends, js := e.runLongTurn(t)
	var err error
	if err := js.DeleteConsumer(t.Context(), bus.JobsStream, bus.JobsConsumer); err != nil {
		t.Fatal(err)
	}
	select {
	case err = <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("the worker still runs 20 s after its consumer was deleted")
	}
	if err == nil || !strings.Contains(err.Error(), "consumer deleted") {
		t.Fatalf("Run returned %v", err)
	}
	if end := waitEnd(t, ends); end.Status != chat.StatusInterrupted {
		t.Fatalf("end %+v, want interrupted", end)
	}
}

// TestLongTurnKeepsItsJob runs a turn for more than twice the bus's ack
// wait (2 s): the worker keeps its job in progress, so the job is never
// redelivered and the turn is produced once.
func TestLongTurnKeepsItsJob(t *testing.T) {
	e := setup(t, worker.Config{}, true)
	wait := e.bus.AckWait()
	tokens := int(wait * 5 / 2 / (100 * time.Millisecond)) // 2.5 ack waits at ten tokens a second
	end := waitEnd(t, e.send(t, "c", "t1", fmt.Sprintf("[sim tokens=%d rate=10]", tokens), true))
	if end.Status != chat.StatusComplete || end.Seq != int64(tokens) {
		t.Fatalf("end %+v, want complete after %d deltas", end, tokens)
	}
	js, err := jetstream.New(e.bus.Conn())
	if err != nil {
		t.Fatal(err)
	}
	cons, err := js.Consumer(t.Context(), bus.JobsStream, bus.JobsConsumer)
	if err != nil {
		t.Fatal(err)
	}
	info, err := cons.Info(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if info.NumRedelivered != 0 || e.prov.calls.Load() != 1 {
		t.Fatalf("%d jobs redelivered, provider called %d times; want 0 and 1", info.NumRedelivered, e.prov.calls.Load())
	}
}

// TestRedeliveredStreamingTurnIsInterrupted plays a worker that died: the
// turn is streaming with a snapshot and deltas after it; the next worker
// ends it interrupted with exactly the published text.
func TestRedeliveredStreamingTurnIsInterrupted(t *testing.T) {
	e := setup(t, worker.Config{}, false)
	ends := e.send(t, "c", "t1", "x", false)
	if ok, err := e.store.StartTurn(t.Context(), "t1", time.Now()); !ok || err != nil {
		t.Fatal(ok, err)
	}
	snap := e.bus.NewSnapshotWriter("c", "t1")
	var text []byte
	for i := int64(1); i <= 10; i++ {
		piece := strings.Repeat(string(rune('a'+i)), int(i))
		sseq, err := e.bus.PublishEvent(t.Context(), &bus.Event{Kind: bus.KindDelta, ConversationID: "c", TurnID: "t1", Seq: i, Off: int64(len(text)), Text: piece})
		if err != nil {
			t.Fatal(err)
		}
		text = append(text, piece...)
		if i == 6 {
			snap.Write(t.Context(), text, i, sseq, chat.StatusStreaming)
		}
	}
	e.bus.EnqueueJob(t.Context(), bus.Job{TurnID: "t1", ConversationID: "c"})
	e.start(t)
	end := waitEnd(t, ends)
	st, _ := e.store.Turn(t.Context(), "t1")
	if end.Status != chat.StatusInterrupted || st.Content != string(text) || st.Seq != 10 || end.Seq != 10 {
		t.Fatalf("end %+v, stored %q seq %d; want %q", end, st.Content, st.Seq, text)
	}
	if e.prov.calls.Load() != 0 {
		t.Fatal("the provider was called for an interrupted turn")
	}
}

// TestRedeliveredEndedTurnGetsItsEnd plays a worker that stored a turn's
// end and died before publishing it: the job comes back, and the worker
// that takes it publishes the stored end, which the connections following
// the turn wait for; an end already published is not published again.
func TestRedeliveredEndedTurnGetsItsEnd(t *testing.T) {
	e := setup(t, worker.Config{}, false)
	usage := &chat.Usage{PromptTokens: 1, CompletionTokens: 3}
	ended := func(turn string) <-chan bus.Event {
		ends := e.send(t, "c-"+turn, turn, "x", false)
		if ok, err := e.store.StartTurn(t.Context(), turn, time.Now()); !ok || err != nil {
			t.Fatal(ok, err)
		}
		for i := int64(1); i <= 3; i++ {
			if _, err := e.bus.PublishEvent(t.Context(), &bus.Event{Kind: bus.KindDelta, ConversationID: "c-" + turn, TurnID: turn, Seq: i, Off: i - 1, Text: "a"}); err != nil {
				t.Fatal(err)
			}
		}
		if _, won, err := e.store.FinishTurn(t.Context(), store.TurnResult{TurnID: turn, Status: chat.StatusComplete, Content: "aaa", Seq: 3, Usage: usage, Now: time.Now()}); !won || err != nil {
			t.Fatal(won, err)
		}
		return ends
	}
	lost := ended("lost")
	published := ended("published")
	if _, err := e.bus.PublishEnd(t.Context(), &bus.Event{Kind: bus.KindEnd, ConversationID: "c-published", TurnID: "published", Seq: 3, Status: chat.StatusComplete, Usage: usage}, nil); err != nil {
		t.Fatal(err)
	}
	waitEnd(t, published)
	acks := jobAcks(t, e.bus)
	for _, turn := range []string{"lost", "published"} {
		if err := e.bus.EnqueueJob(t.Context(), bus.Job{TurnID: turn, ConversationID: "c-" + turn}); err != nil {
			t.Fatal(err)
		}
	}
	e.start(t)
	end := waitEnd(t, lost)
	if end.Status != chat.StatusComplete || end.Seq != 3 || end.Usage == nil || *end.Usage != *usage {
		t.Fatalf("end %+v, want the stored one", end)
	}
	waitAck(t, acks)
	waitAck(t, acks)
	select {
	case end := <-published:
		t.Fatalf("a published end was published again: %+v", end)
	default:
	}
	if e.prov.calls.Load() != 0 {
		t.Fatal("the provider was called for an ended turn")
	}
}

// TestRedeliveredJobOfALiveProducerIsLeftToIt plays a job redelivered
// while its producer runs (the renewals were lost with a NATS node): the
// producer answers for its turn, so the worker leaves the job alone, and
// acks it once the producer has ended the turn.
func TestRedeliveredJobOfALiveProducerIsLeftToIt(t *testing.T) {
	e := setup(t, worker.Config{}, false)
	ends := e.send(t, "c", "t1", "x", false)
	if ok, err := e.store.StartTurn(t.Context(), "t1", time.Now()); !ok || err != nil {
		t.Fatal(ok, err)
	}
	asked, producing := producerOfT1(t, e)
	acks := jobAcks(t, e.bus)
	e.bus.EnqueueJob(t.Context(), bus.Job{TurnID: "t1", ConversationID: "c"})
	e.start(t)
	receive(t, asked, "the worker did not ask for the turn's producer")
	// Asked again at the redelivery, after an ack wait.
	receive(t, asked, "the job was not redelivered")
	select {
	case ev := <-ends:
		t.Fatalf("the turn was ended under its producer: %+v", ev)
	default:
	}
	// The producer ends the turn; the job's next delivery finds it ended.
	producerEnds(t, e, producing, acks)
	st, _ := e.store.Turn(t.Context(), "t1")
	if st.Status != chat.StatusComplete || st.Content != "done" || e.prov.calls.Load() != 0 {
		t.Fatalf("stored %s %q, provider called %d times", st.Status, st.Content, e.prov.calls.Load())
	}
	if cancelled, _ := e.bus.IsCancelled(t.Context(), "t1"); cancelled {
		t.Fatal("the live producer was told to stop")
	}
}

// producerEnds plays the producer of turn t1 ending it (complete, "done")
// and stopping, and waits for its job to be acked at a redelivery.
// producerOfT1 answers for a producer of turn t1 elsewhere, alive until
// producing is set false; asked receives every question.
func producerOfT1(t *testing.T, e *env) (asked chan struct{}, producing *atomic.Bool) {
	t.Helper()
	asked = make(chan struct{}, 16)
	producing = new(atomic.Bool)
	producing.Store(true)
	sub, err := e.bus.ServeProducing(func(id string) bool {
		asked <- struct{}{}
		return id == "t1" && producing.Load()
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sub.Unsubscribe() })
	return asked, producing
}

func producerEnds(t *testing.T, e *env, producing *atomic.Bool, acks <-chan uint64) {
	t.Helper()
	producing.Store(false)
	if _, won, err := e.store.FinishTurn(t.Context(), store.TurnResult{TurnID: "t1", Status: chat.StatusComplete, Content: "done", Seq: 1, Now: time.Now()}); !won || err != nil {
		t.Fatal(won, err)
	}
	if n := waitAck(t, acks); n < 2 {
		t.Fatalf("job acked at delivery %d, want a redelivery", n)
	}
}

// TestLostProducerIsStopped: when no producer answers, the turn ends
// interrupted, and a tombstone stops the producer should it be alive after
// all (a frozen process); a turn whose user had asked to stop it ends
// cancelled.
func TestLostProducerIsStopped(t *testing.T) {
	e := setup(t, worker.Config{}, false)
	interrupted := e.send(t, "c1", "t1", "x", false)
	cancelled := e.send(t, "c2", "t2", "x", false)
	for _, id := range []string{"t1", "t2"} {
		if ok, err := e.store.StartTurn(t.Context(), id, time.Now()); !ok || err != nil {
			t.Fatal(ok, err)
		}
	}
	if _, err := e.bus.MarkCancelled(t.Context(), "t2"); err != nil {
		t.Fatal(err)
	}
	e.bus.EnqueueJob(t.Context(), bus.Job{TurnID: "t1", ConversationID: "c1"})
	e.bus.EnqueueJob(t.Context(), bus.Job{TurnID: "t2", ConversationID: "c2"})
	e.start(t)
	if end := waitEnd(t, interrupted); end.Status != chat.StatusInterrupted {
		t.Fatalf("t1 ended %+v, want interrupted", end)
	}
	if end := waitEnd(t, cancelled); end.Status != chat.StatusCancelled {
		t.Fatalf("t2 ended %+v, want cancelled", end)
	}
	// The tombstone follows the end.
	for deadline := time.Now().Add(10 * time.Second); ; {
		ok, err := e.bus.IsCancelled(t.Context(), "t1")
		if ok && err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("t1's producer was not told to stop: %v %v", ok, err)
		}
		time.Sleep(10 * time.Millisecond) // polling the bucket
	}
}

// TestQueuedTurnWithoutAJobIsProduced plays a gateway that died between
// storing a turn and enqueuing its job: a worker enqueues it again once the
// turn has been queued for QueuedTimeout.
func TestQueuedTurnWithoutAJobIsProduced(t *testing.T) {
	e := setup(t, worker.Config{QueuedTimeout: 300 * time.Millisecond}, false)
	ends := make(chan bus.Event, 4)
	sub, err := e.bus.SubscribeTurnEnd(t.Context(), "t1", func(ev bus.Event) { ends <- ev })
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	e.bus.Conn().Flush()
	old := time.Now().Add(-time.Minute)
	if _, err := e.store.Send(t.Context(), store.SendRequest{ConversationID: "c", Owner: "u", MessageID: "m1", TurnID: "t1", Text: "hello", Now: old}); err != nil {
		t.Fatal(err)
	}
	e.start(t)
	if end := waitEnd(t, ends); end.Status != chat.StatusComplete || end.Seq != 20 {
		t.Fatalf("end %+v", end)
	}
}

func TestProviderErrorEndsTurnWithTextSaved(t *testing.T) {
	e := setup(t, worker.Config{}, true)
	end := waitEnd(t, e.send(t, "c", "t1", "[sim tokens=10 rate=0 error_after=4]", true))
	st, _ := e.store.Turn(t.Context(), "t1")
	if end.Status != chat.StatusError || end.Error == "" || st.Seq != 4 || end.Seq != 4 || st.Content == "" {
		t.Fatalf("end %+v, stored %+v", end, st)
	}
}

func TestBatchWindowMergesTokens(t *testing.T) {
	e := setup(t, worker.Config{BatchWindow: 50 * time.Millisecond}, true)
	end := waitEnd(t, e.send(t, "c", "t1", "[sim tokens=200 rate=0]", true))
	st, _ := e.store.Turn(t.Context(), "t1")
	if end.Status != chat.StatusComplete || end.Seq >= 200 || end.Seq < 1 || len(strings.Fields(st.Content)) != 200 {
		t.Fatalf("batched turn: end %+v, %d words", end, len(strings.Fields(st.Content)))
	}
}

// TestTokenBudget: a turn within the budget completes and is charged the
// provider's count; a turn that reaches the budget while it streams stops
// there with status error and its text so far; the next one ends at once.
func TestTokenBudget(t *testing.T) {
	budget := worker.NewHourlyBudget(40, nil)
	e := setup(t, worker.Config{TokenBudget: budget}, true)
	first := waitEnd(t, e.send(t, "c1", "t1", "[sim tokens=10 rate=0] a", true))
	if first.Status != chat.StatusComplete || first.Usage == nil {
		t.Fatalf("first turn %+v", first)
	}
	left := 40 - first.Usage.PromptTokens - first.Usage.CompletionTokens
	second := waitEnd(t, e.send(t, "c2", "t2", "[sim tokens=100 rate=0] b", true))
	if second.Status != chat.StatusError || !strings.Contains(second.Error, "budget") || second.Seq != int64(left) {
		t.Fatalf("second turn %+v, want an error naming the budget after %d deltas", second, left)
	}
	st, err := e.store.Turn(t.Context(), "t2")
	if err != nil || st.Status != chat.StatusError || len(strings.Fields(st.Content)) != left {
		t.Fatalf("stored second turn %+v (%v): want its %d words kept", st, err, left)
	}
	third := waitEnd(t, e.send(t, "c3", "t3", "[sim tokens=10 rate=0] c", true))
	if third.Status != chat.StatusError || third.Seq != 0 || !strings.Contains(third.Error, "budget") {
		t.Fatalf("third turn %+v, want an error at once", third)
	}
	if ok, _ := budget.Allow("alice"); !ok {
		t.Fatal("another user refused")
	}
}

// lockedBuffer is a bytes.Buffer safe for a logger and a test to share.
type lockedBuffer struct {
	mu      sync.Mutex
	b       strings.Builder
	changed chan struct{} // closed by the next Write; guarded by mu
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.changed != nil {
		close(l.changed)
		l.changed = nil
	}
	return l.b.Write(p)
}

// waitFor waits until the log holds s, failing t after 20 s.
func (l *lockedBuffer) waitFor(t *testing.T, s string) {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		l.mu.Lock()
		if strings.Contains(l.b.String(), s) {
			l.mu.Unlock()
			return
		}
		if l.changed == nil {
			l.changed = make(chan struct{})
		}
		changed := l.changed
		l.mu.Unlock()
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("the log never said %q:\n%s", s, l.String())
		}
	}
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (l *lockedBuffer) count(s string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Count(l.b.String(), s)
}

// counter reads a counter without labels from reg.
func counter(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	return 0
}

// TestFailingSnapshotsAreLoggedOnce: while the snapshot bucket refuses
// writes (as when its stream has no leader), a streaming turn counts every
// failed snapshot but warns once, says when snapshots succeed again, and
// ends with all its text.
func TestFailingSnapshotsAreLoggedOnce(t *testing.T) {
	logs := &lockedBuffer{}
	reg := prometheus.NewRegistry()
	e := setup(t, worker.Config{
		Logger:        slog.New(slog.NewTextHandler(logs, nil)),
		Registry:      reg,
		SnapshotBytes: 1, // a snapshot after every delta
	}, true)
	js, err := jetstream.New(e.bus.Conn())
	if err != nil {
		t.Fatal(err)
	}
	kv, err := js.Stream(t.Context(), "KV_"+bus.TurnsBucket)
	if err != nil {
		t.Fatal(err)
	}
	cfg := kv.CachedInfo().Config
	refusing := cfg
	refusing.MaxMsgSize = 1
	if _, err := js.UpdateStream(t.Context(), refusing); err != nil {
		t.Fatal(err)
	}
	ends := e.send(t, "c", "t1", "[sim tokens=400 rate=200] hello", true)
	const failures = "tokenrelay_snapshot_write_failures_total"
	deadline := time.After(20 * time.Second)
	for counter(t, reg, failures) < 3 {
		select {
		case ev := <-ends:
			t.Fatalf("turn ended (%+v) before three snapshots failed", ev)
		case <-deadline:
			t.Fatalf("%s = %v after 20 s, want 3", failures, counter(t, reg, failures))
		case <-time.After(10 * time.Millisecond):
		}
	}
	if _, err := js.UpdateStream(t.Context(), cfg); err != nil {
		t.Fatal(err)
	}
	end := waitEnd(t, ends)
	st, err := e.store.Turn(t.Context(), "t1")
	if err != nil {
		t.Fatal(err)
	}
	if end.Status != chat.StatusComplete || st.Seq != 400 {
		t.Fatalf("end %+v, stored seq %d: want complete after 400 deltas", end, st.Seq)
	}
	if w, again := logs.count("write snapshot; retrying"), logs.count("snapshot written again"); w != 1 || again != 1 {
		t.Fatalf("%v failed snapshots logged %d warnings and %d recoveries, want 1 and 1:\n%s", counter(t, reg, failures), w, again, logs.b.String())
	}
}

// TestProviderFailureIsLogged: a turn that fails at the model provider ends
// with the provider's message for the user, and the server's log says so,
// with the cause.
func TestProviderFailureIsLogged(t *testing.T) {
	logs := &lockedBuffer{}
	e := setup(t, worker.Config{Logger: slog.New(slog.NewTextHandler(logs, nil))}, true)
	ends := e.send(t, "c", "t1", "[sim tokens=10 rate=1000 error_after=3] hello", true)
	end := waitEnd(t, ends)
	if end.Status != chat.StatusError || end.Error != "the simulated model failed after 3 tokens" {
		t.Fatalf("end %+v, want error with the provider's message", end)
	}
	if n := logs.count(`msg="turn failed at the model provider"`); n != 1 {
		t.Fatalf("logged the failure %d times, want once:\n%s", n, logs.b.String())
	}
}

// failingStore fails the first finishes FinishTurn calls and the first
// reads Messages calls as a database restarting does.
type failingStore struct {
	store.Store
	finishes, reads atomic.Int64
}

var errRestarting = fmt.Errorf("%w: the database system is starting up", chat.ErrUnavailable)

func (s *failingStore) FinishTurn(ctx context.Context, r store.TurnResult, from ...chat.TurnStatus) (chat.TurnStatus, bool, error) {
	if s.finishes.Add(-1) >= 0 {
		return "", false, errRestarting
	}
	return s.Store.FinishTurn(ctx, r, from...)
}

func (s *failingStore) Messages(ctx context.Context, conv string, limit int, before string) ([]chat.Message, error) {
	if s.reads.Add(-1) >= 0 {
		return nil, errRestarting
	}
	return s.Store.Messages(ctx, conv, limit, before)
}

// A turn whose end the store refuses for a while is ended once the store
// takes it, with its whole text, instead of staying streaming for good.
func TestEndStoredOnceTheStoreIsBack(t *testing.T) {
	fs := &failingStore{}
	fs.finishes.Store(3)
	logs := &lockedBuffer{}
	e := setupWith(t, worker.Config{Logger: slog.New(slog.NewTextHandler(logs, nil))}, true,
		func(st store.Store) store.Store { fs.Store = st; return fs })
	end := waitEnd(t, e.send(t, "c", "t1", "hello", true))
	st, err := e.store.Turn(t.Context(), "t1")
	if err != nil {
		t.Fatal(err)
	}
	if end.Status != chat.StatusComplete || st.Status != chat.StatusComplete || st.Seq != 20 || end.Seq != 20 {
		t.Fatalf("end %+v, stored %+v: want complete after 20 deltas", end, st)
	}
	// A store that flaps is logged once when it first fails and once when
	// the end is stored, not once a try.
	if n := logs.count("store the end of a turn; trying again"); n != 1 {
		t.Fatalf("the first failure logged %d times, want once:\n%s", n, logs.String())
	}
	if n := logs.count(`msg="store the end of a turn: done after retrying" worker_id=`); n != 1 || logs.count("turn_id=t1 status=complete tries=4 ") != 1 {
		t.Fatalf("the outcome logged %d times, want once, with the tries:\n%s", n, logs.String())
	}
}

// hangingStore's first FinishTurn takes the statement and never answers,
// as a hung server or a network that drops packets without a reset does:
// it returns only when its context is done.
type hangingStore struct {
	store.Store
	hung    atomic.Bool
	release chan struct{} // closed at the test's end
}

func (s *hangingStore) FinishTurn(ctx context.Context, r store.TurnResult, from ...chat.TurnStatus) (chat.TurnStatus, bool, error) {
	if s.hung.CompareAndSwap(false, true) {
		select {
		case <-ctx.Done():
		case <-s.release:
		}
		return "", false, fmt.Errorf("%w: %w", chat.ErrUnavailable, context.DeadlineExceeded)
	}
	return s.Store.FinishTurn(ctx, r, from...)
}

// A try at storing a turn's end that the store never answers is given up
// after a while and made again, as one the store refuses is: the turn is
// not left streaming for as long as the connection hangs.
func TestEndStoredAfterAHungTry(t *testing.T) {
	hs := &hangingStore{release: make(chan struct{})}
	logs := &lockedBuffer{}
	e := setupWith(t, worker.Config{StoreTimeout: 200 * time.Millisecond, Logger: slog.New(slog.NewTextHandler(logs, nil))}, true,
		func(st store.Store) store.Store { hs.Store = st; return hs })
	t.Cleanup(func() { close(hs.release) }) // before the worker is stopped
	end := waitEnd(t, e.send(t, "c", "t1", "hello", true))
	st, err := e.store.Turn(t.Context(), "t1")
	if err != nil {
		t.Fatal(err)
	}
	if end.Status != chat.StatusComplete || st.Status != chat.StatusComplete || st.Seq != 20 {
		t.Fatalf("end %+v, stored %+v: want complete after 20 deltas", end, st)
	}
	if n := logs.count("store the end of a turn; trying again"); n != 1 {
		t.Fatalf("the hung try logged %d times, want once:\n%s", n, logs.String())
	}
}

// refusingEnds is a store whose FinishTurn, once it has stored a turn's
// end, makes the events stream refuse every message, as a stream at its
// limits does: the end goes live, and the stream does not store it.
//
// When beaten, another producer stores its end of the turn (interrupted,
// with the same text) just before the worker's first FinishTurn, and the
// stream refuses from then on: that producer died before publishing it,
// and the worker's end loses.
type refusingEnds struct {
	store.Store
	refuse func()
	once   sync.Once
	beaten bool
}

func (s *refusingEnds) FinishTurn(ctx context.Context, r store.TurnResult, from ...chat.TurnStatus) (chat.TurnStatus, bool, error) {
	if s.beaten {
		s.once.Do(func() {
			other := store.TurnResult{TurnID: r.TurnID, Status: chat.StatusInterrupted, Content: r.Content, Seq: r.Seq, Now: r.Now}
			if _, _, err := s.Store.FinishTurn(ctx, other); err != nil {
				panic(err)
			}
			s.refuse()
		})
	}
	final, won, err := s.Store.FinishTurn(ctx, r, from...)
	if err == nil {
		s.once.Do(s.refuse)
	}
	return final, won, err
}

// refusingEndsEnv runs a worker whose first stored end the events stream
// refuses (see refusingEnds for beaten); the returned function makes the
// stream take messages again.
func refusingEndsEnv(t *testing.T, cfg worker.Config, beaten bool) (e *env, takeAgain func()) {
	t.Helper()
	var js jetstream.JetStream
	var events jetstream.StreamConfig
	fs := &refusingEnds{beaten: beaten, refuse: func() {
		refusing := events
		refusing.MaxMsgSize = 1
		if _, err := js.UpdateStream(context.Background(), refusing); err != nil {
			t.Error(err)
		}
	}}
	e = setupWith(t, cfg, false, func(st store.Store) store.Store { fs.Store = st; return fs })
	var err error
	if js, err = jetstream.New(e.bus.Conn()); err != nil {
		t.Fatal(err)
	}
	s, err := js.Stream(t.Context(), bus.EventsStream)
	if err != nil {
		t.Fatal(err)
	}
	events = s.CachedInfo().Config
	return e, func() {
		if _, err := js.UpdateStream(t.Context(), events); err != nil {
			t.Fatal(err)
		}
	}
}

// streamedEnd reads the end the events stream holds of turn t1 of
// conversation c, or nil.
func streamedEnd(t *testing.T, b *bus.Bus) *bus.Event {
	t.Helper()
	var end *bus.Event
	if err := b.ReadTurn(t.Context(), "c", "t1", 1, func(ev bus.Event) bool {
		if ev.Kind == bus.KindEnd {
			end = &ev
		}
		return end == nil
	}); err != nil {
		t.Fatal(err)
	}
	return end
}

// A turn whose end the events stream refuses after the store took it keeps
// its job while the end is published again: once the stream takes it, a
// reader of the stream (a resume, another gateway) finds the end, and only
// then is the job acked.
func TestEndPublishedOnceTheStreamTakesIt(t *testing.T) {
	logs := &lockedBuffer{}
	e, takeAgain := refusingEndsEnv(t, worker.Config{Logger: slog.New(slog.NewTextHandler(logs, nil))}, false)
	acks := jobAcks(t, e.bus)
	e.start(t)
	ends := e.send(t, "c", "t1", "hello", true)
	if end := waitEnd(t, ends); end.Status != chat.StatusComplete {
		t.Fatalf("live end %+v", end)
	}
	logs.waitFor(t, "publish event: ")
	takeAgain()
	if n := waitAck(t, acks); n != 1 {
		t.Fatalf("acked at delivery %d, want the first", n)
	}
	if end := streamedEnd(t, e.bus); end == nil || end.Status != chat.StatusComplete || end.Seq != 20 {
		t.Fatalf("the stream holds end %+v, want complete at seq 20:\n%s", end, logs.String())
	}
	if n := logs.count("publish the end of a turn; trying again"); n != 1 {
		t.Fatalf("the first failure logged %d times, want once:\n%s", n, logs.String())
	}
}

// When the events stream refuses a stored end for longer than the worker
// tries, the job is left to come back rather than acked: its next delivery
// publishes the stored end once the stream takes it. So too for a producer
// whose end lost to another's (beaten): it publishes the winning end, which
// the stream may lack (its producer stored it and died).
func TestEndLeftToTheJobsNextDelivery(t *testing.T) {
	defer worker.SetRetryFor(200 * time.Millisecond)()
	for _, tc := range []struct {
		name   string
		beaten bool
		want   chat.TurnStatus
	}{
		{"its own end", false, chat.StatusComplete},
		{"the winner's end", true, chat.StatusInterrupted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			logs := &lockedBuffer{}
			e, takeAgain := refusingEndsEnv(t, worker.Config{Logger: slog.New(slog.NewTextHandler(logs, nil))}, tc.beaten)
			acks := jobAcks(t, e.bus)
			e.start(t)
			e.send(t, "c", "t1", "hello", true)
			logs.waitFor(t, "the turn's end could not be published")
			takeAgain()
			if n := waitAck(t, acks); n < 2 {
				t.Fatalf("acked at delivery %d, want a later one", n)
			}
			if end := streamedEnd(t, e.bus); end == nil || end.Status != tc.want || end.Seq != 20 {
				t.Fatalf("the stream holds end %+v, want %s at seq 20:\n%s", end, tc.want, logs.String())
			}
		})
	}
}

// cancellingStore cancels the context of a turn's end just before storing
// it, as a signal that stops serve while it ends its previous run's turns.
type cancellingStore struct {
	store.Store
	cancel context.CancelFunc
}

func (s *cancellingStore) FinishTurn(ctx context.Context, r store.TurnResult, from ...chat.TurnStatus) (chat.TurnStatus, bool, error) {
	s.cancel()
	return s.Store.FinishTurn(ctx, r, from...)
}

// Ending the turns of a previous run (RecoverAll, as serve starts) stops
// once its context is done: every try of the end on that context fails at
// once, and trying again for 30 s kept a stopping serve waiting.
func TestRecoverAllStopsWithItsContext(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	e := setupWith(t, worker.Config{}, false, func(st store.Store) store.Store {
		return &cancellingStore{Store: st, cancel: cancel}
	})
	e.send(t, "c", "t1", "hello", false)
	done := make(chan error, 1)
	go func() {
		_, err := e.w.RecoverAll(ctx)
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("RecoverAll: %v, want the context's end", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("RecoverAll still tries to end a turn on a context that is done")
	}
}

// A turn whose conversation cannot be read for the model ends at once with
// status error and says why; the model is not asked.
func TestUnreadableConversationEndsTheTurn(t *testing.T) {
	fs := &failingStore{}
	fs.reads.Store(1)
	e := setupWith(t, worker.Config{}, true, func(st store.Store) store.Store { fs.Store = st; return fs })
	end := waitEnd(t, e.send(t, "c", "t1", "hello", true))
	if end.Status != chat.StatusError || end.Error != "the conversation could not be read" {
		t.Fatalf("end %+v, want error: the conversation could not be read", end)
	}
	if n := e.prov.calls.Load(); n != 0 {
		t.Fatalf("the model was asked %d times", n)
	}
	// The next turn of the conversation runs.
	if end := waitEnd(t, e.send(t, "c", "t2", "again", true)); end.Status != chat.StatusComplete {
		t.Fatalf("next turn: %+v", end)
	}
}

// A worker lets go of the ids of turns deleted longer ago than --retention
// and the duplicate window: a send may take such an id again. The worker's
// clock runs three hours ahead here.
func TestWorkerForgetsDeletedTurns(t *testing.T) {
	cfg := worker.Config{Retention: time.Hour, Now: func() time.Time { return time.Now().Add(3 * time.Hour) }}
	e := setup(t, cfg, false)
	req := store.SendRequest{ConversationID: "gone", Owner: "u", MessageID: "m1", TurnID: "t-gone", Text: "hello", Now: time.Now()}
	if _, err := e.store.Send(t.Context(), req); err != nil {
		t.Fatal(err)
	}
	if err := e.store.DeleteConversation(t.Context(), "gone", "u"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.Send(t.Context(), req); !errors.Is(err, chat.ErrConflict) {
		t.Fatalf("send with a deleted turn's id: %v, want a conflict", err)
	}
	e.start(t)
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := e.store.Send(t.Context(), req)
		if err == nil {
			return
		}
		if !errors.Is(err, chat.ErrConflict) || time.Now().After(deadline) {
			t.Fatalf("send with the id of a turn deleted past the retention: %v", err)
		}
	}
}

// TestLateFirstDeliveryLeavesAStartedTurnAlone plays a job's first
// delivery that reaches a worker after another worker has started its turn
// (it waited past --ack-wait for a free slot): the worker neither ends the
// turn, even when it finds the turn's tombstone, nor acks the job (an ack
// would ack the other worker's delivery, and a turn whose producer then
// died would stay streaming for good). The job is acked once the turn has
// ended.
func TestLateFirstDeliveryLeavesAStartedTurnAlone(t *testing.T) {
	for _, tombstone := range []bool{false, true} {
		t.Run(map[bool]string{false: "started", true: "started and cancelled"}[tombstone], func(t *testing.T) {
			e := setup(t, worker.Config{}, false)
			ends := e.send(t, "c", "t1", "x", false)
			res, err := e.store.TurnHead(t.Context(), "t1")
			if err != nil {
				t.Fatal(err)
			}
			job := bus.JobOf(res) // as the gateway made it: the turn queued
			if ok, err := e.store.StartTurn(t.Context(), "t1", time.Now()); !ok || err != nil {
				t.Fatal(ok, err)
			}
			if tombstone {
				if _, err := e.bus.MarkCancelled(t.Context(), "t1"); err != nil {
					t.Fatal(err)
				}
			}
			asked, producing := producerOfT1(t, e)
			acks := jobAcks(t, e.bus)
			if err := e.bus.EnqueueJob(t.Context(), job); err != nil {
				t.Fatal(err)
			}
			e.start(t)
			if tombstone {
				// The first delivery, finding the turn cancelled, reads
				// it, and asks for its producer too.
				receive(t, asked, "the first delivery did not ask for the producer")
			}
			// Redelivered after an ack wait, it asks for the producer.
			receive(t, asked, "the job was not redelivered")
			select {
			case ev := <-ends:
				t.Fatalf("the turn was ended under its producer: %+v", ev)
			case n := <-acks:
				t.Fatalf("the job was acked at delivery %d under the turn's producer", n)
			default:
			}
			producerEnds(t, e, producing, acks)
			if e.prov.calls.Load() != 0 {
				t.Fatal("the provider was called for a turn another worker produces")
			}
		})
	}
}

// The shortest --queued-timeout a flag takes (1ns) runs: its sweep ticks
// every millisecond rather than panicking on a zero interval.
func TestShortestQueuedTimeout(t *testing.T) {
	e := setup(t, worker.Config{QueuedTimeout: time.Nanosecond}, true)
	if end := waitEnd(t, e.send(t, "c", "t1", "hello", true)); end.Status != chat.StatusComplete {
		t.Fatalf("end %+v", end)
	}
}

// downPinger is a provider whose model server cannot be reached at its
// first probe; later probes wait for their context, as on a host that
// takes no connection, and so tell nothing.
type downPinger struct {
	*countingProvider
	probes atomic.Int32
}

func (p *downPinger) Ping(ctx context.Context) error {
	if p.probes.Add(1) == 1 {
		return &provider.Error{Message: "could not connect to the model server", Err: provider.ErrUnreachable}
	}
	<-ctx.Done()
	return ctx.Err()
}

// A turn whose model answered lifts the worker's "cannot be reached",
// without waiting for the next probe.
func TestTokenFromTheModelLiftsUnreachable(t *testing.T) {
	e := setup(t, worker.Config{}, false)
	w := worker.New(worker.Config{}, e.bus, e.store, &downPinger{countingProvider: e.prov})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := w.Run(ctx); err != nil {
			t.Error(err)
		}
	}()
	defer func() { cancel(); <-done }()
	if err := w.ModelUnreachable(t.Context()); !errors.Is(err, bus.ErrProviderUnreachable) {
		t.Fatalf("ModelUnreachable after a failed probe = %v", err)
	}
	if end := waitEnd(t, e.send(t, "c", "t1", "hello", true)); end.Status != chat.StatusComplete {
		t.Fatalf("end %+v", end)
	}
	if err := w.ModelUnreachable(t.Context()); err != nil {
		t.Fatalf("ModelUnreachable after the model answered = %v", err)
	}
}

// A turn whose producer published its end but died before storing it is
// ended from the stream by the worker that recovers it, and that end,
// stored only now, counts in tokenrelay_turns_total once, with the
// stream's status: every turn ends there once, however it ends.
func TestRecoveredEndFromTheStreamIsCounted(t *testing.T) {
	reg := prometheus.NewRegistry()
	e := setup(t, worker.Config{Registry: reg}, false)
	e.send(t, "c", "t1", "x", false)
	if ok, err := e.store.StartTurn(t.Context(), "t1", time.Now()); !ok || err != nil {
		t.Fatal(ok, err)
	}
	for i := int64(1); i <= 3; i++ {
		if _, err := e.bus.PublishEvent(t.Context(), &bus.Event{Kind: bus.KindDelta, ConversationID: "c", TurnID: "t1", Seq: i, Off: i - 1, Text: "a"}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.bus.PublishEnd(t.Context(), &bus.Event{Kind: bus.KindEnd, ConversationID: "c", TurnID: "t1", Seq: 3, Status: chat.StatusComplete}, nil); err != nil {
		t.Fatal(err)
	}
	tn, err := e.store.TurnHead(t.Context(), "t1")
	if err != nil {
		t.Fatal(err)
	}
	if err := e.w.Interrupt(t.Context(), tn); err != nil {
		t.Fatal(err)
	}
	if st, _ := e.store.Turn(t.Context(), "t1"); st.Status != chat.StatusComplete || st.Content != "aaa" {
		t.Fatalf("stored %s %q, want the stream's end", st.Status, st.Content)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	counts := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != "tokenrelay_turns_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			counts[m.GetLabel()[0].GetValue()] = m.GetCounter().GetValue()
		}
	}
	if len(counts) != 1 || counts["complete"] != 1 {
		t.Fatalf("tokenrelay_turns_total = %v, want complete: 1", counts)
	}
}
