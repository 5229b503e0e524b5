package e2e_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// busCounts is how many messages each of tokenrelay's streams holds (a KV
// bucket's stream is KV_<bucket>).
func busCounts(t *testing.T, js jetstream.JetStream) map[string]uint64 {
	t.Helper()
	out := map[string]uint64{}
	for _, name := range []string{bus.EventsStream, bus.JobsStream, "KV_" + bus.TurnsBucket, "KV_" + bus.CancelBucket} {
		s, err := js.Stream(trtest.Ctx(t, 10*time.Second), name)
		if err != nil {
			t.Fatalf("stream %s: %v", name, err)
		}
		info, err := s.Info(trtest.Ctx(t, 10*time.Second))
		if err != nil {
			t.Fatalf("stream %s: %v", name, err)
		}
		out[name] = info.State.Msgs
	}
	return out
}

// waitBusEmpty polls the streams until every one holds no message.
func waitBusEmpty(t *testing.T, js jetstream.JetStream, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		counts := busCounts(t, js)
		empty := true
		for _, n := range counts {
			empty = empty && n == 0
		}
		if empty {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the streams still hold messages %v after %v", counts, timeout)
		}
		time.Sleep(100 * time.Millisecond) // polling the streams, not synchronising
	}
}

// retentionTurns runs, on a client of ws, a turn that completes, one that is
// stopped while it streams (its tombstone goes to the cancel bucket) and one
// the model fails.
func retentionTurns(t *testing.T, ws string) {
	t.Helper()
	c := trtest.Dial(t, ws, nil)
	c.Join("kept", nil)
	if tr := runTurn(t, c, "kept", "one [sim tokens=20 rate=0]", nil); tr.Status != "complete" {
		t.Fatalf("first turn ended %s", tr.Status)
	}
	tr := startTurn(t, c, "kept", "two [sim tokens=5000 rate=50]", 2)
	c.Send(map[string]any{"type": "cancel", "turn_id": tr.ID, "id": "stop"})
	if ack := ackOf(t, c, "stop", tr); ack.Str("status") != "cancelled" {
		t.Fatalf("cancel answered %v", ack)
	}
	finish(t, c, tr)
	if tr := runTurn(t, c, "kept", "three [sim tokens=20 rate=0 error_after=5]", nil); tr.Status != "error" {
		t.Fatalf("third turn ended %s", tr.Status)
	}
}

// A gateway and a worker on NATS keep a turn's events, its snapshot and its
// tombstone for --retention, and no longer: once it has passed, the
// streams and buckets are empty (the jobs stream is empty once each job is
// acked), while the history store still has every turn.
func TestBusExpiresTurnsAfterRetention(t *testing.T) {
	_, natsURL, storeURL := trtest.ScaleOutDeps(t)
	common := []string{"--nats-url", natsURL, "--store-url", storeURL, "--retention", "2s"}
	w := trtest.Start(t, append([]string{"worker", "--metrics-addr", "127.0.0.1:0"}, common...)...)
	g := trtest.Start(t, append([]string{"gateway", "--addr", "127.0.0.1:0"}, common...)...)
	g.WaitReady(t)

	js := trtest.JetStream(t, natsURL)

	retentionTurns(t, g.WSURL())
	held := busCounts(t, js)
	if held[bus.EventsStream] == 0 || held["KV_"+bus.TurnsBucket] == 0 || held["KV_"+bus.CancelBucket] == 0 {
		t.Fatalf("right after the turns the streams hold %v, want their events, snapshots and a tombstone", held)
	}
	waitBusEmpty(t, js, time.Minute)

	if got := messages(t, g.URL, "kept", ""); len(got) != 6 {
		t.Fatalf("the history holds %d messages after the bus expired them, want 6", len(got))
	}
	// The worker's own metrics: nothing runs, and its turns are counted.
	for status, want := range map[string]float64{"complete": 1, "cancelled": 1, "error": 1} {
		if n := trtest.Metric(t, w.URL, "tokenrelay_turns_total", `status="`+status+`"`); n != want {
			t.Errorf("the worker's tokenrelay_turns_total{status=%q} = %v, want %v", status, n, want)
		}
	}
	if n := trtest.Metric(t, w.URL, "tokenrelay_turns_running", ""); n != 0 {
		t.Errorf("the worker's tokenrelay_turns_running = %v after every turn ended", n)
	}
}

// serve's embedded NATS, reached with --nats-listen (where deltas are stored
// in the stream, as scaled out), expires the turns after --retention the
// same way.
func TestServeExpiresTurnsAfterRetention(t *testing.T) {
	listen := fmt.Sprintf("127.0.0.1:%d", bustest.FreePorts(t, 1)[0])
	p := trtest.Serve(t, "--retention", "2s", "--nats-listen", listen)
	js := trtest.JetStream(t, "nats://"+listen)

	retentionTurns(t, p.WSURL())
	held := busCounts(t, js)
	if held[bus.EventsStream] == 0 || held["KV_"+bus.TurnsBucket] == 0 {
		t.Fatalf("right after the turns the streams hold %v, want their events and snapshots", held)
	}
	waitBusEmpty(t, js, time.Minute)
	if got := messages(t, p.URL, "kept", ""); len(got) != 6 {
		t.Fatalf("the history holds %d messages after the bus expired them, want 6", len(got))
	}
}

// serve's delta journal keeps a segment only while it holds deltas not
// yet saved: after answers that filled several segments have ended, only
// the segment being written is left.
func TestServeJournalKeepsOnlyUnsavedSegments(t *testing.T) {
	p := trtest.Serve(t)
	dir := filepath.Join(p.DataDir, "journal")
	segments := func() []string {
		t.Helper()
		names, err := filepath.Glob(filepath.Join(dir, "*"))
		if err != nil {
			t.Fatal(err)
		}
		for i, n := range names {
			if fi, err := os.Stat(n); err == nil {
				names[i] = fmt.Sprintf("%s (%d bytes)", filepath.Base(n), fi.Size())
			}
		}
		return names
	}
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("journal", nil)
	for i := range 3 {
		tr := startTurn(t, c, "journal", fmt.Sprintf("long %d [sim tokens=60000 rate=0]", i), 1)
		finish(t, c, tr)
		if tr.Status != "complete" {
			t.Fatalf("turn ended %s", tr.Status)
		}
	}
	deadline := time.Now().Add(time.Minute)
	segs := segments()
	for ; len(segs) > 1; segs = segments() {
		if time.Now().After(deadline) {
			t.Fatalf("once every turn ended the journal keeps %s, want only the segment it writes", strings.Join(segs, ", "))
		}
		time.Sleep(100 * time.Millisecond) // polling the directory, not synchronising
	}
	// Segments are numbered from 1 in a new data dir: the one left being
	// the third or later, the answers did fill the ones before it.
	if len(segs) != 1 || segs[0] < "0000000000000003" {
		t.Fatalf("the journal holds %v: the answers did not fill two segments, so this shows nothing", segs)
	}
}
