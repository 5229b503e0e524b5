package bus

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
)

// Router delivers the live events of many conversation subscriptions
// through a fixed set of goroutines: a conversation's events always go
// through the same shard, in publish order. A subscription therefore costs
// no goroutine of its own, which matters when every idle connection of a
// gateway follows its own conversation.
type Router struct {
	b         *Bus
	fn        func(Event)
	seed      maphash.Seed
	shards    []chan *nats.Msg
	done      chan struct{}
	closeOnce sync.Once
	wg        sync.WaitGroup

	mu       sync.Mutex
	barriers map[*nats.Msg]chan struct{} // marker → closed when its shard reaches it; guarded by mu
	lost     func(conversationID string) // see OnLoss; guarded by mu
	watching map[*nats.Subscription]bool // slow subscriptions being watched; guarded by mu
}

var errRouterClosed = errors.New("router closed")

// barrierSubject marks a barrier message; no event subject looks like it.
const barrierSubject = "_tokenrelay.barrier"

// Barrier returns once every message received before the call has been
// handed to fn (each shard reaches a marker queued behind them), or when
// ctx is done.
func (r *Router) Barrier(ctx context.Context) error {
	// Messages in flight from the server are received first.
	if err := r.b.nc.FlushWithContext(ctx); err != nil {
		return err
	}
	var waits []chan struct{}
	for _, ch := range r.shards {
		m := &nats.Msg{Subject: barrierSubject}
		w := make(chan struct{})
		r.mu.Lock()
		r.barriers[m] = w
		r.mu.Unlock()
		select {
		case ch <- m:
		case <-ctx.Done():
			return ctx.Err()
		case <-r.done:
			return errRouterClosed
		}
		waits = append(waits, w)
	}
	for _, w := range waits {
		select {
		case <-w:
		case <-ctx.Done():
			return ctx.Err()
		case <-r.done:
			return errRouterClosed
		}
	}
	return nil
}

// NewRouter starts shards goroutines calling fn with the events of the
// conversations subscribed through the router; each shard buffers up to
// buffer messages (past that NATS drops them and the subscriber repairs the
// gap from the stream). Close stops it. Under a Local, fn is instead called
// on the goroutine that announces the event (see Local), so a
// conversation's events may come from more than one goroutine, each turn's
// still in order; fn must not block either way.
func (b *Bus) NewRouter(shards, buffer int, fn func(Event)) *Router {
	r := &Router{b: b, fn: fn, seed: maphash.MakeSeed(), shards: make([]chan *nats.Msg, shards), done: make(chan struct{}),
		barriers: make(map[*nats.Msg]chan struct{})}
	if b.cfg.Local != nil {
		buffer = 1 // events do not pass through the shards, only Barrier's markers
	}
	for i := range r.shards {
		ch := make(chan *nats.Msg, buffer)
		r.shards[i] = ch
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			for {
				select {
				case <-r.done:
					return
				case m := <-ch:
					if m.Subject == barrierSubject {
						r.mu.Lock()
						close(r.barriers[m])
						delete(r.barriers, m)
						r.mu.Unlock()
						continue
					}
					e, err := DecodeEvent(m.Subject, m.Data)
					if err != nil {
						continue
					}
					r.fn(e)
				}
			}
		}()
	}
	if b.cfg.Local != nil {
		b.cfg.Local.attach(r)
		return r
	}
	r.watchLosses()
	return r
}

// OnLoss sets fn to be told when live events may have been lost with
// nothing after them to reveal it: fn(c) when NATS dropped messages of
// conversation c's subscription (its shard was full), fn("") when the
// connection to NATS was lost and is back (whatever was published
// meanwhile never arrived). fn is called on its own goroutine once every
// event received before the loss was noticed has been handed on, and once
// the subscriptions are in place again, so a read of the stream made by fn
// sees everything the live route will not bring.
//
// A lost delta is revealed by the next one; a lost turn end is not, and
// fn is the subscriber's chance to read it from the stream. Under a Local
// nothing is reported: ends are never dropped there.
func (r *Router) OnLoss(fn func(conversationID string)) {
	r.mu.Lock()
	r.lost = fn
	r.mu.Unlock()
}

// lossRecheck is how long after reporting a slow subscription's loss the
// router looks again at its drop count: drops that went on meanwhile are
// reported once more.
const lossRecheck = 250 * time.Millisecond

// watchLosses chains the router's loss reports to the connection's
// reconnect and asynchronous error handlers, keeping those already set.
func (r *Router) watchLosses() {
	nc := r.b.nc
	prevReconnect := nc.ReconnectHandler()
	nc.SetReconnectHandler(func(c *nats.Conn) {
		if prevReconnect != nil {
			prevReconnect(c)
		}
		go r.reportLoss("", nil)
	})
	prevErr := nc.ErrorHandler()
	nc.SetErrorHandler(func(c *nats.Conn, sub *nats.Subscription, err error) {
		if prevErr != nil {
			prevErr(c, sub, err)
		}
		if sub == nil || !errors.Is(err, nats.ErrSlowConsumer) || !strings.HasPrefix(sub.Subject, eventPrefix) {
			return
		}
		r.mu.Lock()
		watched := r.watching[sub]
		if !watched {
			if r.watching == nil {
				r.watching = make(map[*nats.Subscription]bool)
			}
			r.watching[sub] = true
		}
		r.mu.Unlock()
		if !watched {
			conv := Untoken(strings.TrimSuffix(strings.TrimPrefix(sub.Subject, eventPrefix), ".>"))
			go r.reportLoss(conv, sub)
		}
	})
}

// reportLoss waits until what was received before is handed on, then
// reports the loss; for a slow subscription, again for as long as its drop
// count keeps growing (NATS reports a slow subscription once until one of
// its messages gets through).
func (r *Router) reportLoss(conv string, sub *nats.Subscription) {
	defer func() {
		if sub != nil {
			r.mu.Lock()
			delete(r.watching, sub)
			r.mu.Unlock()
		}
	}()
	for {
		select {
		case <-r.done:
			return
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := r.Barrier(ctx)
		cancel()
		var dropped int
		if sub != nil {
			dropped, _ = sub.Dropped()
		}
		r.mu.Lock()
		fn := r.lost
		r.mu.Unlock()
		if fn != nil && err == nil {
			fn(conv)
		}
		if sub == nil && err == nil {
			return
		}
		t := time.NewTimer(lossRecheck)
		select {
		case <-t.C:
		case <-r.done:
			t.Stop()
			return
		}
		if sub != nil && err == nil {
			if now, derr := sub.Dropped(); derr != nil || now == dropped {
				return // unsubscribed, or no drop since the report
			}
		}
	}
}

// Subscribe starts the live events of a conversation.
func (r *Router) Subscribe(conversationID string) (Subscription, error) {
	if r.b.cfg.Local != nil {
		return noSubscription{}, nil // every event comes through the Local
	}
	ch := r.shards[maphash.String(r.seed, conversationID)%uint64(len(r.shards))]
	sub, err := r.b.nc.ChanSubscribe(ConversationSubject(conversationID), ch)
	if err != nil {
		return nil, fmt.Errorf("subscribe conversation: %w", err)
	}
	return sub, nil
}

// Close stops the shard goroutines; a second Close only waits for them.
// The channels stay open (NATS may still hold a subscription writing to
// one); what arrives later is dropped.
func (r *Router) Close() {
	r.closeOnce.Do(func() {
		if r.b.cfg.Local != nil {
			r.b.cfg.Local.detach(r)
		}
		close(r.done)
	})
	r.wg.Wait()
}

// Flush returns once the server has processed every subscription made so
// far: events published after it reach them. Under a Local there is no
// server-side subscription to wait for. It gives up when ctx ends, or
// after flushTimeout when ctx has no deadline.
func (r *Router) Flush(ctx context.Context) error {
	if r.b.cfg.Local != nil {
		return nil
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, flushTimeout)
		defer cancel()
	}
	return r.b.nc.FlushWithContext(ctx)
}

// flushTimeout is how long Flush waits at most (nats.go's own default).
const flushTimeout = 10 * time.Second
