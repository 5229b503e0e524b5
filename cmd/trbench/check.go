package main

// Violations counts what a connection saw that PROTOCOL.md's delivery rules
// forbid. A correct server produces none.
type Violations struct {
	Gaps        int64 `json:"gaps"`         // a delta whose from is past last+1, or an end past the last delta
	Dups        int64 `json:"duplicates"`   // a delta covering seqs already applied
	DoubleEnds  int64 `json:"double_ends"`  // a second turn.end for a turn
	AfterEnd    int64 `json:"after_end"`    // a delta of a turn that had ended
	EndSeq      int64 `json:"end_seq_low"`  // turn.end naming a seq below the last applied delta
	Unknown     int64 `json:"unknown_turn"` // delta or end of a turn neither started nor joined
	MissingEnds int64 `json:"missing_ends"` // turns still open when the run ended
}

// Add adds o to v.
func (v *Violations) Add(o Violations) {
	v.Gaps += o.Gaps
	v.Dups += o.Dups
	v.DoubleEnds += o.DoubleEnds
	v.AfterEnd += o.AfterEnd
	v.EndSeq += o.EndSeq
	v.Unknown += o.Unknown
	v.MissingEnds += o.MissingEnds
}

// Total is the number of violations of every kind.
func (v Violations) Total() int64 {
	return v.Gaps + v.Dups + v.DoubleEnds + v.AfterEnd + v.EndSeq + v.Unknown + v.MissingEnds
}

// Verdict is what the client does with a delta.
type Verdict int

const (
	// Applied: from = last+1 (or it overlapped and its new part was applied).
	Applied Verdict = iota
	// Ignored: nothing new (a duplicate, or a delta after the end).
	Ignored
	// GapSeen: from > last+1; by rule 2 the client re-joins with after.
	GapSeen
)

type turnTrack struct {
	last  int64 // last seq applied
	ended bool
}

// keepEndedTurns bounds how many ended turns a tracker remembers to catch
// a second end; one conversation runs one turn at a time, so a few suffice.
const keepEndedTurns = 8

// Tracker applies PROTOCOL.md's rules to the turns of one connection's
// conversation: deltas apply only when from (or seq) = last+1, each turn
// ends once, and the end names the last delta. It is owned by the
// connection's reader goroutine (not safe for concurrent use).
type Tracker struct {
	cur   string // the turn seen last: a resume names it in after
	turns map[string]*turnTrack
	ended []string // ended turns, oldest first (bounded)
	V     Violations
	// OnViolation, when set, hears of each violation as it is counted,
	// with the frame's from..seq and the last seq applied before it.
	OnViolation func(kind, turn string, from, seq, last int64)
}

func (t *Tracker) report(kind, turn string, from, seq, last int64) {
	if t.OnViolation != nil {
		t.OnViolation(kind, turn, from, seq, last)
	}
}

// NewTracker returns an empty tracker.
func NewTracker() *Tracker { return &Tracker{turns: make(map[string]*turnTrack)} }

// Last returns the last seq applied of turn and whether the turn is known.
func (t *Tracker) Last(turn string) (int64, bool) {
	tt := t.turns[turn]
	if tt == nil {
		return 0, false
	}
	return tt.last, true
}

// Known reports whether turn was started, joined or seen.
func (t *Tracker) Known(turn string) bool { return t.turns[turn] != nil }

// Ended reports whether turn has ended.
func (t *Tracker) Ended(turn string) bool {
	tt := t.turns[turn]
	return tt != nil && tt.ended
}

// Start records turn.start: the turn begins at seq 0. A start for a known
// turn is not a violation (the protocol lets a join overlap it) and
// changes nothing.
func (t *Tracker) Start(turn string) {
	if t.turns[turn] == nil {
		t.turns[turn] = &turnTrack{}
	}
	t.cur = turn
}

// Position is what a resume sends as after: the turn seen last and its
// last applied seq. ok is false before any turn.
func (t *Tracker) Position() (turn string, seq int64, ok bool) {
	tt := t.turns[t.cur]
	if tt == nil {
		return "", 0, false
	}
	return t.cur, tt.last, true
}

// Abandon forgets the open turns of a connection the client left on
// purpose (a probe), so they do not count as missing ends.
func (t *Tracker) Abandon() {
	for id, tt := range t.turns {
		if !tt.ended {
			delete(t.turns, id)
		}
	}
}

// Snapshot records joined.active: the turn's text from..seq, where from = 0
// means a full snapshot (1..seq, no "from" in the frame). With from > 0 (a
// join with after) the same contiguity rule as for a delta applies.
func (t *Tracker) Snapshot(turn string, from, seq int64) Verdict {
	t.cur = turn
	if from == 0 {
		tt := t.turns[turn]
		if tt == nil {
			tt = &turnTrack{}
			t.turns[turn] = tt
		}
		tt.last, tt.ended = seq, false
		return Applied
	}
	if seq < from {
		if t.turns[turn] == nil {
			t.turns[turn] = &turnTrack{last: from - 1}
		}
		return Ignored // nothing new since after
	}
	v, _ := t.Delta(turn, from, seq)
	return v
}

// Delta applies a turn.delta covering from..seq (from = seq when the frame
// has no "from"): it says what the client does with it and how many seqs
// were new.
func (t *Tracker) Delta(turn string, from, seq int64) (Verdict, int64) {
	if from <= 0 || from > seq {
		from = seq
	}
	tt := t.turns[turn]
	if tt == nil {
		t.V.Unknown++
		t.report("unknown turn", turn, from, seq, 0)
		tt = &turnTrack{}
		t.turns[turn] = tt
		t.cur = turn
	}
	if tt.ended {
		t.V.AfterEnd++
		t.report("delta after end", turn, from, seq, tt.last)
		return Ignored, 0
	}
	switch {
	case from == tt.last+1:
		n := seq - tt.last
		tt.last = seq
		return Applied, n
	case from <= tt.last:
		t.V.Dups++
		t.report("duplicate", turn, from, seq, tt.last)
		if seq <= tt.last {
			return Ignored, 0
		}
		n := seq - tt.last
		tt.last = seq
		return Applied, n
	default:
		t.V.Gaps++
		t.report("gap", turn, from, seq, tt.last)
		return GapSeen, 0
	}
}

// End records turn.end after delta seq.
func (t *Tracker) End(turn string, seq int64) {
	tt := t.turns[turn]
	if tt == nil {
		t.V.Unknown++
		t.report("end of unknown turn", turn, seq, seq, 0)
		tt = &turnTrack{last: seq}
		t.turns[turn] = tt
	}
	if tt.ended {
		t.V.DoubleEnds++
		t.report("second end", turn, seq, seq, tt.last)
		return
	}
	switch {
	case seq > tt.last:
		t.V.Gaps++
		t.report("end past last delta", turn, seq, seq, tt.last)
	case seq < tt.last:
		t.V.EndSeq++
		t.report("end below last delta", turn, seq, seq, tt.last)
	}
	tt.ended = true
	t.ended = append(t.ended, turn)
	if len(t.ended) > keepEndedTurns {
		delete(t.turns, t.ended[0])
		t.ended = t.ended[1:]
	}
}

// Open returns the turns that have not ended.
func (t *Tracker) Open() []string {
	var open []string
	for id, tt := range t.turns {
		if !tt.ended {
			open = append(open, id)
		}
	}
	return open
}

// Finish counts the turns still open as missing ends; call it once the
// run is over and every turn should have ended.
func (t *Tracker) Finish() {
	for _, id := range t.Open() {
		t.V.MissingEnds++
		t.report("missing end", id, 0, 0, t.turns[id].last)
	}
}
