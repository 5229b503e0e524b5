package bus_test

import (
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
)

// lossReports returns a router on b whose first event blocks its shard
// until release is closed, the channel its loss reports arrive on and the
// kinds of the events it hands on.
func lossReports(t *testing.T, b *bus.Bus, buffer int, release <-chan struct{}) (*bus.Router, <-chan string, <-chan string) {
	t.Helper()
	lost := make(chan string, 16)
	got := make(chan string, 64)
	first := true
	r := b.NewRouter(1, buffer, func(e bus.Event) {
		if first {
			first = false
			<-release
		}
		select {
		case got <- e.Kind:
		default:
		}
	})
	t.Cleanup(r.Close)
	r.OnLoss(func(conv string) { lost <- conv })
	return r, lost, got
}

// receive returns the next value from ch, failing the test with failure
// when none comes within 10 s.
func receive[T any](t *testing.T, ch <-chan T, failure string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(10 * time.Second):
		t.Fatal(failure)
		var zero T
		return zero
	}
}

// A subscription whose shard overflows loses events, an end among them
// perhaps: the router reports the conversation once what it did receive
// has been handed on.
func TestRouterReportsDroppedEvents(t *testing.T) {
	b := bustest.Start(t)
	release := make(chan struct{})
	r, lost, _ := lossReports(t, b, 1, release)
	if _, err := r.Subscribe("c.1"); err != nil {
		t.Fatal(err)
	}
	if err := r.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	for i := int64(1); i <= 10; i++ {
		if _, err := b.PublishEvent(t.Context(), &bus.Event{Kind: bus.KindDelta, ConversationID: "c.1", TurnID: "t", Seq: i, Text: "w"}); err != nil {
			t.Fatal(err)
		}
	}
	// Every live event has reached the client (and most were dropped)
	// once a round trip to the server is done.
	if err := b.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	select {
	case conv := <-lost:
		t.Fatalf("loss of %q reported before the shard handed on what it holds", conv)
	default:
	}
	close(release)
	if conv := receive(t, lost, "no loss reported"); conv != "c.1" {
		t.Fatalf("loss reported for %q, want c.1", conv)
	}
}

// A connection to NATS that was lost and is back reports a loss of every
// conversation, once its subscriptions are in place again.
func TestRouterReportsReconnect(t *testing.T) {
	server := bustest.Start(t)
	b, cut := bustest.OpenCuttable(t, server.Conn().ConnectedUrl())
	release := make(chan struct{})
	close(release)
	r, lost, got := lossReports(t, b, 64, release)
	if _, err := r.Subscribe("c.1"); err != nil {
		t.Fatal(err)
	}
	if err := r.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	cut.Cut()
	// An end published while the connection is down never reaches it.
	if _, err := server.PublishEvent(t.Context(), &bus.Event{Kind: bus.KindEnd, ConversationID: "c.1", TurnID: "t", Status: "complete"}); err != nil {
		t.Fatal(err)
	}
	cut.Restore()
	if conv := receive(t, lost, "no loss reported"); conv != "" {
		t.Fatalf("loss reported for %q after a reconnect, want every conversation (\"\")", conv)
	}
	// The report comes once the subscription is in place again: what is
	// published from now on arrives.
	if _, err := server.PublishEvent(t.Context(), &bus.Event{Kind: bus.KindStart, ConversationID: "c.1", TurnID: "t2"}); err != nil {
		t.Fatal(err)
	}
	timeout := time.After(10 * time.Second)
	for {
		select {
		case kind := <-got:
			if kind == bus.KindStart {
				return
			}
		case <-timeout:
			t.Fatal("no live event after the reconnect")
		}
	}
}

// An end published while the publisher's connection is being re-established
// (whose announce NATS refuses at once, with no reconnect buffer, as the
// server's connections have none) is stored in the stream once the
// connection is back, and announced then: neither live subscribers nor
// readers of the stream miss it.
func TestEndPublishedWhileReconnecting(t *testing.T) {
	server := bustest.Start(t)
	down := make(chan struct{}, 1)
	c := &bustest.Cutter{}
	b := bustest.Open(t, server.Conn().ConnectedUrl(), nats.SetCustomDialer(c), nats.MaxReconnects(-1),
		nats.ReconnectWait(20*time.Millisecond), nats.ReconnectJitter(0, 0), nats.ReconnectBufSize(-1),
		nats.DisconnectErrHandler(func(*nats.Conn, error) {
			select {
			case down <- struct{}{}:
			default:
			}
		}))
	live := make(chan bus.Event, 4)
	sub, err := server.SubscribeConversation("c", func(e bus.Event) { live <- e })
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := server.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	c.Cut()
	<-down
	published := make(chan error, 1)
	go func() {
		_, err := b.PublishEvent(t.Context(), &bus.Event{Kind: bus.KindEnd, ConversationID: "c", TurnID: "t", Seq: 3, Status: "complete"})
		published <- err
	}()
	c.Restore()
	if err := <-published; err != nil {
		t.Fatalf("publish of an end while reconnecting: %v", err)
	}
	select {
	case e := <-live:
		if e.Kind != bus.KindEnd || e.TurnID != "t" {
			t.Fatalf("announced %+v, want the end", e)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the end was not announced")
	}
	stored := false
	if err := server.ReadTurn(t.Context(), "c", "t", 0, func(e bus.Event) bool {
		stored = stored || e.Kind == bus.KindEnd
		return true
	}); err != nil {
		t.Fatal(err)
	}
	if !stored {
		t.Fatal("the end is not in the stream")
	}
}
