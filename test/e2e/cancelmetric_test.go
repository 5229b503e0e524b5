package e2e_test

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/gateway"
	"github.com/tokenrelay/tokenrelay/internal/store"
	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// countedReads is the chat store as one gateway sees it, counting the
// gateway's reads of a turn.
type countedReads struct {
	store.Store
	reads *atomic.Int64
}

func (s countedReads) Turn(ctx context.Context, id string) (chat.Turn, error) {
	s.reads.Add(1)
	return s.Store.Turn(ctx, id)
}

func (s countedReads) TurnHead(ctx context.Context, id string) (chat.Turn, error) {
	s.reads.Add(1)
	return s.Store.TurnHead(ctx, id)
}

// A Stop of a streaming turn reads the turn from the store once: it listens
// for the turn's end before that read, so the end, stored after it, comes
// as an event with the stored status and needs no second look. Every read
// saved is one less wait behind the store's writes under load.
// tokenrelay_cancel_to_end_seconds has the cancel's one sample by the answer.
func TestCancelOfAStreamingTurnReadsItOnce(t *testing.T) {
	server := bustest.Start(t)
	url := server.Conn().ConnectedUrl()
	st, a := storeAndAuth(t)

	runWorker(t, url, st)

	reg := prometheus.NewRegistry()
	var reads atomic.Int64
	ws := serveGateway(t, gateway.New(gateway.Config{Registry: reg, Gatherer: reg}, bustest.Open(t, url), countedReads{Store: st, reads: &reads}, a))
	base := "http" + strings.TrimSuffix(strings.TrimPrefix(ws, "ws"), "/v1/ws")
	c := trtest.Dial(t, ws, nil)
	const conv = "stop-reads"
	c.Join(conv, nil)
	tr := startTurn(t, c, conv, "hello [sim tokens=1000 rate=50]", 2)

	reads.Store(0)
	c.Send(map[string]any{"type": "cancel", "turn_id": tr.ID, "id": "stop"})
	ack := ackOf(t, c, "stop", tr)
	if ack.Type() != "ack" || ack.Str("status") != string(chat.StatusCancelled) || ack["already"] != false {
		t.Fatalf("cancel answered %v, want cancelled, not already", ack)
	}
	if n := reads.Load(); n != 1 {
		t.Fatalf("the cancel read the turn %d times, want once", n)
	}
	finish(t, c, tr)
	if tr.Status != string(chat.StatusCancelled) {
		t.Fatalf("turn ended %s", tr.Status)
	}
	if n := trtest.Metric(t, base, "tokenrelay_cancel_to_end_seconds_count", ""); n != 1 {
		t.Fatalf("%v samples of the cancel's wait, want one", n)
	}
}

// A turn cancelled while queued is ended by the gateway, not a worker, and
// counts under tokenrelay_turns_total all the same: every turn sent ends
// there once.
func TestQueuedCancelCountsAsATurnEnded(t *testing.T) {
	p, c := queuedTurn(t)
	c.Send(map[string]any{"type": "cancel", "turn_id": "queued-turn", "id": "3"})
	if f := c.Until(wait, func(f trtest.Frame) bool { return f.Str("id") == "3" }); f[len(f)-1].Str("status") != "cancelled" {
		t.Fatalf("cancel: %v", f[len(f)-1])
	}
	if n := trtest.Metric(t, p.URL, "tokenrelay_turns_total", `status="cancelled"`); n != 1 {
		t.Fatalf("tokenrelay_turns_total{status=\"cancelled\"} = %v after a queued turn's cancel, want 1", n)
	}
}

// unreadableTurns is the chat store with its turns unreadable, as when the
// store cannot be reached.
type unreadableTurns struct{ store.Store }

func (unreadableTurns) TurnHead(context.Context, string) (chat.Turn, error) {
	return chat.Turn{}, fmt.Errorf("read turn: %w", chat.ErrUnavailable)
}

// A cancel that fails because the store cannot read the turn is answered
// unavailable, and is not counted as a cancel of an unknown turn: an
// outage must not pass for clients stopping turns that do not exist.
func TestCancelOfAnUnreadableTurnIsNotCountedNotFound(t *testing.T) {
	server := bustest.Start(t)
	st, a := storeAndAuth(t)
	reg := prometheus.NewRegistry()
	ws := serveGateway(t, gateway.New(gateway.Config{Registry: reg, Gatherer: reg}, bustest.Open(t, server.Conn().ConnectedUrl()), unreadableTurns{st}, a))
	base := "http" + strings.TrimSuffix(strings.TrimPrefix(ws, "ws"), "/v1/ws")
	var answer map[string]map[string]string
	if code := trtest.Do(t, "POST", base+"/v1/turns/some-turn/cancel", "", nil, &answer); code != 503 || answer["error"]["code"] != "unavailable" {
		t.Fatalf("cancel with the store unreadable: %d %v, want 503 unavailable", code, answer)
	}
	if n := trtest.Metric(t, base, "tokenrelay_cancel_requests_total", `outcome="not_found"`); n != 0 {
		t.Fatalf("tokenrelay_cancel_requests_total{outcome=\"not_found\"} = %v for a cancel the store could not answer, want 0", n)
	}
}
