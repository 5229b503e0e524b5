package gateway

import (
	"errors"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/store"
	"github.com/tokenrelay/tokenrelay/internal/store/sqlite"
)

// A view still follows a turn of a conversation that was deleted (its end
// was never published: the worker's was refused with the rows gone). Once
// the ids of deleted turns are forgotten another user may take the turn's
// id in a conversation of their own: the quiet sweep's store read must not
// hand that user's reply to the view, and stops following the turn.
func TestStoredEndOfATurnIDTakenElsewhere(t *testing.T) {
	ctx := t.Context()
	st, err := sqlite.Open(ctx, filepath.Join(t.TempDir(), "tokenrelay.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	s := &Server{store: st, log: slog.New(slog.DiscardHandler)}
	now := time.Now()
	if _, err := st.Send(ctx, store.SendRequest{ConversationID: "mine", Owner: "alice", MessageID: "m1", TurnID: "t1", Text: "hi", Now: now}); err != nil {
		t.Fatal(err)
	}
	cu := catchUpResult{From: 1, To: 0, ToLen: 0}
	if got, err := s.storedEnd(ctx, "mine", "t1", cu, chat.Turn{}, false); err != nil || got.End != nil {
		t.Fatalf("a queued turn: end %v, err %v; want neither", got.End, err)
	}
	if err := st.DeleteConversation(ctx, "mine", "alice"); err != nil {
		t.Fatal(err)
	}
	if _, err := st.ForgetDeletedTurns(ctx, now.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Send(ctx, store.SendRequest{ConversationID: "theirs", Owner: "bob", MessageID: "m1", TurnID: "t1", Text: "hi", Now: now}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := st.FinishTurn(ctx, store.TurnResult{TurnID: "t1", Status: chat.StatusComplete, Content: "bob's secret", Seq: 2, Now: now}); err != nil {
		t.Fatal(err)
	}
	for _, known := range []bool{false, true} {
		head := chat.Turn{}
		if known {
			if head, err = st.TurnHead(ctx, "t1"); err != nil {
				t.Fatal(err)
			}
		}
		got, err := s.storedEnd(ctx, "mine", "t1", cu, head, known)
		if got.End != nil || len(got.Text) > 0 || !errors.Is(err, chat.ErrNotFound) {
			t.Fatalf("known head %v: text %q, end %v, err %v; want nothing and not found", known, got.Text, got.End, err)
		}
	}
	// The turn's own conversation still gets its stored end.
	got, err := s.storedEnd(ctx, "theirs", "t1", cu, chat.Turn{}, false)
	if err != nil || got.End == nil || string(got.Text) != "bob's secret" || got.End.Seq != 2 {
		t.Fatalf("own conversation: text %q, end %+v, err %v", got.Text, got.End, err)
	}
}
