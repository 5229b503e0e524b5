package worker_test

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/provider"
	"github.com/tokenrelay/tokenrelay/internal/provider/sim"
	"github.com/tokenrelay/tokenrelay/internal/store"
	"github.com/tokenrelay/tokenrelay/internal/store/sqlite"
	"github.com/tokenrelay/tokenrelay/internal/worker"
)

// pausingProvider emits its tokens (default "one two three"), then waits
// for release. before, when set, runs before each token.
type pausingProvider struct {
	paused  chan struct{}
	release chan struct{}
	tokens  []string
	before  func()
}

func (p *pausingProvider) Stream(ctx context.Context, _ provider.Request, emit func(string) error) (provider.Result, error) {
	tokens := p.tokens
	if tokens == nil {
		tokens = []string{"one ", "two ", "three"}
	}
	for _, tok := range tokens {
		if p.before != nil {
			p.before()
		}
		if err := emit(tok); err != nil {
			return provider.Result{}, err
		}
	}
	close(p.paused)
	select {
	case <-p.release:
	case <-ctx.Done():
	}
	return provider.Result{}, nil
}

// journaledEnv is a worker of p under serve's journal, with a SQLite
// store, not yet started. Cleanups run last first, so a worker started
// later stops before the store, the journal and the connection close.
func journaledEnv(t *testing.T, cfg worker.Config, p provider.Provider) *env {
	t.Helper()
	b := bustest.StartJournaled(t)
	st, err := sqlite.Open(t.Context(), t.TempDir()+"/t.db")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return &env{bus: b, store: st, w: worker.New(cfg, b, st, p), stop: func() {}}
}

// Under serve's journal a running turn's text is read from its producer
// (bus.LiveText) from any delta on; a position ahead of the producer is
// left to the stream, and so is the turn once it ends, when its snapshot
// holds every delta and the stream none.
func TestLiveTextOfARunningTurn(t *testing.T) {
	p := &pausingProvider{paused: make(chan struct{}), release: make(chan struct{})}
	e := journaledEnv(t, worker.Config{JournalSaveInterval: 300 * time.Millisecond}, p)
	b := e.bus
	e.start(t)
	ends := e.send(t, "c", "t", "hello", true)
	select {
	case <-p.paused:
	case <-t.Context().Done():
		t.Fatal("the turn never started")
	}

	for _, c := range []struct {
		have int64
		want string
	}{{0, "one two three"}, {1, "two three"}, {2, "three"}, {3, ""}} {
		text, to, toLen, ok := b.LiveText("c", "t", c.have)
		if !ok || string(text) != c.want || to != 3 || toLen != int64(len("one two three")) {
			t.Fatalf("LiveText after %d = %q, to %d, len %d, %v; want %q to 3", c.have, text, to, toLen, ok, c.want)
		}
	}
	if _, _, _, ok := b.LiveText("c", "t", 4); ok {
		t.Fatal("LiveText answered for a position ahead of the producer")
	}
	if _, _, _, ok := b.LiveText("c", "other", 0); ok {
		t.Fatal("LiveText answered for a turn not running here")
	}
	// The id of a turn of a deleted conversation may be taken by another
	// conversation's: a reader of the old one is not given the new text.
	if _, _, _, ok := b.LiveText("deleted", "t", 0); ok {
		t.Fatal("LiveText answered for the turn of another conversation")
	}
	// The turn is quiet, yet its deltas are saved from the journal in a
	// snapshot about JournalSaveInterval after its first delta.
	giveUp := time.After(10 * time.Second)
	for {
		if snap, err := b.ReadSnapshot(t.Context(), "c", "t"); err == nil && snap.Seq == 3 {
			break
		} else if err != nil && !errors.Is(err, bus.ErrNoSnapshot) {
			t.Fatal(err)
		}
		select {
		case <-giveUp:
			t.Fatal("the quiet turn's deltas were not saved in 10s")
		case <-time.After(20 * time.Millisecond):
		}
	}
	close(p.release)
	waitEnd(t, ends)
	e.stop()
	if _, _, _, ok := b.LiveText("c", "t", 0); ok {
		t.Fatal("LiveText still answers once the turn has ended")
	}
	// The journal kept the deltas, and the turn's snapshot saved them
	// before its end was stored: the stream holds none of them.
	snap, err := b.ReadSnapshot(t.Context(), "c", "t")
	if err != nil || snap.Text != "one two three" || snap.Seq != 3 {
		t.Fatalf("snapshot %+v (%v), want the whole text to seq 3", snap, err)
	}
	var kinds []string
	if err := b.ReadTurn(t.Context(), "c", "t", snap.StreamSeq+1, func(e bus.Event) bool {
		kinds = append(kinds, e.Kind)
		return true
	}); err != nil {
		t.Fatal(err)
	}
	if slices.Contains(kinds, bus.KindDelta) || !slices.Contains(kinds, bus.KindEnd) {
		t.Fatalf("stream holds %v of the turn, want its end and no delta", kinds)
	}
}

// Under serve's journal a streaming turn's snapshot is written once
// JournalSaveInterval has passed since the last one, not every second as
// without a journal: a resume reads the running turn from its producer.
// The turn's clock moves 700 ms before each of its 8 deltas, so the
// snapshot falls due at the 5th (3.5 s) and not again by the 8th (5.6 s).
func TestJournalSaveInterval(t *testing.T) {
	start := time.Now()
	var elapsed atomic.Int64
	p := &pausingProvider{
		paused: make(chan struct{}), release: make(chan struct{}),
		tokens: []string{"a ", "b ", "c ", "d ", "e ", "f ", "g ", "h"},
		before: func() { elapsed.Add(int64(700 * time.Millisecond)) },
	}
	cfg := worker.Config{
		JournalSaveInterval: 3 * time.Second,
		Now:                 func() time.Time { return start.Add(time.Duration(elapsed.Load())) },
	}
	e := journaledEnv(t, cfg, p)
	b := e.bus
	e.start(t)
	ends := e.send(t, "c", "t", "hello", true)
	receive(t, p.paused, "the turn never paused")
	snap, err := b.ReadSnapshot(t.Context(), "c", "t")
	if err != nil || snap.Seq != 5 || snap.Text != "a b c d e " {
		t.Fatalf("snapshot of the paused turn: %+v (%v), want the text to seq 5", snap, err)
	}
	close(p.release)
	waitEnd(t, ends)
	// The end goes live before the last snapshot is written (it saves
	// the deltas only the journal holds before the end is stored), so
	// the worker is stopped first.
	e.stop()
	snap, err = b.ReadSnapshot(t.Context(), "c", "t")
	if err != nil || snap.Seq != 8 || snap.Text != "a b c d e f g h" {
		t.Fatalf("snapshot of the ended turn: %+v (%v), want the whole text", snap, err)
	}
}

// Under serve's journal a turn whose snapshot cannot be written has the
// deltas only the journal holds stored in the stream instead, rebuilt from
// its text, before its end is stored: the stream then holds it whole.
func TestUnsavedDeltasGoToTheStreamWithoutASnapshot(t *testing.T) {
	p := &pausingProvider{paused: make(chan struct{}), release: make(chan struct{})}
	e := journaledEnv(t, worker.Config{JournalSaveInterval: time.Hour}, p)
	b := e.bus
	e.start(t)
	ends := e.send(t, "c", "t", "hello", true)
	receive(t, p.paused, "the turn never paused")
	js, err := jetstream.New(b.Conn())
	if err != nil {
		t.Fatal(err)
	}
	if err := js.DeleteStream(t.Context(), "KV_"+bus.TurnsBucket); err != nil {
		t.Fatal(err)
	}
	close(p.release)
	if end := waitEnd(t, ends); end.Seq != 3 {
		t.Fatalf("end after seq %d, want 3", end.Seq)
	}
	e.stop()
	var got []string
	ended := false
	if err := b.ReadTurn(t.Context(), "c", "t", 1, func(ev bus.Event) bool {
		switch ev.Kind {
		case bus.KindDelta:
			got = append(got, strconv.FormatInt(ev.Seq, 10)+":"+ev.Text)
		case bus.KindEnd:
			ended = true
		}
		return true
	}); err != nil {
		t.Fatal(err)
	}
	if want := []string{"1:one ", "2:two ", "3:three"}; !slices.Equal(got, want) || !ended {
		t.Fatalf("stream holds deltas %q (end %v), want %q and the end", got, ended, want)
	}
}

// Under serve's journal a delta's text is in LiveText before any
// subscriber is given the delta: a client that joins just after another
// was given a delta must not start behind it.
func TestLiveTextCoversEveryAnnouncedDelta(t *testing.T) {
	e := journaledEnv(t, worker.Config{}, sim.New(sim.Config{Rate: 0, Tokens: 40}))
	b := e.bus

	type seen struct {
		seq, end, to, toLen int64
		ok                  bool
	}
	got := make(chan seen, 1024)
	r := b.NewRouter(1, 1, func(ev bus.Event) {
		if ev.Kind != bus.KindDelta || ev.TurnID != "t" {
			return
		}
		// On the announcing goroutine, as a join on another would run
		// the moment after.
		_, to, toLen, ok := b.LiveText("c", "t", 0)
		got <- seen{seq: ev.Seq, end: ev.Off + int64(len(ev.Text)), to: to, toLen: toLen, ok: ok}
	})
	defer r.Close()
	e.start(t)
	end := waitEnd(t, e.send(t, "c", "t", "hello", true))
	// Every delta went live before the end did.
	n := int64(0)
	for len(got) > 0 {
		s := <-got
		n++
		if !s.ok || s.to < s.seq || s.toLen < s.end {
			t.Fatalf("delta %d (text to byte %d) was live while LiveText had %d (to byte %d, ok %v)", s.seq, s.end, s.to, s.toLen, s.ok)
		}
	}
	if n != end.Seq || n == 0 {
		t.Fatalf("router saw %d deltas, the turn ended at %d", n, end.Seq)
	}
}

// waitingProvider emits one token, says so, and returns when the turn is
// cancelled.
type waitingProvider struct{ streaming chan struct{} }

func (p *waitingProvider) Stream(ctx context.Context, _ provider.Request, emit func(string) error) (provider.Result, error) {
	if err := emit("one "); err != nil {
		return provider.Result{}, err
	}
	close(p.streaming)
	<-ctx.Done()
	return provider.Result{}, ctx.Err()
}

// tokenrelay_worker_cancel_to_end_seconds is what a cancel's user waits
// for inside the worker: from its seeing the cancel to the end going
// live, not what the worker does after (the snapshot's save, the end's
// store in the stream). The worker's clock jumps an hour the moment the
// end goes live, in the local delivery that makes it so.
func TestCancelToEndStopsWhenTheEndGoesLive(t *testing.T) {
	var live atomic.Bool
	reg := prometheus.NewRegistry()
	cfg := worker.Config{Registry: reg, Now: func() time.Time {
		if live.Load() {
			return time.Now().Add(time.Hour)
		}
		return time.Now()
	}}
	p := &waitingProvider{streaming: make(chan struct{})}
	e := journaledEnv(t, cfg, p)
	b := e.bus
	e.start(t)
	sub, err := b.SubscribeTurnEnd(t.Context(), "t", func(bus.Event) { live.Store(true) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sub.Unsubscribe() })
	ends := e.send(t, "c", "t", "hello", true)
	receive(t, p.streaming, "the turn never streamed")
	b.SignalCancel("t")
	if end := waitEnd(t, ends); end.Status != chat.StatusCancelled {
		t.Fatalf("end %+v, want cancelled", end)
	}
	e.stop()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "tokenrelay_worker_cancel_to_end_seconds" {
			continue
		}
		h := mf.GetMetric()[0].GetHistogram()
		if h.GetSampleCount() != 1 || h.GetSampleSum() >= 60 {
			t.Fatalf("cancel to end: %d samples summing to %.1fs, want one under a minute", h.GetSampleCount(), h.GetSampleSum())
		}
		return
	}
	t.Fatal("no tokenrelay_worker_cancel_to_end_seconds")
}

// In one process (bus.InProcess) a job's first delivery does not read the
// cancel tombstone: a turn that a cancel ended while it was queued is
// refused by StartTurn, so the model is not called and the turn is not
// ended twice; the turn queued behind it, on a worker taking one job at a
// time, is produced once the first job is done.
func TestInProcessTurnEndedWhileQueuedIsLeftAlone(t *testing.T) {
	p := &countingProvider{Provider: sim.New(sim.Config{Rate: 0, Tokens: 20})}
	e := journaledEnv(t, worker.Config{Concurrency: 1}, p)
	if !e.bus.InProcess() {
		t.Fatal("a journaled bus is in one process")
	}
	e.start(t)
	ends := e.send(t, "c", "t1", "hello", false)
	if _, won, err := e.store.FinishTurn(t.Context(), store.TurnResult{TurnID: "t1", Status: chat.StatusCancelled, Now: time.Now()}, chat.StatusQueued); !won || err != nil {
		t.Fatal(won, err)
	}
	if _, err := e.bus.MarkCancelled(t.Context(), "t1"); err != nil {
		t.Fatal(err)
	}
	queued, err := e.store.Turn(t.Context(), "t1")
	if err != nil {
		t.Fatal(err)
	}
	queued.Status = chat.StatusQueued // as the send stored it and the job carries it
	if err := e.bus.EnqueueJob(t.Context(), bus.JobOf(queued)); err != nil {
		t.Fatal(err)
	}
	next := e.send(t, "c2", "t2", "hello", true)
	if end := waitEnd(t, next); end.Status != chat.StatusComplete {
		t.Fatalf("next turn %+v", end)
	}
	select {
	case end := <-ends:
		t.Fatalf("the worker ended the cancelled turn again: %+v", end)
	default:
	}
	if n := p.calls.Load(); n != 1 {
		t.Fatalf("provider called %d times, want once (for the next turn)", n)
	}
	if st, err := e.store.Turn(t.Context(), "t1"); err != nil || st.Status != chat.StatusCancelled {
		t.Fatalf("stored %+v, %v", st, err)
	}
}

// A journaled turn whose conversation is deleted while it streams lets the
// journal forget its deltas: nothing will read them, and they must not
// keep their segments on disk (nor be replayed into the stream at the next
// start).
func TestDeletedTurnReleasesItsJournaledDeltas(t *testing.T) {
	dir := t.TempDir()
	b, j := bustest.StartJournaledIn(t, dir)
	st, err := sqlite.Open(t.Context(), t.TempDir()+"/t.db")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	p := &pausingProvider{paused: make(chan struct{}), release: make(chan struct{})}
	e := &env{bus: b, store: st, w: worker.New(worker.Config{StartGrace: -1}, b, st, p), stop: func() {}}
	e.start(t)
	e.send(t, "c", "t1", "hello", true)
	<-p.paused // its deltas are journaled
	if err := st.DeleteConversation(t.Context(), "c", "u"); err != nil {
		t.Fatal(err)
	}
	close(p.release)
	e.stop() // once the turn's producer has returned
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	left, err := filepath.Glob(filepath.Join(dir, "*.journal"))
	if err != nil || len(left) != 0 {
		t.Fatalf("journal segments left after close: %v %v", left, err)
	}
}
