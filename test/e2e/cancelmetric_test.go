package e2e_test

import (
	"context"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/gateway"
	"github.com/tokenrelay/tokenrelay/internal/store"
	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// heldEndReads is the chat store as one gateway sees it: a read of a turn
// that has ended waits until the test lets it go.
type heldEndReads struct {
	store.Store
	release chan struct{}
}

func (s heldEndReads) Turn(ctx context.Context, id string) (chat.Turn, error) {
	t, err := s.Store.Turn(ctx, id)
	return s.hold(ctx, t, err)
}

func (s heldEndReads) TurnHead(ctx context.Context, id string) (chat.Turn, error) {
	t, err := s.Store.TurnHead(ctx, id)
	return s.hold(ctx, t, err)
}

// hold returns a read's result, once the test lets it go when the turn read
// has ended.
func (s heldEndReads) hold(ctx context.Context, t chat.Turn, err error) (chat.Turn, error) {
	if err == nil && t.Status.Terminal() {
		select {
		case <-s.release:
		case <-ctx.Done():
			return t, ctx.Err()
		}
	}
	return t, err
}

// tokenrelay_cancel_to_end_seconds is what a user who pressed Stop waits
// for: from the cancel to the turn's end reaching the gateway, and with it
// every connection of the conversation. The cancel's answer comes after
// the tombstone's round trip and a read of the ended turn from the store;
// here that read waits until the test lets it go (and outlasts wait: the
// request's own timeout would end it), and the histogram has its sample
// meanwhile.
func TestCancelToEndStopsWhenTheEndReachesTheGateway(t *testing.T) {
	server := bustest.Start(t)
	url := server.Conn().ConnectedUrl()
	st, a := storeAndAuth(t)

	runWorker(t, url, st)

	reg := prometheus.NewRegistry()
	held := heldEndReads{Store: st, release: make(chan struct{})}
	released := false
	release := func() {
		if !released {
			released = true
			close(held.release)
		}
	}
	t.Cleanup(release) // before the gateway shuts down
	ws := serveGateway(t, gateway.New(gateway.Config{Registry: reg, Gatherer: reg, RequestTimeout: 2 * wait}, bustest.Open(t, url), held, a))
	base := "http" + strings.TrimSuffix(strings.TrimPrefix(ws, "ws"), "/v1/ws")
	c := trtest.Dial(t, ws, nil)
	const conv = "stop-metric"
	c.Join(conv, nil)
	tr := startTurn(t, c, conv, "hello [sim tokens=1000 rate=50]", 2)

	c.Send(map[string]any{"type": "cancel", "turn_id": tr.ID, "id": "stop"})
	c.Until(wait, func(f trtest.Frame) bool {
		if f.Type() == "ack" && f.Str("id") == "stop" {
			t.Fatalf("the cancel was answered while the gateway's read of the ended turn was held: %v", f)
		}
		tr.Apply(f)
		return tr.Ends > 0
	})
	if tr.Status != string(chat.StatusCancelled) || len(tr.Errors) > 0 {
		t.Fatalf("turn ended %s, violations %v", tr.Status, tr.Errors)
	}
	trtest.WaitMetric(t, base, "tokenrelay_cancel_to_end_seconds_count", "", wait, func(v float64) bool { return v == 1 })

	release()
	acks := c.Until(wait, func(f trtest.Frame) bool { return f.Type() == "ack" && f.Str("id") == "stop" })
	if ack := acks[len(acks)-1]; ack.Str("status") != string(chat.StatusCancelled) {
		t.Fatalf("cancel answered %v, want cancelled", ack)
	}
	if n := trtest.Metric(t, base, "tokenrelay_cancel_to_end_seconds_count", ""); n != 1 {
		t.Fatalf("%v samples after the answer, want the one", n)
	}
}
