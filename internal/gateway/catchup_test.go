package gateway

import (
	"context"
	"testing"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
	"github.com/tokenrelay/tokenrelay/internal/chat"
)

// Under serve's delta journal the stream holds a turn's start and end but
// none of its deltas, which the turn's snapshot saves before its end is
// stored. A catch-up that reads the snapshot head just before the turn's
// last snapshot is written, and the stream just after its end is stored,
// finds the end without the text: it reads again, and finds the text.
func TestCatchUpReadsAgainWhenTheTurnEndsBetweenItsReads(t *testing.T) {
	b := bustest.StartJournaled(t)
	s := New(Config{QuietCheck: -1}, b, nil, nil)
	t.Cleanup(func() { _ = s.Shutdown(context.Background()) })

	// A turn of three journaled deltas, ended: its end is in the stream,
	// its snapshot not yet.
	snap := b.NewSnapshotWriter("c", "t")
	text := ""
	for i, tok := range []string{"one ", "two ", "three"} {
		e := &bus.Event{Kind: bus.KindDelta, ConversationID: "c", TurnID: "t", Seq: int64(i + 1), Off: int64(len(text)), Text: tok}
		if _, err := b.PublishDeltaAsync(e, nil); err != nil {
			t.Fatal(err)
		}
		text += tok
		snap.Record(len(text))
	}
	if _, err := b.PublishEvent(t.Context(), &bus.Event{Kind: bus.KindEnd, ConversationID: "c", TurnID: "t", Seq: 3, Status: chat.StatusComplete}); err != nil {
		t.Fatal(err)
	}
	// The snapshot lands right after catch-up's first read of the head.
	var wrote bool
	testHookHeadRead = func() {
		if !wrote {
			wrote = true
			if err := snap.Write(t.Context(), []byte(text), 3, 0, chat.StatusComplete); err != nil {
				t.Error(err)
			}
		}
	}
	defer func() { testHookHeadRead = nil }()

	res, err := s.catchUp(t.Context(), "c", "t", 0, -1)
	if err != nil {
		t.Fatal(err)
	}
	if string(res.Text) != text || res.From != 1 || res.To != 3 || res.ToLen != int64(len(text)) || res.End == nil || res.Missed {
		t.Fatalf("catch-up %q from %d to %d (len %d), end %v, missed %v; want %q from 1 to 3 and the end",
			res.Text, res.From, res.To, res.ToLen, res.End != nil, res.Missed, text)
	}
}

// A turn id of a deleted conversation may be taken again by another
// conversation's turn once the id is let go (store.ForgetDeletedTurns): a
// catch-up for a view still following the old turn finds the new turn's
// snapshot, and must not send its text; it reads the old turn's stream
// alone, as if it had no snapshot.
func TestCatchUpOfATurnIDTakenByAnotherConversation(t *testing.T) {
	b := bustest.StartJournaled(t)
	s := New(Config{QuietCheck: -1}, b, nil, nil)
	t.Cleanup(func() { _ = s.Shutdown(context.Background()) })
	snap := b.NewSnapshotWriter("bobs", "t")
	text := "bob's own words"
	snap.Record(len(text))
	if err := snap.Write(t.Context(), []byte(text), 1, 0, chat.StatusComplete); err != nil {
		t.Fatal(err)
	}
	if res, err := s.catchUp(t.Context(), "bobs", "t", 0, -1); err != nil || string(res.Text) != text {
		t.Fatalf("catch-up in the turn's own conversation: %q, %v", res.Text, err)
	}
	res, err := s.catchUp(t.Context(), "alices", "t", 0, -1)
	if err != nil || len(res.Text) > 0 || res.To != 0 {
		t.Fatalf("catch-up of the turn from another conversation: %q to %d, %v; want nothing", res.Text, res.To, err)
	}
}
