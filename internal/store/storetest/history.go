package storetest

import (
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/store"
)

// exchanges stores n messages with their replies, ended, in conversation
// conv: m1, conv-t1, m2, conv-t2, …
func exchanges(t testing.TB, s store.Store, conv string, n int) {
	t.Helper()
	for i := 1; i <= n; i++ {
		msg, turn := "m"+string(rune('0'+i)), conv+"-t"+string(rune('0'+i))
		send(t, s, req(conv, msg, turn, at(i)))
		finish(t, s, turn, chat.StatusComplete, at(i))
	}
}

func testMessages(t *testing.T, s store.Store) {
	exchanges(t, s, "c", 3)
	exchanges(t, s, "other", 2)

	tests := []struct {
		name   string
		conv   string
		limit  int
		before string
		want   []string
		err    error
	}{
		{name: "all", conv: "c", limit: 10, want: []string{"m1", "c-t1", "m2", "c-t2", "m3", "c-t3"}},
		{name: "exactly all", conv: "c", limit: 6, want: []string{"m1", "c-t1", "m2", "c-t2", "m3", "c-t3"}},
		{name: "newest", conv: "c", limit: 2, want: []string{"m3", "c-t3"}},
		{name: "newest three", conv: "c", limit: 3, want: []string{"c-t2", "m3", "c-t3"}},
		{name: "before a user message", conv: "c", limit: 2, before: "m3", want: []string{"m2", "c-t2"}},
		{name: "before a reply", conv: "c", limit: 10, before: "c-t1", want: []string{"m1"}},
		{name: "before the first", conv: "c", limit: 10, before: "m1", want: []string{}},
		{name: "before an unknown message", conv: "c", limit: 10, before: "nope", err: chat.ErrNotFound},
		{name: "before another conversation's message", conv: "c", limit: 10, before: "other-t1", err: chat.ErrNotFound},
		{name: "unknown conversation", conv: "nope", limit: 10, want: []string{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := s.Messages(t.Context(), tt.conv, tt.limit, tt.before)
			wantErr(t, "Messages", err, tt.err)
			if err == nil {
				equal(t, "Messages", ids(got), tt.want)
			}
		})
	}

	t.Run("paging", func(t *testing.T) {
		var pages [][]string
		before := ""
		for range 5 {
			page, err := s.Messages(t.Context(), "c", 4, before)
			wantErr(t, "Messages", err, nil)
			if len(page) == 0 {
				break
			}
			pages = append(pages, ids(page))
			before = page[0].ID
		}
		equal(t, "pages", pages, [][]string{{"m2", "c-t2", "m3", "c-t3"}, {"m1", "c-t1"}})
	})
}

// testHeads: MessageHeads and TurnHead are Messages and Turn with every
// Content empty, the rest the same.
func testHeads(t *testing.T, s store.Store) {
	exchanges(t, s, "c", 2)
	send(t, s, req("c", "m3", "c-t3", at(3)))
	if ok, err := s.StartTurn(t.Context(), "c-t3", at(4)); !ok || err != nil {
		t.Fatalf("StartTurn(c-t3) = %v, %v", ok, err)
	}
	for _, limit := range []int{1, 3, 10} {
		full, err := s.Messages(t.Context(), "c", limit, "")
		wantErr(t, "Messages", err, nil)
		heads, err := s.MessageHeads(t.Context(), "c", limit)
		wantErr(t, "MessageHeads", err, nil)
		for i := range full {
			if full[i].Role == chat.RoleUser && full[i].Content == "" {
				t.Fatalf("Messages: %s has no content", full[i].ID)
			}
			full[i].Content = ""
		}
		equal(t, "MessageHeads", heads, full)
	}
	got, err := s.MessageHeads(t.Context(), "nope", 10)
	wantErr(t, "MessageHeads of an unknown conversation", err, nil)
	equal(t, "MessageHeads of an unknown conversation", ids(got), []string{})

	full, err := s.Turn(t.Context(), "c-t2")
	wantErr(t, "Turn", err, nil)
	if full.Content == "" {
		t.Fatal("Turn: c-t2 has no content")
	}
	head, err := s.TurnHead(t.Context(), "c-t2")
	wantErr(t, "TurnHead", err, nil)
	full.Content = ""
	equal(t, "TurnHead", head, full)
	_, err = s.TurnHead(t.Context(), "nope")
	wantErr(t, "TurnHead of an unknown turn", err, chat.ErrNotFound)
}

func testMessage(t *testing.T, s store.Store) {
	exchanges(t, s, "c", 1)
	exchanges(t, s, "other", 1)
	tests := []struct {
		name string
		conv string
		id   string
		role chat.Role
		err  error
	}{
		{"user", "c", "m1", chat.RoleUser, nil},
		{"assistant", "c", "c-t1", chat.RoleAssistant, nil},
		{"other conversation", "c", "other-t1", "", chat.ErrNotFound},
		{"unknown", "c", "nope", "", chat.ErrNotFound},
		{"unknown conversation", "nope", "m1", "", chat.ErrNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := s.Message(t.Context(), tt.conv, tt.id)
			wantErr(t, "Message", err, tt.err)
			if err == nil && (got.ID != tt.id || got.ConversationID != tt.conv || got.Role != tt.role) {
				t.Fatalf("Message = %s", show(got))
			}
		})
	}
}

func testConversations(t *testing.T, s store.Store) {
	send(t, s, req("c1", "m1", "c1-t1", at(1)))
	finish(t, s, "c1-t1", chat.StatusComplete, at(2))
	send(t, s, req("c2", "m1", "c2-t1", at(3))) // left running
	send(t, s, req("c3", "m1", "c3-t1", at(2)))
	finish(t, s, "c3-t1", chat.StatusCancelled, at(3))
	if _, err := s.ClaimConversation(t.Context(), "c4", "alice", at(5)); err != nil { // no messages
		t.Fatalf("ClaimConversation: %v", err)
	}
	b := req("b1", "m1", "b1-t1", at(4))
	b.Owner = "bob"
	send(t, s, b)
	// c1 becomes the most recent.
	r := req("c1", "m2", "c1-t2", at(6))
	r.Text = "second"
	send(t, s, r)

	c1 := chat.Conversation{ID: "c1", Owner: "alice", Title: "hello m1", CreatedAt: at(1), UpdatedAt: at(6), ActiveTurnID: "c1-t2"}
	c2 := chat.Conversation{ID: "c2", Owner: "alice", Title: "hello m1", CreatedAt: at(3), UpdatedAt: at(3), ActiveTurnID: "c2-t1"}
	c3 := chat.Conversation{ID: "c3", Owner: "alice", Title: "hello m1", CreatedAt: at(2), UpdatedAt: at(2)}
	b1 := chat.Conversation{ID: "b1", Owner: "bob", Title: "hello m1", CreatedAt: at(4), UpdatedAt: at(4), ActiveTurnID: "b1-t1"}
	// Conversations updated in the same millisecond come by their ids'
	// bytes, descending, as every database orders them.
	var ties []chat.Conversation
	for _, id := range []string{"a", "_x", "B", "-y"} {
		r := req(id, "m1", "dora"+id, at(7))
		r.Owner = "dora"
		send(t, s, r)
		ties = append(ties, chat.Conversation{ID: id, Owner: "dora", Title: "hello m1", CreatedAt: at(7), UpdatedAt: at(7), ActiveTurnID: "dora" + id})
	}
	tests := []struct {
		name  string
		owner string
		limit int
		want  []chat.Conversation
	}{
		{"all", "alice", 10, []chat.Conversation{c1, c2, c3}},
		{"limited", "alice", 2, []chat.Conversation{c1, c2}},
		{"one", "alice", 1, []chat.Conversation{c1}},
		{"another owner", "bob", 10, []chat.Conversation{b1}},
		{"no conversations", "carol", 10, nil},
		{"updated together", "dora", 10, ties},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := s.Conversations(t.Context(), tt.owner, tt.limit)
			wantErr(t, "Conversations", err, nil)
			if len(got) == 0 && len(tt.want) == 0 {
				return
			}
			equal(t, "Conversations", got, tt.want)
		})
	}
}

func testDeleteConversation(t *testing.T, s store.Store) {
	exchanges(t, s, "c1", 1)
	send(t, s, req("c1", "m2", "c1-t2", at(5))) // left running
	exchanges(t, s, "b1", 1)

	// The steps run in order on one store.
	steps := []struct {
		name  string
		id    string
		owner string
		err   error
	}{
		{"unknown", "nope", "alice", chat.ErrNotFound},
		{"another's", "c1", "bob", chat.ErrForbidden},
		{"own", "c1", "alice", nil},
		{"again", "c1", "alice", chat.ErrNotFound},
	}
	for _, tt := range steps {
		wantErr(t, tt.name, s.DeleteConversation(t.Context(), tt.id, tt.owner), tt.err)
	}

	_, err := s.Conversation(t.Context(), "c1")
	wantErr(t, "Conversation", err, chat.ErrNotFound)
	equal(t, "messages", messageIDs(t, s, "c1"), []string{})
	_, err = s.Message(t.Context(), "c1", "m1")
	wantErr(t, "Message", err, chat.ErrNotFound)
	for _, id := range []string{"c1-t1", "c1-t2"} {
		_, err = s.Turn(t.Context(), id)
		wantErr(t, "Turn("+id+")", err, chat.ErrNotFound)
	}
	_, err = s.ActiveTurn(t.Context(), "c1")
	wantErr(t, "ActiveTurn", err, chat.ErrNotFound)
	turns, err := s.UnfinishedTurns(t.Context())
	wantErr(t, "UnfinishedTurns", err, nil)
	equal(t, "UnfinishedTurns", len(turns), 0)
	cs, err := s.Conversations(t.Context(), "alice", 10)
	wantErr(t, "Conversations", err, nil)
	if len(cs) != 1 || cs[0].ID != "b1" {
		t.Fatalf("Conversations = %+v, want only b1", cs)
	}

	// Other conversations are untouched.
	equal(t, "other messages", messageIDs(t, s, "b1"), []string{"m1", "b1-t1"})
	// Its conversation and message ids are free again; its turn ids are
	// not, since they also name the turns' events on the bus.
	for _, id := range []string{"c1-t1", "c1-t2"} {
		_, err = s.Send(t.Context(), req("c1", "m1", id, at(7)))
		wantErr(t, "Send with the deleted turn id "+id, err, chat.ErrTurnIDTaken)
	}
	send(t, s, req("c1", "m1", "c1-t3", at(7)))
	equal(t, "new messages", messageIDs(t, s, "c1"), []string{"m1", "c1-t3"})
	// Deleting it again keeps the new turn's id too.
	wantErr(t, "delete again", s.DeleteConversation(t.Context(), "c1", "alice"), nil)
	_, err = s.Send(t.Context(), req("c2", "m1", "c1-t3", at(8)))
	wantErr(t, "Send with the deleted turn id c1-t3", err, chat.ErrTurnIDTaken)

	// Forgetting the ids deleted before a moment already past keeps them.
	n, err := s.ForgetDeletedTurns(t.Context(), time.Now().Add(-time.Hour))
	wantErr(t, "ForgetDeletedTurns an hour ago", err, nil)
	equal(t, "ids forgotten an hour ago", n, int64(0))
	_, err = s.Send(t.Context(), req("c2", "m1", "c1-t3", at(9)))
	wantErr(t, "Send with the deleted turn id c1-t3", err, chat.ErrTurnIDTaken)
	// Forgetting those deleted before now lets them go.
	n, err = s.ForgetDeletedTurns(t.Context(), time.Now().Add(time.Second))
	wantErr(t, "ForgetDeletedTurns", err, nil)
	equal(t, "ids forgotten", n, int64(3))
	send(t, s, req("c2", "m1", "c1-t3", at(9)))
}
