package gateway

import (
	"context"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
)

type namedSubscriber struct{ name string }

func (*namedSubscriber) deliver(bus.Event) {}

// An add whose subscription NATS never confirms fails within its context
// and leaves nothing subscribed: its caller never joins the conversation,
// so a subscriber left behind would buffer the conversation's events (and
// keep its NATS subscription) for good.
func TestHubAddThatFailsSubscribesNothing(t *testing.T) {
	server := bustest.Start(t)
	b, cut := bustest.OpenCuttable(t, server.Conn().ConnectedUrl())
	h := newHub(b, func(string) {})
	defer h.close()
	kept := &namedSubscriber{"kept"}
	if err := h.add(t.Context(), "c", kept); err != nil {
		t.Fatal(err)
	}
	cut.Cut()
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	if err := h.add(ctx, "c", &namedSubscriber{"failed"}); err == nil {
		t.Fatal("an add with NATS cut off succeeded")
	}
	if err := h.add(ctx, "d", &namedSubscriber{"failed, alone"}); err == nil {
		t.Fatal("an add with NATS cut off succeeded")
	}
	cut.Restore()
	subs := h.subscribers("")
	if len(subs) != 1 || len(subs["c"]) != 1 || subs["c"][0] != kept {
		t.Fatalf("after two failed adds the hub holds %v, want only the first subscriber", subs)
	}
}
