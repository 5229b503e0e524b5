package bus

import (
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
// through a router shard and nothing is ever dropped. Starts and ends are
// published on NATS as well, for SubscribeTurnEnd. The Router makes no
// NATS subscriptions: it receives every conversation's events and its
// callback drops those nobody follows, as a NATS subscription would never
// have delivered them.
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
}

// NewLocal returns a Local to put in the Config of every Bus of a process.
func NewLocal() *Local { return &Local{} }

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
// block (see NewRouter). The read lock is held meanwhile, so once the
// router's Close has detached it no callback is running or will run.
func (l *Local) deliver(e *Event) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.router == nil {
		return
	}
	live := *e
	live.StreamSeq = 0 // as a live NATS delivery has none
	l.router.fn(live)
}

// announce makes a stored event live: through the Local when there is one
// (deltas only there), else on NATS. data is e encoded.
func (b *Bus) announce(e *Event, data []byte) error {
	if b.cfg.Local != nil {
		b.cfg.Local.deliver(e)
		if e.Kind == KindDelta {
			return nil
		}
	}
	return b.nc.Publish(e.Subject(), data)
}

// noSubscription is a Router subscription under a Local.
type noSubscription struct{}

func (noSubscription) Unsubscribe() error { return nil }
