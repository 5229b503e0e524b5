package storetest

import (
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/store"
)

func testClaimConversation(t *testing.T, s store.Store) {
	alice1 := chat.Conversation{ID: "c1", Owner: "alice", CreatedAt: at(1), UpdatedAt: at(1)}
	bob2 := chat.Conversation{ID: "c2", Owner: "bob", CreatedAt: at(4), UpdatedAt: at(4)}
	// The steps run in order on one store.
	steps := []struct {
		name  string
		id    string
		owner string
		sec   int
		want  chat.Conversation
		err   error
	}{
		{"create", "c1", "alice", 1, alice1, nil},
		{"claim own", "c1", "alice", 2, alice1, nil},
		{"claim another's", "c1", "bob", 3, chat.Conversation{}, chat.ErrForbidden},
		{"create another", "c2", "bob", 4, bob2, nil},
	}
	for _, tt := range steps {
		got, err := s.ClaimConversation(t.Context(), tt.id, tt.owner, at(tt.sec))
		wantErr(t, tt.name, err, tt.err)
		equal(t, tt.name, got, tt.want)
	}

	got, err := s.Conversation(t.Context(), "c1")
	wantErr(t, "Conversation(c1)", err, nil)
	equal(t, "Conversation(c1)", got, alice1)
	_, err = s.Conversation(t.Context(), "nope")
	wantErr(t, "Conversation(nope)", err, chat.ErrNotFound)
}

func testSendStores(t *testing.T, s store.Store) {
	res := send(t, s, req("c1", "m1", "t1", at(1)))

	wantUser := chat.Message{ID: "m1", ConversationID: "c1", Role: chat.RoleUser, Content: "hello m1",
		Status: chat.StatusComplete, TurnID: "t1", Model: "sim", CreatedAt: at(1)}
	wantReply := chat.Message{ID: "t1", ConversationID: "c1", Role: chat.RoleAssistant,
		Status: chat.StatusQueued, TurnID: "t1", ReplyTo: "m1", Model: "sim", CreatedAt: at(1)}
	wantTurn := chat.Turn{ID: "t1", ConversationID: "c1", Owner: "alice", ReplyTo: "m1", Model: "sim",
		Status: chat.StatusQueued, CreatedAt: at(1)}
	equal(t, "result message", res.Message, wantUser)
	equal(t, "result turn", res.Turn, wantTurn)

	m, err := s.Message(t.Context(), "c1", "m1")
	wantErr(t, "Message(m1)", err, nil)
	equal(t, "Message(m1)", m, wantUser)
	m, err = s.Message(t.Context(), "c1", "t1")
	wantErr(t, "Message(t1)", err, nil)
	equal(t, "Message(t1)", m, wantReply)
	turn, err := s.Turn(t.Context(), "t1")
	wantErr(t, "Turn(t1)", err, nil)
	equal(t, "Turn(t1)", turn, wantTurn)

	c, err := s.Conversation(t.Context(), "c1")
	wantErr(t, "Conversation(c1)", err, nil)
	equal(t, "Conversation(c1)", c, chat.Conversation{ID: "c1", Owner: "alice", Title: "hello m1",
		CreatedAt: at(1), UpdatedAt: at(1), ActiveTurnID: "t1"})
	ms, err := s.Messages(t.Context(), "c1", 10, "")
	wantErr(t, "Messages(c1)", err, nil)
	equal(t, "Messages(c1)", ms, []chat.Message{wantUser, wantReply})
}

// maxTitleRunes is the longest title the suite accepts.
const maxTitleRunes = 80

func testSendTitle(t *testing.T, s store.Store) {
	words := strings.Repeat("lorem ipsum ", 30)
	tests := []struct {
		name string
		text string
		// want is the exact title, when the text is short enough to keep.
		want string
		// atWord: a long title must end where a word of the text did.
		atWord bool
	}{
		{name: "short", text: "What is Go?", want: "What is Go?"},
		{name: "whitespace collapsed", text: "  What\n is\t\tGo?  ", want: "What is Go?"},
		{name: "exactly the limit", text: strings.Repeat("x", maxTitleRunes), want: strings.Repeat("x", maxTitleRunes)},
		{name: "long words", text: words, atWord: true},
		{name: "one long word", text: strings.Repeat("x", 500)},
		{name: "multibyte", text: strings.Repeat("日本語のテキスト ", 40), atWord: true},
		{name: "multibyte no spaces", text: strings.Repeat("日本語", 100)},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			conv := "title" + string(rune('a'+i))
			r := req(conv, "m1", conv+"-t1", at(1))
			r.Text = tt.text
			send(t, s, r)
			c, err := s.Conversation(t.Context(), conv)
			wantErr(t, "Conversation", err, nil)
			checkTitle(t, c.Title, tt.text, tt.want, tt.atWord)
		})
	}

	t.Run("first message only", func(t *testing.T) {
		if _, err := s.ClaimConversation(t.Context(), "later", "alice", at(1)); err != nil {
			t.Fatalf("ClaimConversation: %v", err)
		}
		r := req("later", "m1", "later-t1", at(2))
		r.Text = "first"
		send(t, s, r)
		finish(t, s, "later-t1", chat.StatusComplete, at(3))
		r = req("later", "m2", "later-t2", at(4))
		r.Text = "second"
		send(t, s, r)
		c, err := s.Conversation(t.Context(), "later")
		wantErr(t, "Conversation", err, nil)
		equal(t, "title", c.Title, "first")
	})
}

func checkTitle(t testing.TB, got, text, want string, atWord bool) {
	t.Helper()
	if want != "" {
		equal(t, "title", got, want)
		return
	}
	collapsed := strings.Join(strings.Fields(text), " ")
	body, cut := strings.CutSuffix(got, "…")
	switch {
	case !utf8.ValidString(got):
		t.Fatalf("title %q is not valid UTF-8", got)
	case utf8.RuneCountInString(got) > maxTitleRunes:
		t.Fatalf("title %q has %d runes, want at most %d", got, utf8.RuneCountInString(got), maxTitleRunes)
	case !cut:
		t.Fatalf("title %q of a long text does not end with …", got)
	case utf8.RuneCountInString(body) < maxTitleRunes/2:
		t.Fatalf("title %q is too short", got)
	case !strings.HasPrefix(collapsed, body):
		t.Fatalf("title %q does not start the text %q", got, collapsed)
	case atWord && collapsed[len(body)] != ' ':
		t.Fatalf("title %q cuts a word of %q", got, collapsed)
	}
}

func testSendErrors(t *testing.T, s store.Store) {
	bobReq := func(conv, msg, turn string) store.SendRequest {
		r := req(conv, msg, turn, at(1))
		r.Owner = "bob"
		return r
	}
	tests := []struct {
		name  string
		setup func(t testing.TB)
		req   store.SendRequest
		err   error
		// dup names the message and turn a Duplicate result must carry.
		dup *[2]string
		// stored lists each conversation's message ids after the call;
		// missing conversations have none.
		stored map[string][]string
		// absent names turns that must not exist after the call.
		absent []string
		// noConversation names a conversation the call must not create.
		noConversation string
	}{
		{
			name: "another's conversation",
			setup: func(t testing.TB) {
				send(t, s, bobReq("forbid", "m1", "forbid-t1"))
			},
			req:    req("forbid", "m1", "forbid-t2", at(2)),
			err:    chat.ErrForbidden,
			stored: map[string][]string{"forbid": {"m1", "forbid-t1"}},
			absent: []string{"forbid-t2"},
		},
		{
			name: "duplicate after the turn ended",
			setup: func(t testing.TB) {
				send(t, s, req("dup1", "m1", "dup1-t1", at(1)))
				finish(t, s, "dup1-t1", chat.StatusComplete, at(2))
			},
			req:    store.SendRequest{ConversationID: "dup1", Owner: "alice", MessageID: "m1", TurnID: "dup1-t2", Text: "other", Now: at(3)},
			dup:    &[2]string{"m1", "dup1-t1"},
			stored: map[string][]string{"dup1": {"m1", "dup1-t1"}},
			absent: []string{"dup1-t2"},
		},
		{
			name: "duplicate while the turn runs",
			setup: func(t testing.TB) {
				send(t, s, req("dup2", "m1", "dup2-t1", at(1)))
			},
			req:    req("dup2", "m1", "dup2-t2", at(2)),
			dup:    &[2]string{"m1", "dup2-t1"},
			stored: map[string][]string{"dup2": {"m1", "dup2-t1"}},
			absent: []string{"dup2-t2"},
		},
		{
			name: "duplicate without turn id",
			setup: func(t testing.TB) {
				send(t, s, req("dup3", "m1", "dup3-t1", at(1)))
			},
			req:    req("dup3", "m1", "", at(2)),
			dup:    &[2]string{"m1", "dup3-t1"},
			stored: map[string][]string{"dup3": {"m1", "dup3-t1"}},
		},
		{
			name: "message id reused in another conversation",
			setup: func(t testing.TB) {
				send(t, s, req("reuse1", "m1", "reuse1-t1", at(1)))
			},
			req:    req("reuse2", "m1", "reuse2-t1", at(2)),
			stored: map[string][]string{"reuse1": {"m1", "reuse1-t1"}, "reuse2": {"m1", "reuse2-t1"}},
		},
		{
			name: "turn active",
			setup: func(t testing.TB) {
				send(t, s, req("active", "m1", "active-t1", at(1)))
			},
			req:    req("active", "m2", "active-t2", at(2)),
			err:    &chat.TurnActiveError{TurnID: "active-t1"},
			stored: map[string][]string{"active": {"m1", "active-t1"}},
			absent: []string{"active-t2"},
		},
		{
			name: "turn active and streaming",
			setup: func(t testing.TB) {
				send(t, s, req("active2", "m1", "active2-t1", at(1)))
				if ok, err := s.StartTurn(t.Context(), "active2-t1", at(2)); !ok || err != nil {
					t.Fatalf("StartTurn = %v, %v", ok, err)
				}
			},
			req:    req("active2", "m2", "active2-t2", at(3)),
			err:    &chat.TurnActiveError{TurnID: "active2-t1"},
			stored: map[string][]string{"active2": {"m1", "active2-t1"}},
		},
		{
			name: "turn id of another conversation",
			setup: func(t testing.TB) {
				send(t, s, req("turn1", "m1", "taken", at(1)))
				finish(t, s, "taken", chat.StatusComplete, at(2))
			},
			req:            req("turn2", "m1", "taken", at(3)),
			err:            chat.ErrTurnIDTaken,
			stored:         map[string][]string{"turn1": {"m1", "taken"}},
			noConversation: "turn2",
		},
		{
			name: "turn id of a user message",
			setup: func(t testing.TB) {
				send(t, s, req("turn3", "m1", "turn3-t1", at(1)))
				finish(t, s, "turn3-t1", chat.StatusComplete, at(2))
			},
			req:    req("turn3", "m2", "m1", at(3)),
			err:    chat.ErrTurnIDOfMessage,
			stored: map[string][]string{"turn3": {"m1", "turn3-t1"}},
		},
		{
			// The conflict is reported before the limit is checked.
			name: "turn id taken, at the limit of active turns",
			setup: func(t testing.TB) {
				send(t, s, req("lim1", "m1", "lim1-t1", at(1)))
			},
			req: func() store.SendRequest {
				r := req("lim2", "m1", "lim1-t1", at(2))
				r.MaxActiveTurns = 1
				return r
			}(),
			err:            chat.ErrTurnIDTaken,
			stored:         map[string][]string{"lim1": {"m1", "lim1-t1"}},
			noConversation: "lim2",
		},
		{
			name:           "turn id equals message id",
			req:            req("turn4", "same", "same", at(1)),
			err:            chat.ErrSameIDs,
			noConversation: "turn4",
		},
		{
			name: "message id of a running turn",
			setup: func(t testing.TB) {
				send(t, s, req("turn6", "m1", "turn6-t1", at(1)))
			},
			req:    req("turn6", "turn6-t1", "turn6-t2", at(2)),
			err:    chat.ErrMessageIDOfTurn,
			stored: map[string][]string{"turn6": {"m1", "turn6-t1"}},
			absent: []string{"turn6-t2"},
		},
		{
			name: "turn id of an earlier turn of the conversation",
			setup: func(t testing.TB) {
				send(t, s, req("turn7", "m1", "turn7-t1", at(1)))
				finish(t, s, "turn7-t1", chat.StatusComplete, at(2))
			},
			req:    req("turn7", "m2", "turn7-t1", at(3)),
			err:    chat.ErrTurnIDTaken,
			stored: map[string][]string{"turn7": {"m1", "turn7-t1"}},
		},
		{
			name: "message id of a reply",
			setup: func(t testing.TB) {
				send(t, s, req("turn5", "m1", "turn5-t1", at(1)))
				finish(t, s, "turn5-t1", chat.StatusComplete, at(2))
			},
			req:    req("turn5", "turn5-t1", "turn5-t2", at(3)),
			err:    chat.ErrMessageIDOfTurn,
			stored: map[string][]string{"turn5": {"m1", "turn5-t1"}},
			absent: []string{"turn5-t2"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.setup != nil {
				tt.setup(t)
			}
			res, err := s.Send(t.Context(), tt.req)
			if tt.dup != nil {
				wantErr(t, "Send", err, nil)
				if !res.Duplicate || res.Message.ID != tt.dup[0] || res.Turn.ID != tt.dup[1] || res.Message.TurnID != tt.dup[1] {
					t.Fatalf("Send = %s / %s (duplicate %v), want duplicate %s / %s",
						res.Message.ID, res.Turn.ID, res.Duplicate, tt.dup[0], tt.dup[1])
				}
				equal(t, "duplicate text", res.Message.Content, "hello "+tt.dup[0])
				equal(t, "duplicate owner", res.Turn.Owner, "alice")
			} else {
				wantErr(t, "Send", err, tt.err)
				if err == nil && res.Duplicate {
					t.Fatalf("Send: unexpected Duplicate")
				}
			}
			for conv, want := range tt.stored {
				equal(t, "messages of "+conv, messageIDs(t, s, conv), want)
			}
			for _, id := range tt.absent {
				_, err := s.Turn(t.Context(), id)
				wantErr(t, "Turn("+id+")", err, chat.ErrNotFound)
			}
			if tt.noConversation != "" {
				_, err := s.Conversation(t.Context(), tt.noConversation)
				wantErr(t, "Conversation("+tt.noConversation+")", err, chat.ErrNotFound)
			}
		})
	}
}

func testSendGeneratesIDs(t *testing.T, s store.Store) {
	res := send(t, s, req("gen", "", "", at(1)))
	switch {
	case !chat.ValidID(res.Message.ID) || !chat.ValidID(res.Turn.ID):
		t.Fatalf("generated ids %q, %q are not valid", res.Message.ID, res.Turn.ID)
	case res.Message.ID == res.Turn.ID || res.Message.TurnID != res.Turn.ID || res.Turn.ReplyTo != res.Message.ID:
		t.Fatalf("generated ids do not link: message %+v, turn %+v", res.Message, res.Turn)
	}
	equal(t, "messages", messageIDs(t, s, "gen"), []string{res.Message.ID, res.Turn.ID})

	for _, bad := range []store.SendRequest{
		req("bad conversation", "m1", "t1", at(1)),
		req("bad-message", "m 1", "t1", at(1)),
		req("bad-turn", "m1", strings.Repeat("t", chat.MaxIDLen+1), at(1)),
	} {
		if _, err := s.Send(t.Context(), bad); err == nil {
			t.Fatalf("Send(%q, %q, %q) stored invalid ids", bad.ConversationID, bad.MessageID, bad.TurnID)
		}
	}
}

func testSendTooManyTurns(t *testing.T, s store.Store) {
	// alice has two turns running and one ended; bob has one running.
	send(t, s, req("a1", "m1", "a1-t1", at(1)))
	send(t, s, req("a2", "m1", "a2-t1", at(1)))
	send(t, s, req("a3", "m1", "a3-t1", at(1)))
	finish(t, s, "a3-t1", chat.StatusComplete, at(2))
	b := req("b1", "m1", "b1-t1", at(1))
	b.Owner = "bob"
	send(t, s, b)

	tests := []struct {
		name  string
		owner string
		max   int
		err   error
	}{
		{"no limit", "alice", 0, nil},
		{"under the limit", "alice", 3, nil},
		{"at the limit", "alice", 2, chat.ErrTooManyTurns},
		{"over the limit", "alice", 1, chat.ErrTooManyTurns},
		{"other owners do not count", "bob", 2, nil},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			conv := "limit" + string(rune('a'+i))
			r := req(conv, "m1", conv+"-t1", at(3))
			r.Owner = tt.owner
			r.MaxActiveTurns = tt.max
			_, err := s.Send(t.Context(), r)
			wantErr(t, "Send", err, tt.err)
			if err != nil {
				equal(t, "messages", messageIDs(t, s, conv), []string{})
				return
			}
			// Back to where the next case expects the owner to be.
			finish(t, s, conv+"-t1", chat.StatusComplete, at(4))
		})
	}
}
