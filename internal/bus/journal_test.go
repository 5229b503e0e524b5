package bus_test

import (
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
	"github.com/tokenrelay/tokenrelay/internal/chat"
)

// journalSetup starts an embedded server that accepts no other process, as
// serve's, and returns a function opening a bus on a new connection to it.
func journalSetup(t *testing.T) func(local *bus.Local, j *bus.Journal) (*bus.Bus, *nats.Conn) {
	t.Helper()
	emb := bustest.StartUnlistened(t)
	return func(local *bus.Local, j *bus.Journal) (*bus.Bus, *nats.Conn) {
		t.Helper()
		nc, err := nats.Connect(emb.Server.ClientURL(), nats.InProcessServer(emb.Server))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		b, err := bus.Open(t.Context(), nc, bus.Config{AckWait: 2 * time.Second, Local: local, Journal: j})
		if err != nil {
			t.Fatal(err)
		}
		return b, nc
	}
}

// startJournal opens and starts a journal in dir, closed when the test
// ends; segmentBytes, when not 0, sets the size of its segments.
func startJournal(t *testing.T, dir string, segmentBytes int64, log *slog.Logger) *bus.Journal {
	t.Helper()
	j, err := bus.OpenJournal(dir, log)
	if err != nil {
		t.Fatal(err)
	}
	if segmentBytes > 0 {
		j.SetSegmentBytes(segmentBytes)
	}
	if err := j.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { j.Close() })
	return j
}

// smallSegments starts a journal in dir whose segments hold about three
// deltas, and opens a producer's bus with it.
func smallSegments(t *testing.T, open func(*bus.Local, *bus.Journal) (*bus.Bus, *nats.Conn), dir string, log ...*slog.Logger) (*bus.Local, *bus.Bus) {
	t.Helper()
	j := startJournal(t, dir, 300, append(log, nil)[0])
	local := bus.NewLocal()
	producer, _ := open(local, j)
	return local, producer
}

// routedEvents opens a second bus on local, as a gateway would, and returns
// a channel of every event its router delivers (buffer n).
func routedEvents(t *testing.T, open func(*bus.Local, *bus.Journal) (*bus.Bus, *nats.Conn), local *bus.Local, n int) <-chan bus.Event {
	t.Helper()
	gateway, _ := open(local, nil)
	got := make(chan bus.Event, n)
	r := gateway.NewRouter(1, 1, func(e bus.Event) { got <- e })
	t.Cleanup(r.Close)
	return got
}

func segmentFiles(t *testing.T, dir string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, "*.journal"))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// publishDeltas publishes deltas 1..n of turn t and returns them.
func publishDeltas(t *testing.T, producer *bus.Bus, n int64) []*bus.PendingDelta {
	t.Helper()
	var pds []*bus.PendingDelta
	for i := int64(1); i <= n; i++ {
		pd, err := producer.PublishDeltaAsync(delta(i), nil)
		if err != nil {
			t.Fatal(err)
		}
		pds = append(pds, pd)
	}
	return pds
}

func delta(seq int64) *bus.Event {
	return &bus.Event{Kind: bus.KindDelta, ConversationID: "c", TurnID: "t", Seq: seq, Off: seq - 1, Text: "w"}
}

// A journaled delta is live at once, and kept only in the journal until
// its producer saves it elsewhere. Here deltas 1..3 are saved in a
// snapshot, 4..5 in the stream, and 6..10 nowhere before the process
// stops. The next run's Replay stores those five in the stream, so that
// the turn's snapshot and stream hold it whole, once each, in order. A
// record cut short at the end of a segment is ignored.
func TestJournalReplayStoresWhatWasNotSaved(t *testing.T) {
	open := journalSetup(t)
	dir := t.TempDir()
	j := startJournal(t, dir, 0, nil)
	local := bus.NewLocal()
	producer, _ := open(local, j)
	gateway, _ := open(local, nil)
	got := make(chan bus.Event, 64)
	r := gateway.NewRouter(1, 1, func(e bus.Event) { got <- e })
	defer r.Close()

	if _, err := producer.PublishEvent(t.Context(), &bus.Event{Kind: bus.KindStart, ConversationID: "c", TurnID: "t"}); err != nil {
		t.Fatal(err)
	}
	snap := producer.NewSnapshotWriter("c", "t")
	for i := int64(1); i <= 10; i++ {
		pd, err := producer.PublishDeltaAsync(delta(i), nil)
		if err != nil {
			t.Fatal(err)
		}
		if sseq, done, err := pd.Result(t.Context(), false); !done || err != nil || sseq != 0 || !pd.Journaled() {
			t.Fatalf("delta %d: stream seq %d, done %v, err %v, journaled %v; want journaled and settled", i, sseq, done, err, pd.Journaled())
		}
		snap.Record(int(i))
		switch {
		case i == 3:
			if err := snap.Write(t.Context(), []byte("www"), 3, 0, chat.StatusStreaming); err != nil {
				t.Fatal(err)
			}
		case i == 4 || i == 5:
			if _, err := producer.Republish(t.Context(), pd); err != nil {
				t.Fatal(err)
			}
		}
	}
	if e := <-got; e.Kind != bus.KindStart {
		t.Fatalf("first live event %+v, want the start", e)
	}
	for want := int64(1); want <= 10; want++ {
		if e := <-got; e.Kind != bus.KindDelta || e.Seq != want {
			t.Fatalf("live event %+v, want delta %d", e, want)
		}
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	segs := segmentFiles(t, dir)
	if len(segs) != 1 {
		t.Fatalf("segments %v, want the one written", segs)
	}
	// A write cut short by the crash.
	f, err := os.OpenFile(segs[0], os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write([]byte{40, 0, 0, 0, 1, 2, 3, 4, 5}); err != nil {
		t.Fatal(err)
	}
	f.Close()

	next, err := bus.OpenJournal(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := open(nil, nil)
	n, err := next.Replay(t.Context(), b)
	if err != nil {
		t.Fatal(err)
	}
	if n != 5 {
		t.Fatalf("replay stored %d deltas, want 5", n)
	}
	var seqs []int64
	if err := b.ReadTurn(t.Context(), "c", "t", 1, func(e bus.Event) bool {
		if e.Kind == bus.KindDelta {
			seqs = append(seqs, e.Seq)
		}
		return true
	}); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(seqs, []int64{4, 5, 6, 7, 8, 9, 10}) {
		t.Fatalf("stream holds deltas %v, want 4..10", seqs)
	}
	if segs := segmentFiles(t, dir); len(segs) != 0 {
		t.Fatalf("segments %v left after replay", segs)
	}
	// Replaying again stores nothing.
	if n, err := next.Replay(t.Context(), b); err != nil || n != 0 {
		t.Fatalf("second replay: %d, %v", n, err)
	}
}

// A segment no longer written to goes once every delta in it is saved
// elsewhere; until then it stays, and the one being written always does.
func TestJournalRemovesSavedSegments(t *testing.T) {
	open := journalSetup(t)
	dir := t.TempDir()
	_, producer := smallSegments(t, open, dir)
	pds := publishDeltas(t, producer, 100)
	checkSegmentsGoWithReleases(t, dir, func(from, to int64) {
		for _, pd := range pds[from-1 : to] {
			pd.Release()
		}
	})
}

// Producers of different turns append at once across many segment
// changes, so that several find a segment full together and one starts the
// next: every delta goes live once, each turn's in order, and once all are
// released only the current segment is left.
func TestJournalProducersShareSegmentChanges(t *testing.T) {
	open := journalSetup(t)
	dir := t.TempDir()
	local, producer := smallSegments(t, open, dir)
	const producers, each = 8, 150
	got := routedEvents(t, open, local, producers*each)
	pds := make([][]*bus.PendingDelta, producers)
	var wg sync.WaitGroup
	for p := range producers {
		wg.Go(func() {
			turn := "t" + strconv.Itoa(p)
			for i := int64(1); i <= each; i++ {
				pd, err := producer.PublishDeltaAsync(&bus.Event{Kind: bus.KindDelta, ConversationID: "c", TurnID: turn, Seq: i, Off: i - 1, Text: "w"}, nil)
				if err != nil {
					t.Error(err)
					return
				}
				pds[p] = append(pds[p], pd)
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	last := map[string]int64{}
	for range producers * each {
		select {
		case e := <-got:
			if e.Seq != last[e.TurnID]+1 {
				t.Fatalf("turn %s: delta %d live after %d", e.TurnID, e.Seq, last[e.TurnID])
			}
			last[e.TurnID] = e.Seq
		case <-time.After(10 * time.Second):
			t.Fatalf("live deltas stopped at %v", last)
		}
	}
	if segs := segmentFiles(t, dir); len(segs) < producers*each/10 {
		t.Fatalf("%d segments hold %d unsaved deltas, want one per three or so", len(segs), producers*each)
	}
	for _, ps := range pds {
		for _, pd := range ps {
			pd.Release()
		}
	}
	if segs := segmentFiles(t, dir); len(segs) != 1 {
		t.Fatalf("segments %v, want only the current one", segs)
	}
}

// Unsaved takes over the deltas' holds on their segments, so that each
// delta is recycled at once, and releases them by seq: a segment goes once
// every delta in it is released, whichever runs it is split over.
func TestUnsavedHoldsSegmentsNotDeltas(t *testing.T) {
	open := journalSetup(t)
	dir := t.TempDir()
	_, producer := smallSegments(t, open, dir)
	var u bus.Unsaved
	for _, pd := range publishDeltas(t, producer, 100) {
		u.Add(pd)
		pd.Recycle()
		if pd.Seq != 0 || pd.Journaled() {
			t.Fatalf("delta kept after Add: seq %d, journaled %v", pd.Seq, pd.Journaled())
		}
	}
	checkSegmentsGoWithReleases(t, dir, func(from, to int64) {
		u.Release(to)
		if want := 100 - to; int64(len(u.Seqs())) != want || (want > 0 && u.Seqs()[0] != to+1) {
			t.Fatalf("unsaved seqs %v after releasing to %d", u.Seqs(), to)
		}
	})
	if !u.Empty() {
		t.Fatalf("unsaved %v after releasing all", u.Seqs())
	}
}

// checkSegmentsGoWithReleases checks the segments in dir as release lets
// go of 100 small journaled deltas, 1..50 and then 51..100: about one
// segment per three deltas stays unsaved, and at the end only the current.
func checkSegmentsGoWithReleases(t *testing.T, dir string, release func(from, to int64)) {
	t.Helper()
	if segs := segmentFiles(t, dir); len(segs) < 10 {
		t.Fatalf("%d segments hold 100 unsaved deltas, want one per three or so", len(segs))
	}
	release(1, 50)
	if segs := segmentFiles(t, dir); len(segs) < 5 || len(segs) > 25 {
		t.Fatalf("%d segments left with 50 deltas unsaved, want one per three or so", len(segs))
	}
	release(51, 100)
	// The last write may have started a new segment, or not.
	if segs := segmentFiles(t, dir); len(segs) != 1 {
		t.Fatalf("segments %v, want only the current one", segs)
	}
}

// A journaled delta that cannot be saved in a snapshot is stored in the
// stream as it was, and its segment may then go.
func TestStoreJournaled(t *testing.T) {
	open := journalSetup(t)
	dir := t.TempDir()
	local, producer := smallSegments(t, open, dir)
	got := routedEvents(t, open, local, 8)
	var u bus.Unsaved
	for _, pd := range publishDeltas(t, producer, 3) {
		u.Add(pd)
		pd.Recycle()
	}
	for i := int64(1); i <= 3; i++ {
		if e := <-got; e.Seq != i {
			t.Fatalf("live delta %d, want %d", e.Seq, i)
		}
	}
	for _, seq := range u.Seqs() {
		if _, err := producer.StoreJournaled(t.Context(), delta(seq)); err != nil {
			t.Fatal(err)
		}
		u.Release(seq)
	}
	if _, err := producer.StoreJournaled(t.Context(), &bus.Event{Kind: bus.KindEnd, ConversationID: "c", TurnID: "t"}); err == nil {
		t.Fatal("StoreJournaled took an end")
	}
	var texts []string
	if err := producer.ReadTurn(t.Context(), "c", "t", 1, func(e bus.Event) bool {
		texts = append(texts, strconv.FormatInt(e.Seq, 10)+e.Text)
		return true
	}); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(texts, []string{"1w", "2w", "3w"}) {
		t.Fatalf("stream holds %v, want deltas 1..3", texts)
	}
	if segs := segmentFiles(t, dir); len(segs) != 1 {
		t.Fatalf("segments %v, want only the current one", segs)
	}
}

// Recycle leaves a journaled delta alone until it is released: its
// segment still counts it, and the segment must go once it is released.
// A released one is taken (and its fields cleared).
func TestRecycleWaitsForRelease(t *testing.T) {
	open := journalSetup(t)
	dir := t.TempDir()
	_, producer := smallSegments(t, open, dir)
	pds := publishDeltas(t, producer, 12)
	for i, pd := range pds {
		pd.Recycle()
		if pd.Seq != int64(i+1) || !pd.Journaled() {
			t.Fatalf("unreleased delta %d recycled: seq %d, journaled %v", i+1, pd.Seq, pd.Journaled())
		}
	}
	for _, pd := range pds {
		pd.Release()
		pd.Recycle()
		if pd.Seq != 0 || pd.Journaled() {
			t.Fatalf("released delta kept: seq %d, journaled %v", pd.Seq, pd.Journaled())
		}
	}
	if segs := segmentFiles(t, dir); len(segs) != 1 {
		t.Fatalf("segments %v, want only the current one", segs)
	}
}

// A journal belongs to serve's in-process bus only.
func TestJournalNeedsLocal(t *testing.T) {
	j, err := bus.OpenJournal(t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bus.Open(t.Context(), nil, bus.Config{Journal: j}); err == nil {
		t.Fatal("a journal without a Local was accepted")
	}
}

// When the journal cannot start a segment (its directory is gone, the disk
// is full), deltas are stored and then announced, as without a journal,
// before PublishDeltaAsync returns: none is lost, failed or out of order.
func TestJournalFallsBackToTheStream(t *testing.T) {
	open := journalSetup(t)
	dir := t.TempDir()
	var logs strings.Builder
	var logsMu sync.Mutex
	log := slog.New(slog.NewTextHandler(writerFunc(func(p []byte) (int, error) {
		logsMu.Lock()
		defer logsMu.Unlock()
		return logs.Write(p)
	}), nil))
	local, producer := smallSegments(t, open, dir, log)
	got := routedEvents(t, open, local, 64)
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	var stored []int64
	for i := int64(1); i <= 20; i++ {
		pd, err := producer.PublishDeltaAsync(delta(i), nil)
		if err != nil {
			t.Fatal(err)
		}
		sseq, done, err := pd.Result(t.Context(), false)
		if !done || err != nil {
			t.Fatalf("delta %d: done %v, err %v; want settled", i, done, err)
		}
		if pd.Journaled() != (sseq == 0) {
			t.Fatalf("delta %d: journaled %v with stream seq %d", i, pd.Journaled(), sseq)
		}
		if !pd.Journaled() {
			stored = append(stored, i)
		}
	}
	// The segment being written when its directory went still takes the
	// first few; all the rest are stored.
	if len(stored) == 0 || stored[0] == 1 || int64(len(stored)) != 21-stored[0] {
		t.Fatalf("deltas %v stored, want all but the first few", stored)
	}
	for want := int64(1); want <= 20; want++ {
		if e := <-got; e.Kind != bus.KindDelta || e.Seq != want {
			t.Fatalf("live event %+v, want delta %d", e, want)
		}
	}
	var inStream []int64
	if err := producer.ReadTurn(t.Context(), "c", "t", 1, func(e bus.Event) bool {
		inStream = append(inStream, e.Seq)
		return true
	}); err != nil || !slices.Equal(inStream, stored) {
		t.Fatalf("stream holds deltas %v (%v), want %v", inStream, err, stored)
	}
	// A failed segment change is forgotten: once the directory is back,
	// the next delta starts a segment and is journaled.
	if err := os.MkdirAll(dir, 0o750); err != nil {
		t.Fatal(err)
	}
	pd, err := producer.PublishDeltaAsync(delta(21), nil)
	if err != nil {
		t.Fatal(err)
	}
	if !pd.Journaled() {
		t.Fatal("delta 21 stored in the stream with the journal's directory back")
	}
	if e := <-got; e.Seq != 21 {
		t.Fatalf("live event %+v, want delta 21", e)
	}
	// Logged once when segments fail and once when they start again, not
	// once per delta.
	logsMu.Lock()
	defer logsMu.Unlock()
	if failed, again := strings.Count(logs.String(), "start delta journal segment"), strings.Count(logs.String(), "started again"); failed != 1 || again != 1 {
		t.Fatalf("%d failures and %d recoveries logged, want 1 and 1:\n%s", failed, again, logs.String())
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }
