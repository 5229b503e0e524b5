package gateway

import (
	"context"
	"sync"

	"github.com/tokenrelay/tokenrelay/internal/bus"
)

// subscriber receives a conversation's live events. deliver is called, in
// publish order per turn, from the conversation's bus subscription
// goroutine (or, in serve, the goroutine that announced the event: see
// bus.Local), and must not block.
type subscriber interface {
	deliver(e bus.Event)
}

// hub shares one bus subscription per conversation among all the local
// subscribers joined to it. Events arrive through a bus.Router: a fixed set
// of goroutines, each conversation always on the same one, in order.
type hub struct {
	router *bus.Router

	mu     sync.RWMutex
	topics map[string]*topic // conversation id → topic; guarded by mu
}

type topic struct {
	sub bus.Subscription

	mu   sync.Mutex
	subs []subscriber // guarded by mu
	// view is a copy of subs, replaced (never modified) on every change, so
	// a delivery iterates it without holding mu.
	view []subscriber // guarded by mu
}

// hubShards is how many goroutines deliver live events; each buffers up to
// hubShardBuffer messages before NATS drops (and views repair the gap).
const (
	hubShards      = 8
	hubShardBuffer = 1 << 16
)

// newHub starts the hub's router; lost is called as bus.Router.OnLoss says.
func newHub(b *bus.Bus, lost func(conversationID string)) *hub {
	h := &hub{topics: make(map[string]*topic)}
	h.router = b.NewRouter(hubShards, hubShardBuffer, h.dispatch)
	h.router.OnLoss(lost)
	return h
}

// subscribers returns the subscribers of conversation id, or of every
// conversation when id is "", by conversation.
func (h *hub) subscribers(id string) map[string][]subscriber {
	h.mu.RLock()
	defer h.mu.RUnlock()
	out := make(map[string][]subscriber)
	for conv, t := range h.topics {
		if id != "" && conv != id {
			continue
		}
		t.mu.Lock()
		out[conv] = t.view
		t.mu.Unlock()
	}
	return out
}

// dispatch hands one event to the conversation's subscribers.
func (h *hub) dispatch(e bus.Event) {
	h.mu.RLock()
	t := h.topics[e.ConversationID]
	h.mu.RUnlock()
	if t == nil {
		return
	}
	t.mu.Lock()
	view := t.view
	t.mu.Unlock()
	for _, s := range view {
		s.deliver(e)
	}
}

// close stops delivery.
func (h *hub) close() { h.router.Close() }

// barrier returns once every event received from the bus before the call
// has been handed to the subscribers.
func (h *hub) barrier(ctx context.Context) error { return h.router.Barrier(ctx) }

// add subscribes s to conversation id's events. Events published after add
// returns reach s. When it fails, s is not subscribed.
func (h *hub) add(ctx context.Context, conversationID string, s subscriber) error {
	if err := h.subscribe(conversationID, s); err != nil {
		return err
	}
	// Make sure the server has the subscription before anything is read
	// from the store: otherwise an event published in between is lost.
	// Outside the hub's lock: joins of other conversations do not wait.
	if err := h.router.Flush(ctx); err != nil {
		// Left subscribed, s would buffer the conversation's events for
		// good: its caller never joined it.
		h.remove(conversationID, s)
		return err
	}
	return nil
}

// subscribe adds s to conversation id's subscribers.
func (h *hub) subscribe(conversationID string, s subscriber) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	t := h.topics[conversationID]
	if t == nil {
		t = &topic{}
		sub, err := h.router.Subscribe(conversationID)
		if err != nil {
			return err
		}
		t.sub = sub
		h.topics[conversationID] = t
	}
	t.mu.Lock()
	t.subs = append(t.subs, s)
	t.view = append([]subscriber(nil), t.subs...)
	t.mu.Unlock()
	return nil
}

// remove unsubscribes s; the last subscriber of a conversation closes its
// bus subscription.
func (h *hub) remove(conversationID string, s subscriber) {
	h.mu.Lock()
	defer h.mu.Unlock()
	t := h.topics[conversationID]
	if t == nil {
		return
	}
	t.mu.Lock()
	for i, x := range t.subs {
		if x == s {
			t.subs = append(t.subs[:i], t.subs[i+1:]...)
			break
		}
	}
	t.view = append([]subscriber(nil), t.subs...)
	empty := len(t.subs) == 0
	t.mu.Unlock()
	if empty {
		_ = t.sub.Unsubscribe()
		delete(h.topics, conversationID)
	}
}
