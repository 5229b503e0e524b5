package compat_test

import (
	"fmt"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/store"
	"github.com/tokenrelay/tokenrelay/internal/store/sqlite"
	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// storeExchanges stores n ended exchanges of session in the SQLite history
// in dataDir, before a server opens it, with ids that sort against the
// order they were sent in and every message in one millisecond, and
// returns the ids stored, oldest first.
func storeExchanges(t *testing.T, dataDir, session, owner string, n int) []string {
	t.Helper()
	st, err := sqlite.Open(t.Context(), filepath.Join(dataDir, "tokenrelay.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	now := time.Now()
	var ids []string
	for i := range n {
		msg, turn := fmt.Sprintf("m%05d", n-i), fmt.Sprintf("t%05d", n-i)
		_, err := st.Send(t.Context(), store.SendRequest{ConversationID: session, Owner: owner, MessageID: msg, TurnID: turn, Text: "question " + msg, Model: "sim", Now: now})
		if err != nil {
			t.Fatalf("Send %s: %v", msg, err)
		}
		if _, ok, err := st.FinishTurn(t.Context(), store.TurnResult{TurnID: turn, Status: chat.StatusComplete, Content: "answer " + turn, Seq: 1, Now: now}); !ok || err != nil {
			t.Fatalf("FinishTurn %s: %v, %v", turn, ok, err)
		}
		ids = append(ids, msg, turn)
	}
	return ids
}

func frameIDs(ms []trtest.Frame) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.Str("message_id")
	}
	return out
}

// The history of GET /api/history and the socket's history frame is the
// same: the newest 500 finished messages, oldest first, also while a reply
// runs (which is left out of both) and the session holds more.
func TestHistoryPastItsCapWhileAReplyRuns(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	stored := storeExchanges(t, dir, "long", "demo_user", 251)
	p := serve(t, "--data-dir", dir)

	check := func(what string, want []string) {
		t.Helper()
		if got := frameIDs(history(t, p, "long")); !slices.Equal(got, want) {
			t.Fatalf("%s: GET /api/history has %d messages %v … %v, want %d, %v … %v", what, len(got), got[:2], got[len(got)-2:], len(want), want[:2], want[len(want)-2:])
		}
		c := page(t, p, "long", "demo_user")
		f, err := c.Next(wait)
		if err != nil || f.Type() != "history" {
			t.Fatalf("%s: after welcome %v %v, want history", what, f, err)
		}
		if got := frameIDs(messages(t, f["messages"])); !slices.Equal(got, want) {
			t.Fatalf("%s: the history frame has %d messages %v … %v, want %d, %v … %v", what, len(got), got[:2], got[len(got)-2:], len(want), want[:2], want[len(want)-2:])
		}
	}
	check("ended", stored[len(stored)-500:])

	a := page(t, p, "long", "demo_user")
	if f, err := a.Next(wait); err != nil || f.Type() != "history" {
		t.Fatalf("after welcome %v %v, want history", f, err)
	}
	userID := sendChat(t, p, "long", "demo_user", "[sim tokens=100000 rate=50] go on")
	r := &reply{t: t}
	r.untilFrames(a, 2)
	check("while a reply runs", append(stored[len(stored)-499:], userID))
	if got := cancelReply(t, p, "long", r.id); got != "cancelled" {
		t.Fatalf("cancel: %s", got)
	}
}
