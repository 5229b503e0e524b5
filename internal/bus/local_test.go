package bus_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/tokenrelay/tokenrelay/internal/bus"
)

// Two buses of one process share a Local: the producer's live events reach
// the other's router without NATS, once each, in order; ends are also
// published on NATS for SubscribeTurnEnd.
func TestLocalCarriesLiveEventsInProcess(t *testing.T) {
	local, producer, gateway := localPair(t)

	got := make(chan bus.Event, 64)
	r := gateway.NewRouter(2, 64, func(e bus.Event) { got <- e })
	defer r.Close()
	if _, err := r.Subscribe("c.1"); err != nil {
		t.Fatal(err)
	}
	// Deltas do not go through NATS at all.
	var natsDeltas atomic.Int64
	spy, err := gateway.Conn().Subscribe(bus.EventSubject("c.1", "t:1", bus.KindDelta), func(*nats.Msg) { natsDeltas.Add(1) })
	if err != nil {
		t.Fatal(err)
	}
	defer spy.Unsubscribe()
	ends := make(chan bus.Event, 1)
	sub, err := gateway.SubscribeTurnEnd("c.1", "t:1", func(e bus.Event) { ends <- e })
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := gateway.Conn().Flush(); err != nil {
		t.Fatal(err)
	}

	if _, err := producer.PublishEvent(t.Context(), &bus.Event{Kind: bus.KindStart, ConversationID: "c.1", TurnID: "t:1"}); err != nil {
		t.Fatal(err)
	}
	for i := int64(1); i <= 20; i++ {
		if _, err := producer.PublishDeltaAsync(&bus.Event{Kind: bus.KindDelta, ConversationID: "c.1", TurnID: "t:1", Seq: i, Text: "w"}); err != nil {
			t.Fatal(err)
		}
	}
	// The end follows every delta's acknowledgement, as the worker's does.
	next := func() bus.Event {
		t.Helper()
		select {
		case e := <-got:
			return e
		case <-t.Context().Done():
			t.Fatal("no live event")
			return bus.Event{}
		}
	}
	if e := next(); e.Kind != bus.KindStart {
		t.Fatalf("first event %+v, want the start", e)
	}
	for want := int64(1); want <= 20; want++ {
		if e := next(); e.Kind != bus.KindDelta || e.Seq != want {
			t.Fatalf("event %+v, want delta %d", e, want)
		}
	}
	if _, err := producer.PublishEvent(t.Context(), &bus.Event{Kind: bus.KindEnd, ConversationID: "c.1", TurnID: "t:1", Seq: 20, Status: "complete"}); err != nil {
		t.Fatal(err)
	}
	if e := next(); e.Kind != bus.KindEnd || e.Seq != 20 {
		t.Fatalf("event %+v, want the end", e)
	}
	select {
	case e := <-ends:
		if e.Seq != 20 {
			t.Fatalf("SubscribeTurnEnd got %+v", e)
		}
	case <-t.Context().Done():
		t.Fatal("the end was not published on NATS")
	}
	// Nothing came twice.
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := r.Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case e := <-got:
		t.Fatalf("extra event %+v", e)
	default:
	}
	if err := producer.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	if err := gateway.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	if n := natsDeltas.Load(); n != 0 {
		t.Fatalf("%d deltas were published on NATS", n)
	}
	if n := local.Dropped(); n != 0 {
		t.Fatalf("%d events dropped", n)
	}
}

// localPair starts an embedded server that accepts no other process and
// opens two buses on it sharing a Local, as serve does.
func localPair(t *testing.T) (*bus.Local, *bus.Bus, *bus.Bus) {
	t.Helper()
	emb, err := bus.StartEmbedded(bus.EmbeddedConfig{Options: &server.Options{
		JetStream: true, StoreDir: t.TempDir(), NoLog: true, NoSigs: true, DontListen: true,
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(emb.Shutdown)
	local := bus.NewLocal()
	open := func(name string) *bus.Bus {
		nc, err := nats.Connect(emb.Server.ClientURL(), nats.InProcessServer(emb.Server), nats.Name(name))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		b, err := bus.Open(t.Context(), nc, bus.Config{AckWait: 2 * time.Second, Local: local})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	return local, open("worker"), open("gateway")
}

// A router that falls behind loses deltas (repaired from the stream by the
// view) but never an end: the end's publisher waits for room.
func TestLocalKeepsEndsWhenTheRouterIsFull(t *testing.T) {
	local, producer, gateway := localPair(t)
	full := make(chan string, 64)
	bus.SetLocalFullHook(local, func(kind string) { full <- kind })
	release := make(chan struct{})
	got := make(chan bus.Event, 64)
	r := gateway.NewRouter(1, 1, func(e bus.Event) {
		if e.Kind == bus.KindStart {
			<-release // the router is stuck on the start
		}
		got <- e
	})
	defer r.Close()
	if _, err := producer.PublishEvent(t.Context(), &bus.Event{Kind: bus.KindStart, ConversationID: "c", TurnID: "t"}); err != nil {
		t.Fatal(err)
	}
	// The end follows every delta's acknowledgement, as the worker's does.
	for i := int64(1); i <= 3; i++ {
		pd, err := producer.PublishDeltaAsync(&bus.Event{Kind: bus.KindDelta, ConversationID: "c", TurnID: "t", Seq: i, Text: "w"})
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := pd.Result(t.Context(), true); err != nil {
			t.Fatal(err)
		}
	}
	ended := make(chan error, 1)
	go func() {
		_, err := producer.PublishEvent(t.Context(), &bus.Event{Kind: bus.KindEnd, ConversationID: "c", TurnID: "t", Seq: 3, Status: "complete"})
		ended <- err
	}()
	// The end meets the full shard (deltas met it before).
	for kind := range full {
		if kind == bus.KindEnd {
			break
		}
	}
	close(release)
	if err := <-ended; err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := r.Barrier(ctx); err != nil {
		t.Fatal(err)
	}
	close(got)
	var kinds []string
	for e := range got {
		kinds = append(kinds, e.Kind)
	}
	if len(kinds) == 0 || kinds[len(kinds)-1] != bus.KindEnd {
		t.Fatalf("router got %v: the end was lost", kinds)
	}
	if local.Dropped() == 0 {
		t.Fatal("no delta was dropped with the router's one-slot shard full")
	}
}
