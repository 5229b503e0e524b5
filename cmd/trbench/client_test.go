package main

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"
)

// testConn is a connection of no socket and no conversation (a re-join
// after a gap is only noted), fed frames by hand as its reader would.
func testConn(recording bool) (*conn, *bench) {
	b := newBench(&config{}, nil, "r")
	b.recording.Store(recording)
	return newConn(b, nil, 0, nil, nil), b
}

func feed(c *conn, frames ...string) {
	for _, f := range frames {
		c.message([]byte(f))
	}
}

func start(turn string) string {
	return fmt.Sprintf(`{"type":"turn.start","conversation_id":"c","turn_id":%q}`, turn)
}

func delta(turn string, from, seq, ts int64) string {
	f := fmt.Sprintf(`{"type":"turn.delta","conversation_id":"c","turn_id":%q,"seq":%d,"text":"w"`, turn, seq)
	if from > 0 {
		f += fmt.Sprintf(`,"from":%d`, from)
	}
	if ts > 0 {
		f += fmt.Sprintf(`,"ts":%d`, ts)
	}
	return f + "}"
}

func end(turn string, seq int64, status string) string {
	return fmt.Sprintf(`{"type":"turn.end","conversation_id":"c","turn_id":%q,"seq":%d,"status":%q}`, turn, seq, status)
}

func joinedActive(turn string, from, seq int64) string {
	if from > 0 {
		return fmt.Sprintf(`{"type":"joined","conversation_id":"c","messages":[],"active":{"turn_id":%q,"seq":%d,"from":%d,"text":"w"}}`, turn, seq, from)
	}
	return fmt.Sprintf(`{"type":"joined","conversation_id":"c","messages":[],"active":{"turn_id":%q,"seq":%d,"text":"w"}}`, turn, seq)
}

const joinedIdle = `{"type":"joined","conversation_id":"c","messages":[],"active":null}`

// TestConnDeliveryRules feeds one connection crafted frame sequences and
// checks what its tracker counts, as the run's totals would.
func TestConnDeliveryRules(t *testing.T) {
	tests := []struct {
		name   string
		frames []string
		want   Violations
	}{
		{
			name:   "complete turn",
			frames: []string{start("t"), delta("t", 0, 1, 0), delta("t", 2, 4, 0), end("t", 4, "complete")},
		},
		{
			name:   "cancelled turn ends at its last delta",
			frames: []string{start("t"), delta("t", 0, 1, 0), delta("t", 0, 2, 0), end("t", 2, "cancelled")},
		},
		{
			name:   "cancelled before any delta",
			frames: []string{start("t"), end("t", 0, "cancelled")},
		},
		{
			name:   "cancelled end naming a delta never sent is a gap",
			frames: []string{start("t"), delta("t", 0, 1, 0), end("t", 3, "cancelled")},
			want:   Violations{Gaps: 1},
		},
		{
			name:   "second end of a cancelled turn",
			frames: []string{start("t"), delta("t", 0, 1, 0), end("t", 1, "cancelled"), end("t", 1, "cancelled")},
			want:   Violations{DoubleEnds: 1},
		},
		{
			// Rule 1 forbids reordering: the end names seq 3 while the
			// client has 2 (a gap), and delta 3 then comes after the end.
			name:   "end overtaking its last delta",
			frames: []string{start("t"), delta("t", 0, 1, 0), delta("t", 0, 2, 0), end("t", 3, "complete"), delta("t", 0, 3, 0)},
			want:   Violations{Gaps: 1, AfterEnd: 1},
		},
		{
			name:   "deltas swapped",
			frames: []string{start("t"), delta("t", 0, 2, 0), delta("t", 0, 1, 0)},
			want:   Violations{Gaps: 1, MissingEnds: 1},
		},
		{
			name:   "end of a turn never started nor joined",
			frames: []string{end("x", 0, "complete")},
			want:   Violations{Unknown: 1},
		},
		{
			name:   "end below the last delta",
			frames: []string{start("t"), delta("t", 0, 1, 0), delta("t", 0, 2, 0), end("t", 1, "complete")},
			want:   Violations{EndSeq: 1},
		},
		{
			name:   "turn left open",
			frames: []string{start("t"), delta("t", 0, 1, 0)},
			want:   Violations{MissingEnds: 1},
		},
		{
			// A resume with after = 3: the joined frame carries 4..6 and
			// live deltas go on from 7.
			name:   "resume continues after the snapshot",
			frames: []string{start("t"), delta("t", 1, 3, 0), joinedActive("t", 4, 6), delta("t", 0, 7, 0), end("t", 7, "complete")},
		},
		{
			name:   "live delta already in the resume snapshot is a duplicate",
			frames: []string{start("t"), delta("t", 1, 3, 0), joinedActive("t", 4, 6), delta("t", 0, 6, 0), delta("t", 0, 7, 0), end("t", 7, "complete")},
			want:   Violations{Dups: 1},
		},
		{
			// The turn ended while the client was away: the join with
			// after gets no active turn, then the rest and the end.
			name:   "resume of a turn that ended meanwhile",
			frames: []string{start("t"), delta("t", 0, 1, 0), delta("t", 0, 2, 0), joinedIdle, delta("t", 3, 9, 0), end("t", 9, "complete")},
		},
		{
			// After a gap the client re-joins with after and waits for
			// joined (rule 2): what the server sends meanwhile, the end
			// included, is sent again after joined, and is no violation.
			name: "gap, then the end before the re-join's answer",
			frames: []string{start("t"), delta("t", 0, 1, 0), delta("t", 0, 3, 0), delta("t", 0, 4, 0), end("t", 4, "complete"),
				joinedIdle, delta("t", 2, 4, 0), end("t", 4, "complete")},
			want: Violations{Gaps: 1},
		},
		{
			name: "gap, the re-join finds the turn running",
			frames: []string{start("t"), delta("t", 0, 1, 0), delta("t", 0, 3, 0), delta("t", 0, 4, 0),
				joinedActive("t", 2, 4), delta("t", 0, 5, 0), end("t", 5, "complete")},
			want: Violations{Gaps: 1},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, _ := testConn(true)
			feed(c, tt.frames...)
			c.trk.Finish()
			if c.trk.V != tt.want {
				t.Errorf("violations %+v, want %+v", c.trk.V, tt.want)
			}
			if open := c.open.Load(); open != int64(len(c.trk.Open())) {
				t.Errorf("open turns counted %d, tracker has %d", open, len(c.trk.Open()))
			}
		})
	}
}

// TestConnLatencyCountsNewTextOnly: token→screen is one sample per frame
// that put new text on the screen, from its producer's stamp (Unix µs) to
// its receipt; frames that add nothing (a duplicate, deltas ignored while
// re-joining after a gap) or carry no stamp (catch-up text of a resume)
// are no samples, and nothing counts outside the measured window.
func TestConnLatencyCountsNewTextOnly(t *testing.T) {
	stamp := func(ago time.Duration) int64 { return time.Now().Add(-ago).UnixMicro() }
	c, b := testConn(true)
	feed(c, start("t"),
		delta("t", 0, 1, stamp(3*time.Millisecond)),
		delta("t", 0, 1, stamp(time.Hour)), // duplicate: the screen does not change
		delta("t", 2, 3, stamp(time.Hour)), // overlapping: seq 3 is new, so this counts
		delta("t", 0, 5, stamp(time.Hour)), // gap: ignored, the client re-joins
		delta("t", 0, 6, stamp(time.Hour)), // ignored until joined
		joinedActive("t", 4, 6),            // the re-join's answer
		delta("t", 0, 7, 0),                // no stamp
		delta("t", 0, 8, stamp(2*time.Millisecond)),
	)
	h := b.latency()
	if h.Count() != 3 {
		t.Fatalf("%d latency samples, want 3 (seqs 1, 2..3 and 8)", h.Count())
	}
	if mx := h.Max(); mx < uint64(time.Hour.Microseconds()) || mx > uint64((time.Hour+time.Minute).Microseconds()) {
		t.Errorf("max %d µs, want about an hour in µs", mx)
	}
	if q := h.Quantile(0.5); q < 2000 || q > 60_000 {
		t.Errorf("median %d µs, want a few ms in µs", q)
	}

	c, b = testConn(false)
	feed(c, start("t"), delta("t", 0, 1, stamp(time.Millisecond)))
	if n := b.latency().Count(); n != 0 {
		t.Errorf("%d samples outside the window", n)
	}
}

// TestConnJoinTiming: join→joined goes to the resume histogram for a join
// with after and to the join histogram otherwise, from the join's write to
// the joined frame, and only while the run records.
func TestConnJoinTiming(t *testing.T) {
	c, b := testConn(true)
	c.joinKind.Store(int32(joinResume))
	c.joinSent.Store(time.Now().Add(-5 * time.Millisecond).UnixNano())
	feed(c, joinedIdle)
	if b.resume.Count() != 1 || b.join.Count() != 0 {
		t.Fatalf("resume %d join %d samples, want 1 0", b.resume.Count(), b.join.Count())
	}
	if us := b.resume.Max(); us < 5000 || us > 5_000_000 {
		t.Errorf("resume took %d µs, want ≥ 5 ms", us)
	}
	ji := <-c.joined
	if ji.ttff < 5*time.Millisecond {
		t.Errorf("joinedInfo.ttff %v, want ≥ 5ms", ji.ttff)
	}
	feed(c, joinedIdle) // no join waiting: no sample
	if b.resume.Count() != 1 {
		t.Errorf("a joined frame with no join waiting was timed")
	}

	c, b = testConn(false)
	c.joinKind.Store(int32(joinResume))
	c.joinSent.Store(time.Now().UnixNano())
	feed(c, joinedIdle)
	if b.resume.Count() != 0 {
		t.Errorf("a resume outside the window was timed")
	}
	if ji := <-c.joined; ji.ttff <= 0 {
		t.Errorf("the caller still needs its time to joined: %v", ji.ttff)
	}
}

// TestCancelToEnd: cancel→end runs from the cancel's write to the sender
// reading that turn's end with status cancelled; a turn that ended
// otherwise first, or another turn's end, is no sample.
func TestCancelToEnd(t *testing.T) {
	b := newBench(&config{}, nil, "r")
	b.recording.Store(true)
	cs := &convState{b: b, ev: make(chan convEvent, 8)}
	turn := "t1"
	cs.turn.Store(&turn)

	cs.cancelAt.Store(time.Now().Add(-7 * time.Millisecond).UnixNano())
	cs.onEnd(time.Now(), "t0", "complete", 0, 0) // an older turn's end
	cs.onEnd(time.Now(), turn, "cancelled", 0, 3)
	if b.cancel.Count() != 1 {
		t.Fatalf("%d cancel samples, want 1", b.cancel.Count())
	}
	if us := b.cancel.Max(); us < 7000 || us > 7_000_000 {
		t.Errorf("cancel→end %d µs, want ≥ 7 ms", us)
	}
	cs.onEnd(time.Now(), turn, "cancelled", 0, 3) // no cancel waiting
	if b.cancel.Count() != 1 {
		t.Errorf("an end with no cancel waiting was timed")
	}

	cs.cancelAt.Store(time.Now().UnixNano())
	cs.onEnd(time.Now(), turn, "complete", 10, 10)
	if b.cancel.Count() != 1 || b.errs.snapshot()["cancel: turn ended complete first"] != 1 {
		t.Errorf("a turn that completed before its cancel: %d samples, events %v", b.cancel.Count(), b.errs.snapshot())
	}
}

// A join the server refuses fails at once, instead of waiting for a joined
// frame that will not come (which held a whole run).
func TestJoinRefused(t *testing.T) {
	c, _ := testConn(false)
	feed(c, `{"type":"error","id":"join","code":"unavailable","message":"the store did not answer"}`)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.awaitJoined(ctx); err == nil || !strings.Contains(err.Error(), "unavailable") {
		t.Fatalf("awaitJoined after a refusal: %v, want the refusal", err)
	}
	feed(c, joinedIdle)
	if _, err := c.awaitJoined(ctx); err != nil {
		t.Fatalf("awaitJoined after joined: %v", err)
	}
}
