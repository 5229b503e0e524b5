package bus

import (
	"context"
	"fmt"
	"hash/maphash"
	"sync"

	"github.com/nats-io/nats.go"
)

// Router delivers the live events of many conversation subscriptions
// through a fixed set of goroutines: a conversation's events always go
// through the same shard, in publish order. A subscription therefore costs
// no goroutine of its own, which matters when every idle connection of a
// gateway follows its own conversation.
type Router struct {
	b      *Bus
	fn     func(Event)
	seed   maphash.Seed
	shards []chan *nats.Msg
	done   chan struct{}
	wg     sync.WaitGroup

	mu       sync.Mutex
	barriers map[*nats.Msg]chan struct{} // marker → closed when its shard reaches it; guarded by mu
}

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
		}
		waits = append(waits, w)
	}
	for _, w := range waits {
		select {
		case <-w:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// NewRouter starts shards goroutines calling fn with the events of the
// conversations subscribed through the router; each shard buffers up to
// buffer messages (past that NATS drops them and the subscriber repairs the
// gap from the stream). Close stops it.
func (b *Bus) NewRouter(shards, buffer int, fn func(Event)) *Router {
	r := &Router{b: b, fn: fn, seed: maphash.MakeSeed(), shards: make([]chan *nats.Msg, shards), done: make(chan struct{}),
		barriers: make(map[*nats.Msg]chan struct{})}
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
	}
	return r
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

// Close stops the shard goroutines. The channels stay open (NATS may still
// hold a subscription writing to one); what arrives later is dropped.
func (r *Router) Close() {
	if r.b.cfg.Local != nil {
		r.b.cfg.Local.detach(r)
	}
	close(r.done)
	r.wg.Wait()
}

// Flush returns once the server has processed every subscription made so
// far: events published after it reach them. Under a Local there is no
// server-side subscription to wait for.
func (r *Router) Flush() error {
	if r.b.cfg.Local != nil {
		return nil
	}
	return r.b.nc.Flush()
}
