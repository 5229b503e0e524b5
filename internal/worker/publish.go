package worker

import (
	"bytes"
	"cmp"
	"context"
	"sync"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/chat"
)

// publisher turns a provider's tokens into numbered deltas of one turn: it
// batches tokens within the configured window, publishes each delta to the
// events stream in order, and keeps the turn's snapshot current.
type publisher struct {
	ctx  context.Context
	w    *Worker
	turn chat.Turn
	snap *bus.SnapshotWriter
	// journaled: deltas go live once journaled (bus.Bus.Journaled).
	journaled bool
	// beforeLive is addPendingText under a journal, nil otherwise.
	beforeLive func()

	mu        sync.Mutex
	text      []byte      // all text published so far; guarded by mu, and written under liveMu too
	pending   []byte      // batched text not yet published; guarded by mu
	pendingTS int64       // emission time of the newest pending token
	seq       int64       // last published seq; guarded by mu
	err       error       // first publish error; guarded by mu
	timer     *time.Timer // batch flush timer; guarded by mu
	firstAt   time.Time   // first delta published
	lastFlush time.Time
	snapAt    time.Time  // last snapshot written or tried
	snapLen   int        // text length at the last snapshot written or tried
	snapSeq   int64      // seq at the last snapshot written
	snapFail  bool       // the last snapshot write failed (logged once a streak)
	inflight  []sent     // published, not yet acknowledged, oldest first; guarded by mu
	acked     ackedDelta // the newest acknowledged delta; guarded by mu
	// Under a journal: the deltas kept only there, which the next snapshot
	// saves (see bus.Journal), and the timer that writes it when the turn
	// goes quiet; guarded by mu.
	unsaved   bus.Unsaved
	saveTimer *time.Timer
	saveArmed bool
	stopped   bool
	// With a token budget: what Take charged this turn, and the message
	// of the refusal that stopped it; guarded by mu.
	charge  Charge
	refusal string

	// Under a journal (see TextAfter): the text length after each delta.
	liveMu sync.Mutex
	ends   []uint32 // guarded by liveMu
}

// sent is a delta awaiting its acknowledgement; end is the text length
// after it.
type sent struct {
	pd  *bus.PendingDelta
	end int
}

// ackedDelta is a delta the stream has stored or the journal has, and sseq
// the stream sequence of the newest delta up to it that the stream stored
// (0 when none: a journaled turn's deltas are not stored there).
type ackedDelta struct {
	seq  int64
	sseq uint64
	end  int
}

func newPublisher(ctx context.Context, w *Worker, t chat.Turn) *publisher {
	p := &publisher{ctx: ctx, w: w, turn: t, snap: w.bus.NewSnapshotWriter(t.ConversationID, t.ID), snapAt: w.cfg.Now(), journaled: w.bus.Journaled()}
	if p.journaled {
		p.beforeLive = p.addPendingText
	}
	return p
}

// emit is the provider's callback.
func (p *publisher) emit(tok string) error {
	if tok == "" {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.err != nil {
		return p.err
	}
	if b := p.w.cfg.TokenBudget; b != nil {
		ok, msg := b.Take(p.turn.Owner, &p.charge)
		if !ok {
			p.refusal = msg
			return errBudgetSpent
		}
	}
	p.pending = append(p.pending, tok...)
	if p.w.cfg.DeltaTimestamps {
		p.pendingTS = p.w.cfg.Now().UnixMicro()
	}
	if p.w.cfg.BatchWindow <= 0 {
		return p.flushLocked()
	}
	if p.timer == nil {
		p.timer = time.AfterFunc(p.w.cfg.BatchWindow, func() {
			p.mu.Lock()
			defer p.mu.Unlock()
			p.timer = nil
			_ = p.flushLocked()
		})
	}
	return nil
}

// settle replaces the turn's charge of budget b with used, the provider's
// count.
func (p *publisher) settle(b TokenBudget, used int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	b.Settle(p.turn.Owner, &p.charge, used)
}

// budgetRefusal is the message of the budget's refusal that stopped the
// turn.
func (p *publisher) budgetRefusal() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.refusal
}

// flush publishes what is pending and waits until every delta of the turn
// is acknowledged: the end must follow them in the stream.
func (p *publisher) flush() error {
	if err := p.flushPending(); err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for len(p.inflight) > 0 && p.err == nil {
		p.reapLocked(true)
	}
	return p.err
}

// TextAfter implements bus.LiveTurn: the text after delta have, from
// memory. Under a journal a delta's text is added here once it is saved
// (journaled, or stored) and just before it goes live, so TextAfter covers
// every delta any subscriber has been given.
//
// It takes only liveMu, never mu: mu is held across the publisher's waits
// for the stream (a snapshot write, the acknowledgements at the end), and a
// join must not wait for those.
func (p *publisher) TextAfter(have int64) (text []byte, to, toLen int64, ok bool) {
	p.liveMu.Lock()
	defer p.liveMu.Unlock()
	seq := int64(len(p.ends))
	if have < 0 || have > seq {
		return nil, 0, 0, false
	}
	from := 0
	if have > 0 {
		from = int(p.ends[have-1])
	}
	return bytes.Clone(p.text[from:]), seq, int64(len(p.text)), true
}

// addPendingText makes the pending text part of the turn's text. It runs
// under mu: from flushLocked, or under a journal from the bus just before
// the delta goes live (see bus.Bus.PublishDeltaAsync), on flushLocked's
// goroutine.
func (p *publisher) addPendingText() {
	p.liveMu.Lock()
	defer p.liveMu.Unlock()
	p.text = append(p.text, p.pending...)
	if p.journaled {
		p.ends = append(p.ends, uint32(len(p.text)))
	}
}

// flushPending publishes what is pending without waiting for the stream.
func (p *publisher) flushPending() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.timer != nil {
		p.timer.Stop()
		p.timer = nil
	}
	return p.flushLocked()
}

// maxInflight bounds the deltas of one turn published but not yet
// acknowledged.
const maxInflight = 64

func (p *publisher) flushLocked() error {
	if p.err != nil || len(p.pending) == 0 {
		return p.err
	}
	e := &bus.Event{
		Kind: bus.KindDelta, ConversationID: p.turn.ConversationID, TurnID: p.turn.ID,
		Seq: p.seq + 1, Off: int64(len(p.text)), Text: string(p.pending), TS: p.pendingTS,
	}
	// Under a journal the delta goes live before PublishDeltaAsync
	// returns: its text must be in TextAfter by then, or a join that reads
	// it just after the delta went by would start behind what other
	// clients show.
	pd, err := p.w.bus.PublishDeltaAsync(e, p.beforeLive)
	if err != nil {
		p.err = err
		return err
	}
	p.seq = e.Seq
	if !p.journaled {
		p.addPendingText()
	}
	if pd.Journaled() {
		p.unsaved.Add(pd)
	}
	p.pending = p.pending[:0]
	p.inflight = append(p.inflight, sent{pd: pd, end: len(p.text)})
	p.snap.Record(len(p.text))
	now := p.w.cfg.Now()
	if p.firstAt.IsZero() {
		p.firstAt = now
		p.w.modelReached() // whatever the last probe said
	}
	p.lastFlush = now
	p.w.m.deltas.Inc()
	p.reapLocked(len(p.inflight) >= maxInflight)
	if p.err != nil {
		return p.err
	}
	if p.acked.seq > p.snapSeq && p.snapshotDue(now) {
		p.snapshotLocked(now)
	}
	if !p.unsaved.Empty() {
		p.armSaveLocked()
	}
	return nil
}

// snapshotLocked writes the snapshot of the acknowledged deltas.
func (p *publisher) snapshotLocked(now time.Time) {
	if err := p.snap.Write(p.ctx, p.text[:p.acked.end], p.acked.seq, p.acked.sseq, chat.StatusStreaming); err != nil {
		// A missed snapshot only lengthens a resume's tail, and under a
		// journal keeps the deltas there until the next one. While a
		// stream has no leader every snapshot fails: say so once a turn.
		p.w.m.snapFails.Inc()
		if !p.snapFail {
			p.w.log.Warn("write snapshot; retrying with the next", "turn_id", p.turn.ID, "err", err)
			p.snapFail = true
		}
	} else {
		if p.snapFail {
			p.w.log.Info("snapshot written again", "turn_id", p.turn.ID)
			p.snapFail = false
		}
		p.releaseLocked(p.acked.seq)
		p.snapSeq = p.acked.seq
	}
	// A failed one is retried no sooner than a snapshot would be due, but
	// does not count as written: the final one (save) must not be
	// skipped for it.
	p.snapAt, p.snapLen = now, p.acked.end
}

// armSaveLocked makes sure that journaled deltas are saved within about
// JournalSaveInterval even when the turn goes quiet (a model thinking): a
// snapshot is otherwise written only as a delta is published, and a
// segment stays on disk while any delta in it is unsaved. The timer fires
// a little after a busy turn's own snapshot would be due, and then finds
// nothing to do.
func (p *publisher) armSaveLocked() {
	if p.saveArmed || p.stopped {
		return
	}
	d := max(p.snapAt.Add(p.w.cfg.JournalSaveInterval+saveSlack).Sub(p.w.cfg.Now()), saveSlack)
	if p.saveTimer == nil {
		p.saveTimer = time.AfterFunc(d, p.saveQuiet)
	} else {
		p.saveTimer.Reset(d)
	}
	p.saveArmed = true
}

// saveSlack is how long after a snapshot falls due the save timer waits.
const saveSlack = 100 * time.Millisecond

func (p *publisher) saveQuiet() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.saveArmed = false
	if p.stopped || p.unsaved.Empty() {
		return
	}
	if now := p.w.cfg.Now(); now.Sub(p.snapAt) >= p.w.cfg.JournalSaveInterval {
		p.snapshotLocked(now)
	}
	if !p.unsaved.Empty() {
		p.armSaveLocked()
	}
}

// releaseLocked tells the journal that the deltas up to seq are saved.
func (p *publisher) releaseLocked(seq int64) {
	p.unsaved.Release(seq)
}

// dropFront removes s's first n elements, moving the rest to the front: the
// next append reuses the backing array. (Reslicing s[n:] instead shrinks
// its capacity, so that a queue kept short by taking from its front
// allocates anew on nearly every append: once per delta.)
func dropFront[T any](s []T, n int) []T {
	if n == 0 {
		return s
	}
	k := copy(s, s[n:])
	clear(s[k:])
	return s[:k]
}

// reapLocked takes the acknowledged deltas off the front of inflight,
// waiting for the first one when block is set. When one failed (no answer
// in time, a stream leader lost), it and every later one are published
// again in order, synchronously with retries; the stream then holds the
// turn's deltas contiguously from there (readers drop the repeats).
func (p *publisher) reapLocked(block bool) {
	n := 0 // acknowledged, at the front
	for n < len(p.inflight) {
		head := p.inflight[n]
		sseq, done, err := head.pd.Result(p.ctx, block)
		block = false
		if !done {
			break
		}
		if err != nil {
			p.inflight = dropFront(p.inflight, n)
			p.republishLocked()
			return
		}
		p.acked = ackedDelta{seq: head.pd.Seq, sseq: cmp.Or(sseq, p.acked.sseq), end: head.end}
		head.pd.Recycle()
		n++
	}
	p.inflight = dropFront(p.inflight, n)
}

func (p *publisher) republishLocked() {
	for _, x := range p.inflight {
		sseq, err := p.w.bus.Republish(p.ctx, x.pd)
		if err != nil {
			p.err = err
			return
		}
		p.acked = ackedDelta{seq: x.pd.Seq, sseq: sseq, end: x.end}
	}
	clear(p.inflight)
	p.inflight = p.inflight[:0]
}

// snapshotDue says whether the snapshot should be written after this
// delta. A resume reads the snapshot and then the deltas after it one by
// one, so the snapshot must never lag far behind: it is written when
// SnapshotBytes of new text have piled up, or once SnapshotInterval has
// passed with at least snapshotMinDeltas new deltas, and in any case a
// second after the last one. A slow turn (20 tokens/s) thus writes one
// snapshot a second instead of ten, and a resume still replays at most a
// second or SnapshotBytes of its deltas.
//
// Under a journal a resume reads a running turn from its producer, and
// the snapshot only saves the deltas the journal holds: it is written
// after SnapshotBytes of new text or once JournalSaveInterval has passed.
func (p *publisher) snapshotDue(now time.Time) bool {
	since := now.Sub(p.snapAt)
	switch {
	case len(p.text)-p.snapLen >= p.w.cfg.SnapshotBytes:
		return true
	case p.journaled:
		return since >= p.w.cfg.JournalSaveInterval
	case since >= p.w.cfg.SnapshotInterval && p.seq-p.snapSeq >= snapshotMinDeltas:
		return true
	case since >= snapshotMaxAge:
		return true
	}
	return false
}

const (
	snapshotMinDeltas = 32
	snapshotMaxAge    = time.Second
)

func (p *publisher) failed() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err != nil
}

func (p *publisher) stop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stopped = true
	if p.timer != nil {
		p.timer.Stop()
		p.timer = nil
	}
	if p.saveTimer != nil {
		p.saveTimer.Stop()
	}
}

// drop lets the journal forget the turn's deltas without saving them: the
// turn was deleted, or another producer's end won.
func (p *publisher) drop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.releaseLocked(p.seq)
}

// finalSnapshot writes the snapshot of the whole turn once every delta is
// acknowledged, so that a resume of the finished turn reads no stream tail.
// Under a journal it is save's second chance (the turn was deleted before
// its end, or save failed), and the snapshot is already written otherwise.
func (p *publisher) finalSnapshot(status chat.TurnStatus) {
	if err := p.save(status); err != nil {
		p.w.log.Warn("write final snapshot", "turn_id", p.turn.ID, "err", err)
	}
}

// save writes the snapshot of every delta published so far and releases
// them from the journal. Under a journal it runs before the turn's end is
// stored (see bus.Bus.PublishEnd), and when the snapshot cannot be written
// it stores the deltas the journal alone keeps in the stream instead; an
// error then leaves them to the next start's replay.
func (p *publisher) save(status chat.TurnStatus) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if (p.err != nil && !p.journaled) || len(p.inflight) > 0 || p.acked.seq == 0 ||
		(p.acked.seq == p.snapSeq && p.unsaved.Empty()) {
		return nil
	}
	err := p.snap.Write(p.ctx, p.text[:p.acked.end], p.acked.seq, p.acked.sseq, status)
	if err == nil {
		p.snapSeq = p.acked.seq
		p.releaseLocked(p.acked.seq)
		return nil
	}
	if p.unsaved.Empty() {
		return err
	}
	p.w.log.Warn("write final snapshot; storing the journaled deltas instead", "turn_id", p.turn.ID, "err", err)
	for _, seq := range p.unsaved.Seqs() {
		if _, err := p.w.bus.StoreJournaled(p.ctx, p.deltaLocked(seq)); err != nil {
			return err
		}
		p.unsaved.Release(seq)
	}
	return nil
}

// deltaLocked rebuilds journaled delta seq from the turn's text (without
// its emission time, which only live frames carry).
func (p *publisher) deltaLocked(seq int64) *bus.Event {
	from := 0
	if seq > 1 {
		from = int(p.ends[seq-2])
	}
	return &bus.Event{
		Kind: bus.KindDelta, ConversationID: p.turn.ConversationID, TurnID: p.turn.ID,
		Seq: seq, Off: int64(from), Text: string(p.text[from:p.ends[seq-1]]),
	}
}
