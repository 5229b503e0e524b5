package bus

import (
	"slices"
	"sync"
)

// Local carries live events from the producers of one process to its own
// gateway without a round trip through NATS. serve uses it when its
// embedded NATS server accepts no other process (no --nats-listen, no
// --nats-url): its gateway is then the only live subscriber there can be.
//
// With a Local, every Bus sharing it hands each live event to the Router
// made on one of them instead of publishing it: the router's callback runs
// on the announcing goroutine (for a delta, the one that took the stream's
// acknowledgement, or under a Journal the producer's), with the event the
// producer built, so a delta costs no
// NATS publish, no server-side routing, no parse on the way back, no hop
// through a router shard and nothing is ever dropped. The Router makes no
// NATS subscriptions: it receives every conversation's events and its
// callback drops those nobody follows, as a NATS subscription would never
// have delivered them. A cancel's signal (SignalCancel) and a turn's end
// for SubscribeTurnEnd are likewise handed over in the process, without a
// NATS hop: on a busy machine each hop was up to ten milliseconds of a
// cancel's tail.
//
// Order is kept without a queue: a turn's start is announced before its
// job is enqueued, so before any delta exists; its deltas are announced by
// the one goroutine that takes the producer's acknowledgements, in
// acknowledgement order, or under a Journal by the producer, in its order;
// its end is published once every delta was acknowledged, so announced
// (see acks.answer).
type Local struct {
	mu     sync.RWMutex
	router *Router // guarded by mu

	live sync.Map // turn id → LiveTurn

	jobs localJobs

	hookMu  sync.Mutex
	cancels map[*cancelHook]struct{}    // WatchCancels' callbacks; guarded by hookMu
	ends    map[string][]*turnEndWaiter // SubscribeTurnEnd's, by turn id; guarded by hookMu
}

type cancelHook struct{ fn func(turnID string) }

type turnEndWaiter struct{ fn func(Event) }

// LiveTurn is a turn being produced in this process under a Journal: every
// delta it has journaled is live, so its text so far is known here and a
// join or a repair need not read it back from the stream, which may not
// have stored the newest deltas yet.
type LiveTurn interface {
	// TextAfter returns the text after delta have, the last seq it
	// covers and the text length after that seq; ok is false when it
	// cannot tell (have is ahead of it, or a delta went live another way),
	// and the stream is read instead.
	TextAfter(have int64) (text []byte, to, toLen int64, ok bool)
}

// liveKey names a live turn by its conversation too: a turn id of a
// deleted conversation may be taken again by another (see
// store.ForgetDeletedTurns), and a reader still following the old turn
// must not be given the new one's text.
type liveKey struct{ conv, turn string }

// AddLiveTurn makes t answer TextAfter for turn of conversation conv until
// the returned function is called. Only a Bus with a Journal has live
// turns.
func (b *Bus) AddLiveTurn(conv, turn string, t LiveTurn) (remove func()) {
	l := b.cfg.Local
	if l == nil || b.cfg.Journal == nil {
		return func() {}
	}
	k := liveKey{conv, turn}
	l.live.Store(k, t)
	return func() { l.live.CompareAndDelete(k, t) }
}

// LiveText is TextAfter of turn of conversation conv when it is being
// produced in this process (see LiveTurn); ok is false otherwise.
func (b *Bus) LiveText(conv, turn string, have int64) (text []byte, to, toLen int64, ok bool) {
	if b.cfg.Local == nil {
		return nil, 0, 0, false
	}
	t, found := b.cfg.Local.live.Load(liveKey{conv, turn})
	if !found {
		return nil, 0, 0, false
	}
	return t.(LiveTurn).TextAfter(have)
}

// NewLocal returns a Local to put in the Config of every Bus of a process.
func NewLocal() *Local { return &Local{jobs: localJobs{ready: make(chan struct{}, 1)}} }

func (l *Local) attach(r *Router) {
	l.mu.Lock()
	l.router = r
	l.mu.Unlock()
}

func (l *Local) detach(r *Router) {
	l.mu.Lock()
	if l.router == r {
		l.router = nil
	}
	l.mu.Unlock()
}

// deliver hands one live event to the router's callback, which must not
// block (see NewRouter), and an end to its turn's SubscribeTurnEnd
// callbacks. The read lock is held meanwhile, so once the router's Close
// has detached it no callback is running or will run.
func (l *Local) deliver(e *Event) {
	if e.Kind == KindEnd {
		l.hookMu.Lock()
		waiters := slices.Clone(l.ends[e.TurnID])
		l.hookMu.Unlock()
		for _, w := range waiters {
			w.fn(*e)
		}
	}
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.router == nil {
		return
	}
	live := *e
	live.StreamSeq = 0 // as a live NATS delivery has none
	l.router.fn(live)
}

// announce makes a stored event live: through the Local when there is one,
// else on NATS. data is e encoded.
func (b *Bus) announce(e *Event, data []byte) error {
	if b.cfg.Local != nil {
		b.cfg.Local.deliver(e)
		return nil
	}
	return b.nc.Publish(e.Subject(), data)
}

// AnnounceGone tells the conversation's live subscribers, on every gateway,
// that it was deleted (an event of kind KindGone). It is not stored: a
// subscriber that misses it (its NATS connection was down) is not told.
func (b *Bus) AnnounceGone(conversationID string) error {
	e := &Event{Kind: KindGone, ConversationID: conversationID, TurnID: goneTurn}
	return b.announce(e, []byte("{}"))
}

// watchCancels makes fn hear every SignalCancel of the process until the
// returned function is called.
func (l *Local) watchCancels(fn func(turnID string)) (stop func()) {
	h := &cancelHook{fn: fn}
	l.hookMu.Lock()
	if l.cancels == nil {
		l.cancels = make(map[*cancelHook]struct{})
	}
	l.cancels[h] = struct{}{}
	l.hookMu.Unlock()
	return func() {
		l.hookMu.Lock()
		delete(l.cancels, h)
		l.hookMu.Unlock()
	}
}

// signalCancel calls every watchCancels callback with turnID, on the
// caller's goroutine.
func (l *Local) signalCancel(turnID string) {
	l.hookMu.Lock()
	hooks := make([]*cancelHook, 0, len(l.cancels))
	for h := range l.cancels {
		hooks = append(hooks, h)
	}
	l.hookMu.Unlock()
	for _, h := range hooks {
		h.fn(turnID)
	}
}

// localTurnEnd is a SubscribeTurnEnd under a Local.
type localTurnEnd struct {
	l    *Local
	turn string
	w    *turnEndWaiter
}

func (l *Local) subscribeTurnEnd(turnID string, fn func(Event)) Subscription {
	w := &turnEndWaiter{fn: fn}
	l.hookMu.Lock()
	if l.ends == nil {
		l.ends = make(map[string][]*turnEndWaiter)
	}
	l.ends[turnID] = append(l.ends[turnID], w)
	l.hookMu.Unlock()
	return &localTurnEnd{l: l, turn: turnID, w: w}
}

func (s *localTurnEnd) Unsubscribe() error {
	s.l.hookMu.Lock()
	defer s.l.hookMu.Unlock()
	ws := slices.DeleteFunc(s.l.ends[s.turn], func(w *turnEndWaiter) bool { return w == s.w })
	if len(ws) == 0 {
		delete(s.l.ends, s.turn)
	} else {
		s.l.ends[s.turn] = ws
	}
	return nil
}

// noSubscription is a Router subscription under a Local.
type noSubscription struct{}

func (noSubscription) Unsubscribe() error { return nil }
