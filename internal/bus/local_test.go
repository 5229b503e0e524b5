package bus_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
)

// Two buses of one process share a Local: the producer's live events reach
// the other's router without NATS, once each, in order; ends are also
// published on NATS for SubscribeTurnEnd.
func TestLocalCarriesLiveEventsInProcess(t *testing.T) {
	_, producer, gateway := localPair(t)

	r, got := route(t, gateway, "c.1")
	// Deltas do not go through NATS at all.
	var natsDeltas atomic.Int64
	spy, err := gateway.Conn().Subscribe(bus.EventSubject("c.1", "t:1", bus.KindDelta), func(*nats.Msg) { natsDeltas.Add(1) })
	if err != nil {
		t.Fatal(err)
	}
	defer spy.Unsubscribe()
	ends := make(chan bus.Event, 1)
	sub, err := gateway.SubscribeTurnEnd(t.Context(), "t:1", func(e bus.Event) { ends <- e })
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := gateway.Conn().Flush(); err != nil {
		t.Fatal(err)
	}

	if _, err := producer.PublishEvent(t.Context(), &bus.Event{Kind: bus.KindStart, ConversationID: "c.1", TurnID: "t:1"}); err != nil {
		t.Fatal(err)
	}
	for i := int64(1); i <= 20; i++ {
		if _, err := producer.PublishDeltaAsync(&bus.Event{Kind: bus.KindDelta, ConversationID: "c.1", TurnID: "t:1", Seq: i, Text: "w"}, nil); err != nil {
			t.Fatal(err)
		}
	}
	// The end follows every delta's acknowledgement, as the worker's does.
	next := func() bus.Event {
		t.Helper()
		select {
		case e := <-got:
			return e
		case <-t.Context().Done():
			t.Fatal("no live event")
			return bus.Event{}
		}
	}
	if e := next(); e.Kind != bus.KindStart {
		t.Fatalf("first event %+v, want the start", e)
	}
	for want := int64(1); want <= 20; want++ {
		if e := next(); e.Kind != bus.KindDelta || e.Seq != want {
			t.Fatalf("event %+v, want delta %d", e, want)
		}
	}
	if _, err := producer.PublishEvent(t.Context(), &bus.Event{Kind: bus.KindEnd, ConversationID: "c.1", TurnID: "t:1", Seq: 20, Status: "complete"}); err != nil {
		t.Fatal(err)
	}
	if e := next(); e.Kind != bus.KindEnd || e.Seq != 20 {
		t.Fatalf("event %+v, want the end", e)
	}
	select {
	case e := <-ends:
		if e.Seq != 20 {
			t.Fatalf("SubscribeTurnEnd got %+v", e)
		}
	case <-t.Context().Done():
		t.Fatal("the end was not published on NATS")
	}
	// Nothing came twice.
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := r.Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case e := <-got:
		t.Fatalf("extra event %+v", e)
	default:
	}
	if err := producer.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	if err := gateway.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	if n := natsDeltas.Load(); n != 0 {
		t.Fatalf("%d deltas were published on NATS", n)
	}
}

// localPair starts an embedded server that accepts no other process and
// opens two buses on it sharing a Local, as serve does.
func localPair(t *testing.T) (*bus.Local, *bus.Bus, *bus.Bus) {
	t.Helper()
	emb := bustest.StartUnlistened(t)
	local := bus.NewLocal()
	worker, _ := openLocal(t, emb, local, "worker")
	gateway, _ := openLocal(t, emb, local, "gateway")
	return local, worker, gateway
}

// openLocal opens a bus with local on a new connection to emb.
func openLocal(t *testing.T, emb *bus.Embedded, local *bus.Local, name string) (*bus.Bus, *nats.Conn) {
	t.Helper()
	nc, err := nats.Connect(emb.Server.ClientURL(), nats.InProcessServer(emb.Server), nats.Name(name))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	b, err := bus.Open(t.Context(), nc, bus.Config{AckWait: 2 * time.Second, Local: local})
	if err != nil {
		t.Fatal(err)
	}
	return b, nc
}

// A router callback that falls behind loses nothing: under a Local it runs
// on the announcing goroutine, so the producer's acknowledgements wait for
// it instead of a queue overflowing, and every delta arrives once, in
// order, with the end last.
func TestLocalLosesNothingWhenTheRouterFallsBehind(t *testing.T) {
	_, producer, gateway := localPair(t)
	release := make(chan struct{})
	got := make(chan bus.Event, 512)
	r := gateway.NewRouter(1, 1, func(e bus.Event) {
		if e.Kind == bus.KindDelta && e.Seq == 1 {
			<-release // the gateway is stuck on the first delta
		}
		got <- e
	})
	defer r.Close()
	if _, err := producer.PublishEvent(t.Context(), &bus.Event{Kind: bus.KindStart, ConversationID: "c", TurnID: "t"}); err != nil {
		t.Fatal(err)
	}
	const n = 300
	var pds []*bus.PendingDelta
	for i := int64(1); i <= n; i++ {
		pd, err := producer.PublishDeltaAsync(&bus.Event{Kind: bus.KindDelta, ConversationID: "c", TurnID: "t", Seq: i, Text: "w"}, nil)
		if err != nil {
			t.Fatal(err)
		}
		pds = append(pds, pd)
	}
	close(release)
	for _, pd := range pds {
		if _, _, err := pd.Result(t.Context(), true); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := producer.PublishEvent(t.Context(), &bus.Event{Kind: bus.KindEnd, ConversationID: "c", TurnID: "t", Seq: n, Status: "complete"}); err != nil {
		t.Fatal(err)
	}
	if e := <-got; e.Kind != bus.KindStart {
		t.Fatalf("first event %+v, want the start", e)
	}
	for want := int64(1); want <= n; want++ {
		if e := <-got; e.Kind != bus.KindDelta || e.Seq != want {
			t.Fatalf("event %+v, want delta %d", e, want)
		}
	}
	if e := <-got; e.Kind != bus.KindEnd {
		t.Fatalf("event %+v, want the end", e)
	}
}

// PublishEnd announces an end, then waits for settled, then stores it: a
// journaled turn's end goes live without waiting for its last deltas to be
// stored, and is stored after them. When settled fails the end is not
// stored.
func TestPublishEndSettlesBeforeStoring(t *testing.T) {
	_, producer, gateway := localPair(t)
	got := make(chan bus.Event, 4)
	r := gateway.NewRouter(1, 1, func(e bus.Event) { got <- e })
	defer r.Close()
	storedEnds := func(turn string) int {
		n := 0
		if err := gateway.ReadTurn(t.Context(), "c", turn, 1, func(e bus.Event) bool {
			if e.Kind == bus.KindEnd {
				n++
			}
			return true
		}); err != nil {
			t.Fatal(err)
		}
		return n
	}
	for _, fail := range []bool{false, true} {
		turn := "ok"
		if fail {
			turn = "failed"
		}
		settled := func() error {
			if e := <-got; e.Kind != bus.KindEnd || e.TurnID != turn {
				t.Errorf("live event %+v before settling, want the end", e)
			}
			if n := storedEnds(turn); n != 0 {
				t.Errorf("the end was stored before settling")
			}
			if fail {
				return errors.New("a delta could not be stored")
			}
			return nil
		}
		_, err := producer.PublishEnd(t.Context(), &bus.Event{Kind: bus.KindEnd, ConversationID: "c", TurnID: turn, Status: "complete"}, settled)
		if fail != (err != nil) {
			t.Fatalf("PublishEnd (settle fails: %v): %v", fail, err)
		}
		want := 1
		if fail {
			want = 0
		}
		if n := storedEnds(turn); n != want {
			t.Fatalf("stream holds %d ends of turn %s, want %d", n, turn, want)
		}
	}
}

// Under a Local a cancel's signal and a turn's end reach the process's
// listeners directly: here the gateway's own NATS connection is closed,
// and both still arrive.
func TestLocalCarriesCancelsAndEndsInProcess(t *testing.T) {
	emb := bustest.StartUnlistened(t)
	local := bus.NewLocal()
	producer, _ := openLocal(t, emb, local, "worker")
	gateway, gnc := openLocal(t, emb, local, "gateway")
	cancels := make(chan string, 4)
	if _, err := producer.WatchCancels(t.Context(), func(turn string) { cancels <- turn }); err != nil {
		t.Fatal(err)
	}
	gnc.Close()

	ended := make(chan bus.Event, 1)
	sub, err := gateway.SubscribeTurnEnd(t.Context(), "t", func(e bus.Event) { ended <- e })
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	gateway.SignalCancel("t")
	wantCancel(t, cancels, "t")
	if _, err := producer.PublishEvent(t.Context(), &bus.Event{Kind: bus.KindEnd, ConversationID: "c", TurnID: "t", Status: "cancelled"}); err != nil {
		t.Fatal(err)
	}
	select {
	case e := <-ended:
		if e.TurnID != "t" || e.Status != "cancelled" {
			t.Fatalf("end %+v, want turn t cancelled", e)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the end did not arrive")
	}
}

// route subscribes a router of b to conversation conv until the test ends
// and passes its events on.
func route(t *testing.T, b *bus.Bus, conv string) (*bus.Router, <-chan bus.Event) {
	t.Helper()
	got := make(chan bus.Event, 64)
	r := b.NewRouter(2, 64, func(e bus.Event) { got <- e })
	t.Cleanup(r.Close)
	if _, err := r.Subscribe(conv); err != nil {
		t.Fatal(err)
	}
	return r, got
}

// Under a Local a start is announced and not stored: no reader of the
// stream uses it, and no subscriber is in another process.
func TestLocalStartIsAnnouncedNotStored(t *testing.T) {
	_, producer, gateway := localPair(t)
	_, got := route(t, gateway, "c")
	start := &bus.Event{Kind: bus.KindStart, ConversationID: "c", TurnID: "t", ReplyTo: "m",
		Message: &bus.WireMessage{ID: "m", Content: "hello"}}
	sseq, err := producer.PublishEvent(t.Context(), start)
	if err != nil || sseq != 0 {
		t.Fatalf("start: stream seq %d, %v; want 0, nil", sseq, err)
	}
	if e := receive(t, got, "the start was not announced"); e.Kind != bus.KindStart || e.TurnID != "t" || e.UserMessage().Content != "hello" {
		t.Fatalf("announced %+v, want the start with its message", e)
	}
	if n, _ := streamState(t, gateway, bus.EventsStream); n != 0 {
		t.Fatalf("the events stream holds %d events, want none", n)
	}
	// An end is still stored: a catch-up that finds it knows the turn ended.
	if _, err := producer.PublishEvent(t.Context(), &bus.Event{Kind: bus.KindEnd, ConversationID: "c", TurnID: "t", Status: "complete"}); err != nil {
		t.Fatal(err)
	}
	if n, _ := streamState(t, gateway, bus.EventsStream); n != 1 {
		t.Fatalf("the events stream holds %d events, want the end", n)
	}
}

// streamState returns how many messages stream holds and its last
// sequence.
func streamState(t *testing.T, b *bus.Bus, stream string) (msgs, lastSeq uint64) {
	t.Helper()
	js, err := jetstream.New(b.Conn())
	if err != nil {
		t.Fatal(err)
	}
	s, err := js.Stream(t.Context(), stream)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Msgs, info.State.LastSeq
}

// Under a Local a job goes from EnqueueJob to ConsumeJobs in the process,
// in order, carrying its turn, and the job stream never holds it.
func TestLocalJobsSkipTheStream(t *testing.T) {
	_, worker, gateway := localPair(t)
	jobs := consume(t, worker)
	for _, id := range []string{"t1", "t2", "t3"} {
		if err := gateway.EnqueueJob(t.Context(), bus.Job{TurnID: id, ConversationID: "c", Owner: "u"}); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range []string{"t1", "t2", "t3"} {
		jm := receive(t, jobs, "no job given out")
		if jm.TurnID != id || jm.Redelivered {
			t.Fatalf("job %+v, want %s on its first delivery", jm, id)
		}
		if _, fresh := jm.QueuedTurn(); !fresh {
			t.Fatalf("job %s does not carry its turn", id)
		}
		if err := jm.Ack(); err != nil {
			t.Fatal(err)
		}
	}
	msgs, last := streamState(t, gateway, bus.JobsStream)
	if msgs != 0 || last != 0 {
		t.Fatalf("the job stream stored %d jobs (last seq %d); want none", msgs, last)
	}
}

// A local job that its worker neither acks nor keeps in progress is given
// out again after the ack wait, marked redelivered, as the stream's
// consumer would; one kept in progress is not, however long it runs.
func TestLocalJobRedeliveredUnlessKept(t *testing.T) {
	_, worker, gateway := localPair(t)
	jobs := consume(t, worker)
	for _, id := range []string{"kept", "dropped"} {
		if err := gateway.EnqueueJob(t.Context(), bus.Job{TurnID: id, ConversationID: "c"}); err != nil {
			t.Fatal(err)
		}
	}
	kept := receive(t, jobs, "no job given out")
	if kept.TurnID != "kept" {
		t.Fatalf("first job %s, want kept", kept.TurnID)
	}
	stop := make(chan struct{})
	keeping := make(chan struct{})
	go func() {
		defer close(keeping)
		tick := time.NewTicker(worker.AckWait() / 4)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				_ = kept.InProgress()
			}
		}
	}()
	// "dropped" is given out three times, an ack wait apart: by the
	// third, "kept" has run for two ack waits.
	for i := range 3 {
		jm := receive(t, jobs, "no job given out")
		if jm.TurnID != "dropped" || jm.Redelivered != (i > 0) {
			t.Fatalf("delivery %d: job %s (redelivered %v), want dropped (redelivered %v)", i+1, jm.TurnID, jm.Redelivered, i > 0)
		}
		if _, fresh := jm.QueuedTurn(); fresh {
			t.Fatal("a job without its turn must be read from the store")
		}
	}
	close(stop)
	<-keeping
	if err := kept.Ack(); err != nil {
		t.Fatal(err)
	}
	if err := gateway.EnqueueJob(t.Context(), bus.Job{TurnID: "last", ConversationID: "c"}); err != nil {
		t.Fatal(err)
	}
	// The queue is in order: a redelivery of "kept" would come first.
	if jm := receive(t, jobs, "no job given out"); jm.TurnID != "last" {
		t.Fatalf("job %s given out after it was kept in progress and acked; want last", jm.TurnID)
	}
}

// consume runs b's ConsumeJobs until the test ends and passes its jobs on.
func consume(t *testing.T, b *bus.Bus) <-chan *bus.JobMsg {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	jobs := make(chan *bus.JobMsg, 16)
	done := make(chan error, 1)
	go func() { done <- b.ConsumeJobs(ctx, 16, func(jm *bus.JobMsg) { jobs <- jm }) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("consume jobs: %v", err)
		}
	})
	return jobs
}
