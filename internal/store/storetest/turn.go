package storetest

import (
	"slices"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/store"
)

// newTurn sends a message to a conversation of its own and brings the turn
// it starts to status, which is queued, streaming or terminal.
func newTurn(t testing.TB, s store.Store, conv string, status chat.TurnStatus) string {
	t.Helper()
	id := conv + "-t1"
	send(t, s, req(conv, "m1", id, at(1)))
	if status == chat.StatusQueued {
		return id
	}
	if status == chat.StatusStreaming || status == chat.StatusComplete {
		if ok, err := s.StartTurn(t.Context(), id, at(2)); !ok || err != nil {
			t.Fatalf("StartTurn(%s) = %v, %v", id, ok, err)
		}
	}
	if status.Terminal() {
		finish(t, s, id, status, at(3))
	}
	return id
}

func turnStatus(t testing.TB, s store.Store, id string) chat.TurnStatus {
	t.Helper()
	turn, err := s.Turn(t.Context(), id)
	if err != nil {
		t.Fatalf("Turn(%s): %v", id, err)
	}
	return turn.Status
}

func testStartTurn(t *testing.T, s store.Store) {
	tests := []struct {
		name   string
		status chat.TurnStatus // the turn's before the call; "" for none
		want   bool
		err    error
		after  chat.TurnStatus
	}{
		{"queued", chat.StatusQueued, true, nil, chat.StatusStreaming},
		{"streaming", chat.StatusStreaming, false, nil, chat.StatusStreaming},
		{"cancelled while queued", chat.StatusCancelled, false, nil, chat.StatusCancelled},
		{"complete", chat.StatusComplete, false, nil, chat.StatusComplete},
		{"unknown", "", false, chat.ErrNotFound, ""},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id := "unknown"
			if tt.status != "" {
				id = newTurn(t, s, "start"+string(rune('a'+i)), tt.status)
			}
			got, err := s.StartTurn(t.Context(), id, at(5))
			wantErr(t, "StartTurn", err, tt.err)
			equal(t, "StartTurn", got, tt.want)
			if tt.after != "" {
				equal(t, "status after", turnStatus(t, s, id), tt.after)
			}
		})
	}
}

func testFinishTurn(t *testing.T, s store.Store) {
	tests := []struct {
		name   string
		status chat.TurnStatus // the turn's before the call; "" for none
		from   []chat.TurnStatus
		finish chat.TurnStatus
		want   chat.TurnStatus
		wantOK bool
		err    error
		anyErr bool // any error will do
	}{
		{name: "queued", status: chat.StatusQueued, finish: chat.StatusCancelled, want: chat.StatusCancelled, wantOK: true},
		{name: "streaming", status: chat.StatusStreaming, finish: chat.StatusComplete, want: chat.StatusComplete, wantOK: true},
		{name: "streaming to interrupted", status: chat.StatusStreaming, finish: chat.StatusInterrupted, want: chat.StatusInterrupted, wantOK: true},
		{name: "already complete", status: chat.StatusComplete, finish: chat.StatusCancelled, want: chat.StatusComplete},
		{name: "already cancelled", status: chat.StatusCancelled, finish: chat.StatusError, want: chat.StatusCancelled},
		{name: "from queued, queued", status: chat.StatusQueued, from: []chat.TurnStatus{chat.StatusQueued},
			finish: chat.StatusCancelled, want: chat.StatusCancelled, wantOK: true},
		{name: "from queued, streaming", status: chat.StatusStreaming, from: []chat.TurnStatus{chat.StatusQueued},
			finish: chat.StatusCancelled, want: chat.StatusStreaming},
		{name: "from streaming, queued", status: chat.StatusQueued, from: []chat.TurnStatus{chat.StatusStreaming},
			finish: chat.StatusError, want: chat.StatusQueued},
		{name: "from both, streaming", status: chat.StatusStreaming,
			from:   []chat.TurnStatus{chat.StatusQueued, chat.StatusStreaming},
			finish: chat.StatusError, want: chat.StatusError, wantOK: true},
		{name: "unknown", finish: chat.StatusComplete, err: chat.ErrNotFound},
		{name: "not terminal", status: chat.StatusQueued, finish: chat.StatusStreaming, anyErr: true},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id := "unknown"
			var before chat.Turn
			if tt.status != "" {
				id = newTurn(t, s, "finish"+string(rune('a'+i)), tt.status)
				var err error
				if before, err = s.Turn(t.Context(), id); err != nil {
					t.Fatalf("Turn: %v", err)
				}
			}
			r := store.TurnResult{TurnID: id, Status: tt.finish, Content: "new content", Seq: 7, Now: at(9)}
			got, ok, err := s.FinishTurn(t.Context(), r, tt.from...)
			if tt.anyErr {
				if err == nil {
					t.Fatalf("FinishTurn = %s, %v; want an error", got, ok)
				}
				equal(t, "status after", turnStatus(t, s, id), tt.status)
				return
			}
			wantErr(t, "FinishTurn", err, tt.err)
			if err != nil {
				return
			}
			if got != tt.want || ok != tt.wantOK {
				t.Fatalf("FinishTurn = %s, %v; want %s, %v", got, ok, tt.want, tt.wantOK)
			}
			after, err := s.Turn(t.Context(), id)
			if err != nil {
				t.Fatalf("Turn: %v", err)
			}
			if !ok {
				equal(t, "unchanged turn", after, before)
				return
			}
			equal(t, "status", after.Status, tt.finish)
			equal(t, "content", after.Content, "new content")
			equal(t, "seq", after.Seq, int64(7))
			equal(t, "finished at", after.FinishedAt, at(9))
		})
	}
}

func testFinishTurnRoundTrip(t *testing.T, s store.Store) {
	send(t, s, req("rt", "m1", "rt-t1", at(1)))
	queued, err := s.Turn(t.Context(), "rt-t1")
	wantErr(t, "Turn", err, nil)
	if queued.Usage != nil || !queued.FinishedAt.IsZero() || queued.Seq != 0 || queued.Content != "" {
		t.Fatalf("queued turn has results: %s", show(queued))
	}
	if ok, err := s.StartTurn(t.Context(), "rt-t1", at(2)); !ok || err != nil {
		t.Fatalf("StartTurn = %v, %v", ok, err)
	}
	end := at(3).Add(1500 * time.Millisecond)
	_, ok, err := s.FinishTurn(t.Context(), store.TurnResult{
		TurnID: "rt-t1", Status: chat.StatusError, Content: "partial ✓ text", Seq: 42,
		Error: "provider failed", Usage: &chat.Usage{PromptTokens: 11, CompletionTokens: 22}, Now: end,
	})
	if !ok || err != nil {
		t.Fatalf("FinishTurn = %v, %v", ok, err)
	}
	want := chat.Turn{ID: "rt-t1", ConversationID: "rt", Owner: "alice", ReplyTo: "m1", Model: "sim",
		Status: chat.StatusError, Content: "partial ✓ text", Seq: 42, Error: "provider failed",
		Usage: &chat.Usage{PromptTokens: 11, CompletionTokens: 22}, CreatedAt: at(1), FinishedAt: end}
	got, err := s.Turn(t.Context(), "rt-t1")
	wantErr(t, "Turn", err, nil)
	equal(t, "Turn", got, want)

	wantMsg := chat.Message{ID: "rt-t1", ConversationID: "rt", Role: chat.RoleAssistant, Content: want.Content,
		Status: want.Status, TurnID: "rt-t1", ReplyTo: "m1", Model: "sim", Error: want.Error, Seq: 42,
		Usage: want.Usage, CreatedAt: at(1), FinishedAt: end}
	m, err := s.Message(t.Context(), "rt", "rt-t1")
	wantErr(t, "Message", err, nil)
	equal(t, "Message", m, wantMsg)
	ms, err := s.Messages(t.Context(), "rt", 1, "")
	wantErr(t, "Messages", err, nil)
	equal(t, "Messages", ms, []chat.Message{wantMsg})

	// A turn without usage keeps none.
	send(t, s, req("rt", "m2", "rt-t2", at(4)))
	_, ok, err = s.FinishTurn(t.Context(), store.TurnResult{TurnID: "rt-t2", Status: chat.StatusComplete,
		Content: "done", Seq: 1, Now: at(5)})
	if !ok || err != nil {
		t.Fatalf("FinishTurn = %v, %v", ok, err)
	}
	got, err = s.Turn(t.Context(), "rt-t2")
	wantErr(t, "Turn", err, nil)
	equal(t, "usage", got.Usage, (*chat.Usage)(nil))
	equal(t, "finished at", got.FinishedAt, at(5))
	equal(t, "error", got.Error, "")

	user, err := s.Message(t.Context(), "rt", "m2")
	wantErr(t, "Message", err, nil)
	if user.Usage != nil || user.Seq != 0 || user.Error != "" {
		t.Fatalf("user message has turn results: %s", show(user))
	}
}

func testActiveTurn(t *testing.T, s store.Store) {
	_, err := s.ActiveTurn(t.Context(), "nope")
	wantErr(t, "ActiveTurn(nope)", err, chat.ErrNotFound)

	res := send(t, s, req("act", "m1", "act-t1", at(1)))
	got, err := s.ActiveTurn(t.Context(), "act")
	wantErr(t, "ActiveTurn queued", err, nil)
	equal(t, "ActiveTurn queued", got, res.Turn)

	if ok, err := s.StartTurn(t.Context(), "act-t1", at(2)); !ok || err != nil {
		t.Fatalf("StartTurn = %v, %v", ok, err)
	}
	got, err = s.ActiveTurn(t.Context(), "act")
	wantErr(t, "ActiveTurn streaming", err, nil)
	equal(t, "ActiveTurn streaming", got.Status, chat.StatusStreaming)

	finish(t, s, "act-t1", chat.StatusComplete, at(3))
	_, err = s.ActiveTurn(t.Context(), "act")
	wantErr(t, "ActiveTurn ended", err, chat.ErrNotFound)
	c, err := s.Conversation(t.Context(), "act")
	wantErr(t, "Conversation", err, nil)
	equal(t, "ActiveTurnID", c.ActiveTurnID, "")
}

func testUnfinishedTurns(t *testing.T, s store.Store) {
	got, err := s.UnfinishedTurns(t.Context())
	wantErr(t, "UnfinishedTurns", err, nil)
	equal(t, "UnfinishedTurns of an empty store", len(got), 0)

	newTurn(t, s, "u1", chat.StatusQueued)
	newTurn(t, s, "u2", chat.StatusStreaming)
	newTurn(t, s, "u3", chat.StatusComplete)
	newTurn(t, s, "u4", chat.StatusInterrupted)
	b := req("u5", "m1", "u5-t1", at(1))
	b.Owner = "bob"
	send(t, s, b)

	got, err = s.UnfinishedTurns(t.Context())
	wantErr(t, "UnfinishedTurns", err, nil)
	type row struct {
		ID     string
		Owner  string
		Status chat.TurnStatus
	}
	var rows []row
	for _, turn := range got {
		rows = append(rows, row{turn.ID, turn.Owner, turn.Status})
	}
	slices.SortFunc(rows, func(a, b row) int {
		if a.ID < b.ID {
			return -1
		}
		return 1
	})
	equal(t, "UnfinishedTurns", rows, []row{
		{"u1-t1", "alice", chat.StatusQueued},
		{"u2-t1", "alice", chat.StatusStreaming},
		{"u5-t1", "bob", chat.StatusQueued},
	})
}

func testTimePrecision(t *testing.T, s store.Store) {
	// Sub-millisecond digits are dropped, and times come back in UTC
	// whatever zone they went in with.
	cet := time.FixedZone("CET", 3600)
	now := time.Date(2025, 3, 14, 16, 9, 26, 123456789, cet)
	want := time.Date(2025, 3, 14, 15, 9, 26, 123000000, time.UTC)
	check := func(what string, got time.Time) {
		t.Helper()
		if !got.Equal(want) || got.Location() != time.UTC {
			t.Fatalf("%s = %v, want %v", what, got, want)
		}
	}

	c, err := s.ClaimConversation(t.Context(), "tp", "alice", now)
	wantErr(t, "ClaimConversation", err, nil)
	check("claimed CreatedAt", c.CreatedAt)
	check("claimed UpdatedAt", c.UpdatedAt)

	res := send(t, s, req("tp", "m1", "tp-t1", now))
	check("sent message CreatedAt", res.Message.CreatedAt)
	check("sent turn CreatedAt", res.Turn.CreatedAt)
	m, err := s.Message(t.Context(), "tp", "m1")
	wantErr(t, "Message", err, nil)
	check("stored CreatedAt", m.CreatedAt)

	_, ok, err := s.FinishTurn(t.Context(), store.TurnResult{TurnID: "tp-t1", Status: chat.StatusComplete, Now: now})
	if !ok || err != nil {
		t.Fatalf("FinishTurn = %v, %v", ok, err)
	}
	turn, err := s.Turn(t.Context(), "tp-t1")
	wantErr(t, "Turn", err, nil)
	check("turn CreatedAt", turn.CreatedAt)
	check("turn FinishedAt", turn.FinishedAt)

	cs, err := s.Conversations(t.Context(), "alice", 1)
	wantErr(t, "Conversations", err, nil)
	if len(cs) != 1 {
		t.Fatalf("Conversations = %d, want 1", len(cs))
	}
	check("listed CreatedAt", cs[0].CreatedAt)
	check("listed UpdatedAt", cs[0].UpdatedAt)
}
