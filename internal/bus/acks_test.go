package bus_test

import (
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
)

func TestPublishDeltaAsyncAnnouncesOnceStored(t *testing.T) {
	b := bustest.Start(t)
	live := make(chan bus.Event, 16)
	sub, err := b.SubscribeConversation("c.1", func(e bus.Event) { live <- e })
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := b.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	var pds []*bus.PendingDelta
	for i := int64(1); i <= 3; i++ {
		pd, err := b.PublishDeltaAsync(&bus.Event{Kind: bus.KindDelta, ConversationID: "c.1", TurnID: "t:1", Seq: i, Text: "w"}, nil)
		if err != nil {
			t.Fatal(err)
		}
		pds = append(pds, pd)
	}
	var last uint64
	for i, pd := range pds {
		sseq, done, err := pd.Result(t.Context(), true)
		if !done || err != nil || sseq <= last {
			t.Fatalf("delta %d: sseq %d done %v err %v (previous sseq %d)", i+1, sseq, done, err, last)
		}
		last = sseq
	}
	for want := int64(1); want <= 3; want++ {
		select {
		case e := <-live:
			if e.Kind != bus.KindDelta || e.Seq != want || e.TurnID != "t:1" {
				t.Fatalf("live event %+v, want delta %d of t:1", e, want)
			}
		case <-t.Context().Done():
			t.Fatal("no live announcement")
		}
	}
	var got []int64
	if err := b.ReadTurn(t.Context(), "c.1", "t:1", 0, func(e bus.Event) bool { got = append(got, e.Seq); return true }); err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 {
		t.Fatalf("stored seqs %v, want 1..3", got)
	}
}

func TestPublishDeltaAsyncFailures(t *testing.T) {
	b := bustest.Start(t)
	js, err := jetstream.New(b.Conn())
	if err != nil {
		t.Fatal(err)
	}
	if err := js.DeleteStream(t.Context(), bus.EventsStream); err != nil {
		t.Fatal(err)
	}
	delta := &bus.Event{Kind: bus.KindDelta, ConversationID: "c", TurnID: "t", Seq: 1, Text: "w"}

	// No stream: the server answers "no responders" at once.
	pd, err := b.PublishDeltaAsync(delta, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, done, err := pd.Result(t.Context(), true); !done || !errors.Is(err, nats.ErrNoResponders) {
		t.Fatalf("without a stream: done %v err %v, want no responders", done, err)
	}

	// Something takes the message but never answers: the delta fails once
	// its answer is overdue, so the publisher can store it again.
	mute, err := b.Conn().Subscribe("tr.evs.>", func(*nats.Msg) {})
	if err != nil {
		t.Fatal(err)
	}
	defer mute.Unsubscribe()
	if err := b.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	pd, err = b.PublishDeltaAsync(delta, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, done, err := pd.Result(t.Context(), true); !done || err == nil {
		t.Fatalf("unanswered: done %v err %v, want a timeout", done, err)
	}
	t.Logf("unanswered delta failed after %v", time.Since(start).Round(time.Millisecond))
}
