package bus_test

import (
	"os"
	"testing"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
)

func TestReadTurnAcrossBatches(t *testing.T) {
	var b *bus.Bus
	if url := os.Getenv("TOKENRELAY_TEST_NATS_URL"); url != "" {
		b = bustest.Open(t, url) // e.g. an older nats-server, which answers one event per request
	} else {
		b = bustest.Start(t)
	}
	turn, other := "t:"+t.Name(), "u:"+t.Name()
	publish := func(turnID, kind string, seq int64) uint64 {
		t.Helper()
		sseq, err := b.PublishEvent(t.Context(), &bus.Event{Kind: kind, ConversationID: "c", TurnID: turnID, Seq: seq, Text: "w", Status: "complete"})
		if err != nil {
			t.Fatal(err)
		}
		return sseq
	}
	first := publish(turn, bus.KindStart, 0)
	var mid uint64
	const deltas = 600 // more than two batches
	for i := int64(1); i <= deltas; i++ {
		sseq := publish(turn, bus.KindDelta, i)
		if i == 300 {
			mid = sseq
		}
		if i%7 == 0 {
			publish(other, bus.KindDelta, i) // another turn's events in between
		}
	}
	publish(turn, bus.KindEnd, deltas)

	read := func(from uint64, stopAfter int) []bus.Event {
		t.Helper()
		var got []bus.Event
		err := b.ReadTurn(t.Context(), "c", turn, from, func(e bus.Event) bool {
			got = append(got, e)
			return len(got) != stopAfter
		})
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	all := read(first, 0)
	if len(all) != deltas+2 || all[0].Kind != bus.KindStart || all[len(all)-1].Kind != bus.KindEnd {
		t.Fatalf("read %d events, want start, %d deltas, end", len(all), deltas)
	}
	for i, e := range all[1 : deltas+1] {
		if e.TurnID != turn || e.Seq != int64(i+1) || e.StreamSeq <= all[i].StreamSeq {
			t.Fatalf("event %d: %+v after stream seq %d", i+1, e, all[i].StreamSeq)
		}
	}
	if tail := read(mid, 0); len(tail) != deltas-300+2 || tail[0].Seq != 300 {
		t.Fatalf("from delta 300's sequence: %d events starting at seq %d", len(tail), tail[0].Seq)
	}
	if some := read(first, 10); len(some) != 10 {
		t.Fatalf("fn stopped after 10, got %d", len(some))
	}
	if none := read(all[len(all)-1].StreamSeq+1, 0); len(none) != 0 {
		t.Fatalf("past the end: %d events", len(none))
	}
	var unknown int
	if err := b.ReadTurn(t.Context(), "c", "nobody", 1, func(bus.Event) bool { unknown++; return true }); err != nil || unknown != 0 {
		t.Fatalf("unknown turn: %d events, %v", unknown, err)
	}
}
