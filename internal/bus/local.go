package bus

import (
	"hash/maphash"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/nats-io/nats.go"
)

// Local carries live events from the producers of one process to its own
// gateway without a round trip through NATS. serve uses it when its
// embedded NATS server accepts no other process (no --nats-listen, no
// --nats-url): its gateway is then the only live subscriber there can be.
//
// With a Local, every Bus sharing it hands each live event to the Router
// made on one of them instead of publishing it: a delta costs no NATS
// publish, no server-side routing and no parse on the way back. Starts and
// ends are published on NATS as well, for SubscribeTurnEnd. The Router
// makes no NATS subscriptions: it receives every conversation's events and
// its callback drops those nobody follows, as a NATS subscription would
// never have delivered them.
type Local struct {
	mu      sync.RWMutex
	router  *Router // guarded by mu
	dropped atomic.Uint64
	full    func(kind string) // test hook: called when a shard is full
}

// NewLocal returns a Local to put in the Config of every Bus of a process.
func NewLocal() *Local { return &Local{} }

// Dropped counts events lost because the router's shard was full; the
// gateway repairs such gaps from the stream as it does for NATS drops.
func (l *Local) Dropped() uint64 { return l.dropped.Load() }

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

// deliver hands one live event to the router. A delta never blocks: a full
// shard drops it, as NATS drops messages for a slow subscriber, and the
// view repairs the gap when the next delta or the end arrives. A start or
// an end (two per turn) waits for room instead: nothing would follow an
// end to reveal that it was lost.
func (l *Local) deliver(liveSubj string, data []byte, kind string) {
	l.mu.RLock()
	r := l.router
	l.mu.RUnlock()
	if r == nil {
		return
	}
	conv, _, _ := strings.Cut(strings.TrimPrefix(liveSubj, eventPrefix), ".")
	ch := r.shards[maphash.String(r.seed, conv)%uint64(len(r.shards))]
	m := &nats.Msg{Subject: liveSubj, Data: data}
	if l.full != nil && len(ch) == cap(ch) {
		l.full(kind)
	}
	if kind != KindDelta {
		select {
		case ch <- m:
		case <-r.done:
		}
		return
	}
	select {
	case ch <- m:
	default:
		l.dropped.Add(1)
	}
}

// announce makes a stored event live: through the Local when there is one
// (deltas only there), else on NATS.
func (b *Bus) announce(storedSubj string, data []byte, kind string) error {
	live := liveSubject(storedSubj)
	if b.cfg.Local != nil {
		b.cfg.Local.deliver(live, data, kind)
		if kind == KindDelta {
			return nil
		}
	}
	return b.nc.Publish(live, data)
}

// noSubscription is a Router subscription under a Local.
type noSubscription struct{}

func (noSubscription) Unsubscribe() error { return nil }
