package gateway

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/protocol"
)

// sink is where a view sends frames: a WebSocket connection's queue, an SSE
// stream or a compat connection.
type sink interface {
	// message: a user message was stored.
	message(conv string, m chat.Message)
	// start: turn t began.
	start(conv, turn, replyTo, model string)
	// delta: the text of deltas from..seq; off is the byte offset of text in
	// the turn's text. ts is the producer's emission time (Unix µs) of a
	// live delta, 0 when unknown, or catchUpTS for text read back from the
	// bus by a join or a repair: a sink's backlog limit does not count
	// catch-up text, which is as large as the turn and sent once.
	delta(conv, turn string, from, seq int64, off int64, text string, ts int64)
	// end: the turn ended after delta seq.
	end(conv, turn string, seq int64, status chat.TurnStatus, errMsg string, usage *chat.Usage)
	// fail: the view cannot continue (a gap it cannot repair); the sink
	// should make its client resume.
	fail(err error)
	// revoked: view v has stopped for good, with v's lock held, because its
	// conversation now belongs to another user (it was deleted, and another
	// user took its id); the sink drops v without calling back into it.
	revoked(v *view)
	// gone: v's conversation was deleted (v's lock is held). v keeps
	// following the id: its user may create the conversation afresh.
	gone(v *view)
	// dropped: v follows turn no more, and no end of it will come: it was
	// deleted with its conversation before its end was stored (v's lock is
	// held). The sink forgets what it keeps of the turn.
	dropped(v *view, turn string)
}

// view is one client's window on one conversation: it turns the
// conversation's live events into frames so that, per turn, the client gets
// every seq exactly once and in order, then one end. It remembers per turn
// the last seq sent, drops duplicates, and repairs a gap from the bus before
// sending anything later.
type view struct {
	s    *Server
	conv string
	// user is the client's user: a turn of another owner stops the view
	// (see foreignLocked). "" follows every turn.
	user string
	out  sink
	// ctx is the view's lifetime (the connection's): repairs stop with it.
	ctx    context.Context
	wg     *sync.WaitGroup // repairs in flight, owned by the connection
	joined time.Time

	mu        sync.Mutex
	buffering bool                  // join in progress: events wait in buf; guarded by mu
	buf       []bus.Event           // guarded by mu
	turns     map[string]*turnState // guarded by mu; written only by setTurnLocked and dropTurnLocked
	ended     []string              // ended turn ids, oldest first (bounded); guarded by mu
	closed    bool                  // guarded by mu
	// resyncAfterJoin holds a resync asked for while the join was reading:
	// it runs once the join is done. Guarded by mu.
	resyncAfterJoin []chat.Message
	resyncPending   bool
	// last is the state of the turn the previous event was about, and
	// lastID that turn's id as the event carried it: a conversation's
	// events are mostly one turn's deltas, whose ids share their bytes, so
	// finding the turn is one comparison of pointers instead of a lookup
	// in a map that, with a thousand conversations between two deltas of
	// one, is seldom still in the processor's cache. Guarded by mu.
	lastID string
	last   *turnState
}

type turnState struct {
	started   bool  // turn.start sent, or the turn was known at join
	seq       int64 // last seq sent
	len       int64 // text bytes sent; -1 when unknown
	ended     bool
	repairing bool
	pending   []bus.Event // events held while repairing
	attempts  int
	gen       int  // repair generation: a repair's result applies only to its own
	recheck   bool // a resync came during a repair: read the turn again after it
	// quietSeq is seq as the last quiet sweep saw it, quiet whether it saw
	// the turn at all (see checkQuiet).
	quietSeq int64
	quiet    bool
}

const keepEnded = 32

// catchUpTS marks a delta passed to a sink as catch-up text (see sink.delta).
const catchUpTS = -1

// quietFetch is the attempt of fetchLocked that a quiet sweep asks for.
const quietFetch = -1

// A gap is read back from the stream up to repairAttempts times, the waits
// growing to half a second: about 20 s in all, more than a stream leader
// election and the publisher's retries take. Then the connection is closed
// so that its client resumes.
const repairAttempts = 48

func repairBackoff(attempt int) time.Duration {
	return min(time.Duration(attempt)*25*time.Millisecond, 500*time.Millisecond)
}

func newView(s *Server, ctx context.Context, wg *sync.WaitGroup, conv, user string, out sink) *view {
	return &view{s: s, ctx: ctx, wg: wg, conv: conv, user: user, out: out, buffering: true, turns: make(map[string]*turnState), joined: s.now()}
}

func (v *view) deliver(e bus.Event) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return
	}
	if e.Kind == bus.KindGone {
		v.out.gone(v)
		return
	}
	if v.buffering {
		v.buf = append(v.buf, e)
		return
	}
	v.processLocked(e)
}

// foreignLocked reports whether a turn of owner belongs to another user than
// the view's, and then stops the view for good: the conversation was
// deleted while the view followed it, and another user has taken its id.
func (v *view) foreignLocked(owner string) bool {
	if v.user == "" || owner == "" || owner == v.user {
		return false
	}
	v.closed = true
	v.buf = nil
	v.out.revoked(v)
	return true
}

func (v *view) close() {
	v.mu.Lock()
	v.closed = true
	v.buf = nil
	v.mu.Unlock()
}

// turnLocked returns the state of turn id, or nil when the view knows no
// such turn.
func (v *view) turnLocked(id string) *turnState {
	if v.last != nil && id == v.lastID {
		return v.last
	}
	ts := v.turns[id]
	if ts != nil {
		v.lastID, v.last = id, ts
	}
	return ts
}

// setTurnLocked records ts as the state of turn id.
func (v *view) setTurnLocked(id string, ts *turnState) {
	v.turns[id] = ts
	v.lastID, v.last = id, ts
}

// dropTurnLocked forgets turn id.
func (v *view) dropTurnLocked(id string) {
	delete(v.turns, id)
	if v.last != nil && v.lastID == id {
		v.lastID, v.last = "", nil
	}
}

// endedLocked records a turn the client already has in full.
func (v *view) endedLocked(turn string) {
	ts := v.turnLocked(turn)
	if ts == nil {
		ts = &turnState{}
		v.setTurnLocked(turn, ts)
	}
	if ts.ended {
		return
	}
	ts.ended, ts.pending = true, nil
	v.ended = append(v.ended, turn)
	if len(v.ended) > keepEnded {
		v.dropTurnLocked(v.ended[0])
		v.ended = v.ended[1:]
	}
}

// ready ends the join: the client has been sent the snapshot described by
// turns; buffered events are now processed.
func (v *view) ready(turns map[string]*turnState) {
	v.mu.Lock()
	defer v.mu.Unlock()
	for id, ts := range turns {
		if ts.ended {
			v.endedLocked(id)
			continue
		}
		v.setTurnLocked(id, ts)
	}
	v.buffering = false
	buf := v.buf
	v.buf = nil
	for _, e := range buf {
		v.processLocked(e)
	}
	if v.resyncPending {
		recent := v.resyncAfterJoin
		v.resyncPending, v.resyncAfterJoin = false, nil
		v.resyncLocked(recent)
	}
}

// resync makes up for live events that may have been lost with nothing
// after them to reveal it (bus.Router.OnLoss): the connection to the bus
// was down for a moment, or the bus dropped messages of a slow
// subscription. Each turn the client has not seen end is read again from
// the stream past the client's position, and a turn among recent (the
// conversation's newest messages, read after the loss) that the view never
// heard of is sent from its start.
func (v *view) resync(recent []chat.Message) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed {
		return
	}
	if v.buffering {
		v.resyncPending, v.resyncAfterJoin = true, recent
		return
	}
	v.resyncLocked(recent)
}

// checkQuiet reads again from the stream each open turn whose seq has
// not moved since the previous sweep, and returns how many. It is the
// last resort for an end lost with nothing to report it (a NATS route
// between cluster nodes that dropped it, say): such a turn's client
// otherwise waits until it resumes. A turn that is merely slow (a queued
// turn, a model thinking) costs one read of the stream per sweep.
func (v *view) checkQuiet() int {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.closed || v.buffering {
		return 0
	}
	n := 0
	for id, ts := range v.turns {
		switch {
		case ts.ended || ts.repairing:
			ts.quiet = false
		case ts.quiet && ts.quietSeq == ts.seq:
			ts.quiet = false
			v.fetchLocked(id, ts, quietFetch)
			n++
		default:
			ts.quiet, ts.quietSeq = true, ts.seq
		}
	}
	return n
}

func (v *view) resyncLocked(recent []chat.Message) {
	for id, ts := range v.turns {
		switch {
		case ts.ended:
		case ts.repairing:
			ts.recheck = true
		default:
			v.fetchLocked(id, ts, 0)
		}
	}
	for _, m := range recent {
		if m.Role != chat.RoleAssistant || v.turns[m.ID] != nil {
			continue
		}
		// Its start was lost: the repair sends it, or finds that the turn
		// ended before the view joined (the client has it in history).
		ts := &turnState{len: 0}
		v.setTurnLocked(m.ID, ts)
		v.fetchLocked(m.ID, ts, 0)
	}
}

func (v *view) processLocked(e bus.Event) {
	ts := v.turnLocked(e.TurnID)
	if e.Kind == bus.KindStart {
		if ts != nil {
			return // already known: a duplicate, or covered by the join
		}
		if v.foreignLocked(e.Owner) {
			return
		}
		v.setTurnLocked(e.TurnID, &turnState{started: true})
		v.out.message(v.conv, e.UserMessage())
		v.out.start(v.conv, e.TurnID, e.ReplyTo, e.Model)
		return
	}
	if ts == nil {
		// An event of a turn whose start this view has not seen: lost, or
		// overtaken on another route. Repair sends the start first.
		ts = &turnState{len: 0}
		v.setTurnLocked(e.TurnID, ts)
		v.repairLocked(e.TurnID, ts, e)
		return
	}
	if ts.ended {
		return
	}
	if ts.repairing {
		ts.pending = append(ts.pending, e)
		v.fillLocked(e.TurnID, ts)
		return
	}
	switch e.Kind {
	case bus.KindDelta:
		switch {
		case e.Seq <= ts.seq:
			v.s.m.duplicatesDropped.Inc()
		case e.Seq == ts.seq+1:
			v.out.delta(v.conv, e.TurnID, e.Seq, e.Seq, e.Off, e.Text, e.TS)
			ts.seq = e.Seq
			ts.len = e.Off + int64(len(e.Text))
		default:
			v.repairLocked(e.TurnID, ts, e)
		}
	case bus.KindEnd:
		if e.Seq > ts.seq {
			v.repairLocked(e.TurnID, ts, e)
			return
		}
		v.out.end(v.conv, e.TurnID, ts.seq, e.Status, e.Error, e.Usage)
		v.endedLocked(e.TurnID)
	}
}

// fillLocked applies, while a repair is under way, the held live deltas
// that continue the turn (the missing delta may arrive live again: a
// publisher repeats a delta whose acknowledgement failed, with every later
// one). When that closes the gap, the repair's own result is dropped and
// the held events are processed as usual.
func (v *view) fillLocked(turn string, ts *turnState) {
	for progressed := true; progressed; {
		progressed = false
		kept := make([]bus.Event, 0, len(ts.pending))
		for _, e := range ts.pending {
			switch {
			case e.Kind == bus.KindDelta && e.Seq <= ts.seq:
				v.s.m.duplicatesDropped.Inc()
			case e.Kind == bus.KindDelta && e.Seq == ts.seq+1 && ts.started:
				v.out.delta(v.conv, e.TurnID, e.Seq, e.Seq, e.Off, e.Text, e.TS)
				ts.seq, ts.len = e.Seq, e.Off+int64(len(e.Text))
				progressed = true
			default:
				kept = append(kept, e)
			}
		}
		ts.pending = kept
	}
	for _, e := range ts.pending {
		if (e.Kind == bus.KindDelta && e.Seq > ts.seq+1) || (e.Kind == bus.KindEnd && e.Seq > ts.seq) || !ts.started {
			return // still a gap: the repair goes on
		}
	}
	ts.repairing = false
	ts.gen++
	ts.attempts = 0
	v.releaseLocked(turn, ts)
}

// releaseLocked processes the events held during a repair that has ended.
// One of them may start another repair: the rest wait for that one. A
// resync that came during the repair reads the turn again now.
func (v *view) releaseLocked(turn string, ts *turnState) {
	pending := ts.pending
	ts.pending = nil
	for _, e := range pending {
		if ts.ended || ts.repairing {
			if ts.repairing {
				ts.pending = append(ts.pending, e)
			}
			continue
		}
		v.processLocked(e)
	}
	if ts.recheck && !ts.ended && !ts.repairing {
		ts.recheck = false
		v.fetchLocked(turn, ts, 0)
	}
}

// repairLocked fetches what the client misses of a turn from the bus, in
// the background; events of the turn wait until it is done.
func (v *view) repairLocked(turn string, ts *turnState, trigger bus.Event) {
	ts.pending = append(ts.pending, trigger)
	ts.attempts++
	v.s.m.gapsRepaired.Inc()
	v.fetchLocked(turn, ts, ts.attempts)
}

// fetchLocked reads, in the background, what the bus has of a turn past
// the client's position and sends it; events of the turn wait until it is
// done. attempt counts the repairs of one gap (the later ones wait before
// reading); 0 is a resync's check, which expects no gap and counts none.
//
// quietFetch is a quiet sweep's check (see checkQuiet): when the stream
// holds no end of the turn, the store is asked too (see storedEnd), and a
// turn it no longer has in the view's conversation is followed no more.
func (v *view) fetchLocked(turn string, ts *turnState, attempt int) {
	ts.repairing = true
	ts.gen++
	gen := ts.gen
	have, haveLen, needStart := ts.seq, ts.len, !ts.started
	v.wg.Add(1)
	go func() {
		defer v.wg.Done()
		if attempt > 1 {
			// The missing delta is not in the stream yet: its publish is
			// being repeated (a stream leader was lost, which takes a few
			// seconds to replace). Wait and read again.
			t := time.NewTimer(repairBackoff(attempt))
			select {
			case <-t.C:
			case <-v.ctx.Done():
				t.Stop()
				return
			}
		}
		var info chat.Turn
		var userMsg chat.Message
		var cu catchUpResult
		var err error
		for try := max(attempt, 1); ; try++ {
			// Each try has the deadline of a request: a store or bus that
			// leaves a read unanswered (a frozen server, a connection that
			// drops packets) fails the try, and the next one asks again
			// (on another connection), instead of holding the turn's
			// events until the client goes.
			ctx, cancel := context.WithTimeout(v.ctx, v.s.cfg.RequestTimeout)
			if needStart {
				info, err = v.s.store.TurnHead(ctx, turn)
				if err == nil {
					userMsg, err = v.s.store.Message(ctx, v.conv, info.ReplyTo)
				}
			}
			if err == nil {
				cu, err = v.s.catchUp(ctx, v.conv, turn, have, haveLen)
			}
			cancel()
			if err == nil || errors.Is(err, chat.ErrNotFound) || v.ctx.Err() != nil || try >= repairAttempts {
				break
			}
			// A read failed (the bus or the store is briefly away, e.g. a
			// stream leader election): wait and read again.
			t := time.NewTimer(repairBackoff(try + 1))
			select {
			case <-t.C:
			case <-v.ctx.Done():
				t.Stop()
				return
			}
		}
		if attempt == quietFetch && err == nil && cu.End == nil {
			// A store that does not answer in time leaves the turn to the
			// next sweep, as one that refuses (see storedEnd): a sweep
			// skips a turn whose read is still under way.
			ctx, cancel := context.WithTimeout(v.ctx, v.s.cfg.RequestTimeout)
			cu, err = v.s.storedEnd(ctx, v.conv, turn, cu, info, needStart)
			cancel()
		}
		v.mu.Lock()
		defer v.mu.Unlock()
		if v.closed || ts.gen != gen || !ts.repairing {
			return // the live route closed the gap meanwhile (see fillLocked)
		}
		if err != nil {
			if errors.Is(err, chat.ErrNotFound) {
				v.endedLocked(turn) // deleted
				v.out.dropped(v, turn)
				return
			}
			if v.ctx.Err() == nil {
				v.out.fail(err)
			}
			return
		}
		if needStart {
			if v.foreignLocked(info.Owner) {
				return
			}
			if info.Status.Terminal() && !info.FinishedAt.IsZero() && info.FinishedAt.Before(v.joined) {
				// It ended before this view joined: the client has it in history.
				v.endedLocked(turn)
				return
			}
			v.out.message(v.conv, userMsg)
			v.out.start(v.conv, turn, info.ReplyTo, info.Model)
			ts.started = true
		}
		if cu.To > ts.seq {
			from, text, off := cu.From, cu.Text, cu.ToLen-int64(len(cu.Text))
			if ts.seq > have {
				// Live deltas advanced the turn meanwhile: send only the rest.
				if ts.len < off || ts.len-off > int64(len(text)) {
					text = nil
				} else {
					text, off, from = text[ts.len-off:], ts.len, ts.seq+1
				}
			}
			if text != nil || from == cu.From {
				v.out.delta(v.conv, turn, from, cu.To, off, string(text), catchUpTS)
				ts.seq, ts.len = cu.To, cu.ToLen
				ts.attempts = 0
			}
		}
		if cu.End != nil && cu.End.Seq <= ts.seq {
			v.out.end(v.conv, turn, ts.seq, cu.End.Status, cu.End.Error, cu.End.Usage)
			v.endedLocked(turn)
			return
		}
		ts.repairing = false
		if ts.attempts > repairAttempts {
			ts.pending = nil
			v.out.fail(errors.New("cannot repair a gap in the turn's events"))
			return
		}
		v.releaseLocked(turn, ts)
	}()
}

// join subscribes the view, then reads the history and the active turn, so
// that nothing published in between is lost or doubled. It returns the
// joined frame's content; the caller sends it before calling ready (the
// events that arrive meanwhile wait).
func (v *view) join(ctx context.Context, history int, after *protocol.After) (protocol.Joined, []func(), map[string]*turnState, error) {
	var j protocol.Joined
	// One read gives both the history and the active turn, consistently:
	// a turn's assistant row is stored with its user message, and at most
	// one turn of a conversation is unfinished, the newest. A join that
	// wants no history (a client resuming with "after") reads no text: it
	// gets its answer's rest from catchUp, and a join then costs the same
	// however long the answers before it were.
	var msgs []chat.Message
	var err error
	if history == 0 {
		msgs, err = v.s.store.MessageHeads(ctx, v.conv, 3)
	} else {
		msgs, err = v.s.store.Messages(ctx, v.conv, max(history, 2)+1, "")
	}
	if err == nil {
		err = v.s.stillOwned(ctx, v.conv, v.user, msgs)
	}
	if err != nil {
		return j, nil, nil, err
	}
	turns := make(map[string]*turnState)
	var active *chat.Turn
	wire := make([]protocol.Message, 0, len(msgs))
	var endedIDs []string
	for _, m := range msgs {
		if m.Role == chat.RoleAssistant {
			if !m.Status.Terminal() {
				active = &chat.Turn{ID: m.ID, ConversationID: m.ConversationID, ReplyTo: m.ReplyTo, Model: m.Model, Status: m.Status}
				continue // reported in "active"
			}
			endedIDs = append(endedIDs, m.ID)
		}
		wire = append(wire, protocol.WireMessage(m))
	}
	// The view remembers keepEnded ended turns: those it is told of here
	// are the newest of the history (a late event of an older one ended
	// long before the join, and a repair finds it in the history), with
	// room for the active turn and the one named in "after", which may
	// have ended during this read. Told of more, ready would forget some
	// at random, and a late live event of a forgotten turn that ended
	// while the view joined would send the client that turn again.
	endedIDs = endedIDs[max(0, len(endedIDs)-(keepEnded-2)):]
	for _, id := range endedIDs {
		turns[id] = &turnState{started: true, ended: true}
	}
	if len(wire) > history {
		wire = wire[len(wire)-history:]
	}
	j.Messages = wire
	var followUps []func()
	if active != nil {
		have := int64(0)
		resuming := after != nil && after.TurnID == active.ID
		if resuming {
			have = after.Seq
		}
		cu, err := v.s.catchUp(ctx, v.conv, active.ID, have, -1)
		if err != nil {
			return j, nil, nil, err
		}
		status := active.Status
		if cu.To > 0 && status == chat.StatusQueued {
			status = chat.StatusStreaming
		}
		a := &protocol.ActiveTurn{TurnID: active.ID, ReplyTo: active.ReplyTo, Status: status, Seq: cu.To, Text: string(cu.Text), Model: active.Model}
		if resuming {
			a.From = have + 1
			if cu.To < have {
				a.Seq = have
			}
		}
		j.Active = a
		ts := &turnState{started: true, seq: max(cu.To, have), len: cu.ToLen}
		if cu.End != nil {
			end := *cu.End
			seq := ts.seq
			followUps = append(followUps, func() { v.out.end(v.conv, active.ID, seq, end.Status, end.Error, end.Usage) })
			ts.ended = true
		}
		turns[active.ID] = ts
	}
	switch {
	case after == nil:
	case active != nil && after.TurnID == active.ID:
		v.s.m.resumes.WithLabelValues("active").Inc()
	default:
		v.s.m.resumes.WithLabelValues("ended").Inc()
	}
	if after != nil && (active == nil || after.TurnID != active.ID) {
		// The client was following a turn that has ended since: send it the
		// rest and the end (the client names a turn in "after" only while
		// it waits for that turn's end).
		if t, err := v.s.store.TurnHead(ctx, after.TurnID); err == nil && t.ConversationID == v.conv && t.Status.Terminal() {
			cu, err := v.s.catchUp(ctx, v.conv, t.ID, after.Seq, -1)
			if err != nil {
				// Sending the end without the text before it would leave
				// the client with a gap: fail the join, the client retries.
				return j, nil, nil, err
			}
			if after.Seq < t.Seq && cu.To < t.Seq {
				// Its events are gone (past --retention), as for SSE: the
				// store holds its whole text but not where its deltas began.
				// From the start it is sent whole; from within it only the
				// end, with the turn's real last seq (its final message is in
				// the history).
				cu.Missed = true
				if after.Seq == 0 {
					if full, err := v.s.store.Turn(ctx, t.ID); err == nil && full.Seq == t.Seq {
						cu = catchUpResult{From: 1, To: full.Seq, ToLen: int64(len(full.Content)), Text: []byte(full.Content)}
					}
				}
			}
			turns[t.ID] = &turnState{started: true, ended: true}
			if !cu.Missed {
				text, from, to := string(cu.Text), cu.From, cu.To
				off := cu.ToLen - int64(len(cu.Text))
				followUps = append(followUps, func() {
					if to >= from {
						v.out.delta(v.conv, t.ID, from, to, off, text, catchUpTS)
					}
					v.out.end(v.conv, t.ID, max(to, after.Seq), t.Status, t.Error, t.Usage)
				})
			} else {
				tid, status, seq, emsg, usage := t.ID, t.Status, t.Seq, t.Error, t.Usage
				followUps = append(followUps, func() { v.out.end(v.conv, tid, seq, status, emsg, usage) })
			}
		}
	}
	return j, followUps, turns, nil
}
