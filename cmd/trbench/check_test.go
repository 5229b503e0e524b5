package main

import "testing"

// step is one frame a connection sees, for the tracker.
type step struct {
	kind      string // start, delta, end, snap
	turn      string
	from, seq int64
}

func TestTracker(t *testing.T) {
	tests := []struct {
		name     string
		steps    []step
		want     Violations
		verdicts []Verdict // of delta/snap steps, in order; nil: not checked
		applied  int64
	}{
		{
			name:  "contiguous turn",
			steps: []step{{"start", "t", 0, 0}, {"delta", "t", 0, 1}, {"delta", "t", 0, 2}, {"delta", "t", 0, 3}, {"end", "t", 0, 3}},
			want:  Violations{}, applied: 3,
		},
		{
			name:  "merged frame from..seq",
			steps: []step{{"start", "t", 0, 0}, {"delta", "t", 0, 1}, {"delta", "t", 2, 5}, {"end", "t", 0, 5}},
			want:  Violations{}, applied: 5,
		},
		{
			name:     "gap",
			steps:    []step{{"start", "t", 0, 0}, {"delta", "t", 0, 1}, {"delta", "t", 0, 3}},
			want:     Violations{Gaps: 1, MissingEnds: 1},
			verdicts: []Verdict{Applied, GapSeen},
			applied:  1,
		},
		{
			name:     "duplicate",
			steps:    []step{{"start", "t", 0, 0}, {"delta", "t", 0, 1}, {"delta", "t", 0, 2}, {"delta", "t", 0, 2}, {"end", "t", 0, 2}},
			want:     Violations{Dups: 1},
			verdicts: []Verdict{Applied, Applied, Ignored},
			applied:  2,
		},
		{
			name:     "overlap applies the new part",
			steps:    []step{{"start", "t", 0, 0}, {"delta", "t", 1, 3}, {"delta", "t", 2, 5}, {"end", "t", 0, 5}},
			want:     Violations{Dups: 1},
			verdicts: []Verdict{Applied, Applied},
			applied:  5,
		},
		{
			name:  "two ends",
			steps: []step{{"start", "t", 0, 0}, {"delta", "t", 0, 1}, {"end", "t", 0, 1}, {"end", "t", 0, 1}},
			want:  Violations{DoubleEnds: 1}, applied: 1,
		},
		{
			name:  "delta after end",
			steps: []step{{"start", "t", 0, 0}, {"delta", "t", 0, 1}, {"end", "t", 0, 1}, {"delta", "t", 0, 2}},
			want:  Violations{AfterEnd: 1}, applied: 1,
		},
		{
			name:  "end past the last delta is a gap",
			steps: []step{{"start", "t", 0, 0}, {"delta", "t", 0, 1}, {"end", "t", 0, 4}},
			want:  Violations{Gaps: 1}, applied: 1,
		},
		{
			name:  "end below the last delta",
			steps: []step{{"start", "t", 0, 0}, {"delta", "t", 0, 1}, {"delta", "t", 0, 2}, {"end", "t", 0, 1}},
			want:  Violations{EndSeq: 1}, applied: 2,
		},
		{
			name:  "delta of an unknown turn",
			steps: []step{{"delta", "x", 0, 1}, {"end", "x", 0, 1}},
			want:  Violations{Unknown: 1}, applied: 1,
		},
		{
			name:  "missing end",
			steps: []step{{"start", "t", 0, 0}, {"delta", "t", 0, 1}},
			want:  Violations{MissingEnds: 1}, applied: 1,
		},
		{
			name:  "empty turn ends at 0",
			steps: []step{{"start", "t", 0, 0}, {"end", "t", 0, 0}},
			want:  Violations{},
		},
		{
			name:  "full snapshot then deltas",
			steps: []step{{"snap", "t", 0, 40}, {"delta", "t", 0, 41}, {"end", "t", 0, 41}},
			want:  Violations{}, applied: 1,
		},
		{
			name:  "resume snapshot continues",
			steps: []step{{"start", "t", 0, 0}, {"delta", "t", 1, 10}, {"snap", "t", 11, 30}, {"delta", "t", 0, 31}, {"end", "t", 0, 31}},
			want:  Violations{}, applied: 11, // deltas only: the snapshot's 20 are not counted
		},
		{
			name:     "resume snapshot with nothing new",
			steps:    []step{{"start", "t", 0, 0}, {"delta", "t", 1, 10}, {"snap", "t", 11, 10}, {"end", "t", 0, 10}},
			want:     Violations{},
			verdicts: []Verdict{Applied, Ignored},
			applied:  10,
		},
		{
			name:     "resume snapshot with a gap",
			steps:    []step{{"start", "t", 0, 0}, {"delta", "t", 1, 10}, {"snap", "t", 13, 20}},
			want:     Violations{Gaps: 1, MissingEnds: 1},
			verdicts: []Verdict{Applied, GapSeen},
			applied:  10,
		},
		{
			name:     "start of a known turn changes nothing",
			steps:    []step{{"snap", "t", 0, 5}, {"start", "t", 0, 0}, {"delta", "t", 0, 6}, {"end", "t", 0, 6}},
			want:     Violations{},
			verdicts: []Verdict{Applied, Applied},
			applied:  1,
		},
		{
			name: "turns one after another",
			steps: []step{{"start", "a", 0, 0}, {"delta", "a", 0, 1}, {"end", "a", 0, 1},
				{"start", "b", 0, 0}, {"delta", "b", 0, 1}, {"delta", "b", 0, 2}, {"end", "b", 0, 2}},
			want: Violations{}, applied: 3,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tr := NewTracker()
			var verdicts []Verdict
			var applied int64
			for _, s := range tt.steps {
				switch s.kind {
				case "start":
					tr.Start(s.turn)
				case "delta":
					v, n := tr.Delta(s.turn, s.from, s.seq)
					verdicts = append(verdicts, v)
					applied += n
				case "snap":
					verdicts = append(verdicts, tr.Snapshot(s.turn, s.from, s.seq))
				case "end":
					tr.End(s.turn, s.seq)
				}
			}
			tr.Finish()
			if tr.V != tt.want {
				t.Errorf("violations %+v, want %+v", tr.V, tt.want)
			}
			if tt.verdicts != nil && !equalVerdicts(verdicts, tt.verdicts) {
				t.Errorf("verdicts %v, want %v", verdicts, tt.verdicts)
			}
			if applied != tt.applied {
				t.Errorf("applied %d seqs, want %d", applied, tt.applied)
			}
		})
	}
}

func equalVerdicts(a, b []Verdict) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestTrackerPositionAndAbandon(t *testing.T) {
	tr := NewTracker()
	if _, _, ok := tr.Position(); ok {
		t.Fatal("Position of an empty tracker is ok")
	}
	tr.Start("a")
	tr.Delta("a", 0, 1)
	tr.End("a", 1)
	tr.Start("b")
	tr.Delta("b", 1, 7)
	if turn, seq, ok := tr.Position(); turn != "b" || seq != 7 || !ok {
		t.Fatalf("Position = %q %d %v, want b 7 true", turn, seq, ok)
	}
	tr.Abandon()
	tr.Finish()
	if tr.V.Total() != 0 {
		t.Fatalf("violations after Abandon: %+v", tr.V)
	}
}

func TestTrackerForgetsOldTurns(t *testing.T) {
	tr := NewTracker()
	for i := range 3 * keepEndedTurns {
		id := string(rune('A' + i))
		tr.Start(id)
		tr.Delta(id, 0, 1)
		tr.End(id, 1)
	}
	if len(tr.turns) != keepEndedTurns {
		t.Fatalf("remembers %d turns, want %d", len(tr.turns), keepEndedTurns)
	}
	last := string(rune('A' + 3*keepEndedTurns - 1))
	tr.End(last, 1)
	if tr.V.DoubleEnds != 1 {
		t.Fatalf("a second end of a recent turn is not caught: %+v", tr.V)
	}
}
