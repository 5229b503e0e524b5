package storetest

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/store"
)

// pageBack pages through conversation conv from its newest page to its
// oldest, limit messages at a time, calling between(page) after each page
// is read, and returns the ids visited, oldest first.
func pageBack(t testing.TB, s store.Store, conv string, limit int, between func(page int)) []string {
	t.Helper()
	var visited []string
	before := ""
	for page := 0; ; page++ {
		ms, err := s.Messages(t.Context(), conv, limit, before)
		wantErr(t, fmt.Sprintf("Messages page %d before %q", page, before), err, nil)
		if len(ms) > limit {
			t.Fatalf("page %d holds %d messages, over the limit %d", page, len(ms), limit)
		}
		if len(ms) == 0 {
			break
		}
		visited = append(ids(ms), visited...)
		before = ms[0].ID
		if between != nil {
			between(page)
		}
	}
	return visited
}

// testHistoryOrder: messages come in the order they were sent, each user
// message before its reply, whatever their ids (client-chosen ids that sort
// against the order of creation, server-made UUIDv7s) and however many
// share a millisecond; paging back from the newest page visits each of
// them once.
func testHistoryOrder(t *testing.T, s store.Store) {
	clientIDs := func(i int) (msg, turn string) {
		// z0, y1, x2, …: each id sorts before the one sent before it.
		return fmt.Sprintf("%c%d", 'z'-i%26, i), fmt.Sprintf("%c%d-t", 'Z'-i%26, i)
	}
	serverIDs := func(int) (string, string) { return "", "" }
	for _, tt := range []struct {
		name string
		ids  func(i int) (msg, turn string)
	}{{"client ids", clientIDs}, {"server ids", serverIDs}} {
		t.Run(tt.name, func(t *testing.T) {
			conv := "order-" + tt.name[:6]
			const n = 30
			var want []string
			now := at(1) // every message in one millisecond
			for i := range n {
				msg, turn := tt.ids(i)
				r := req(conv, msg, turn, now)
				res := send(t, s, r)
				want = append(want, res.Message.ID, res.Turn.ID)
				finish(t, s, res.Turn.ID, chat.StatusComplete, now)
			}
			ms, err := s.Messages(t.Context(), conv, 0, "")
			wantErr(t, "Messages", err, nil)
			equal(t, "Messages", ids(ms), want)
			for i := 0; i < len(ms); i += 2 {
				if ms[i].Role != chat.RoleUser || ms[i+1].Role != chat.RoleAssistant || ms[i+1].ReplyTo != ms[i].ID {
					t.Fatalf("messages %d and %d are not a user message and its reply: %s, %s", i, i+1, show(ms[i]), show(ms[i+1]))
				}
			}
			for _, limit := range []int{1, 2, 3, 7, 60, 61} {
				equal(t, fmt.Sprintf("pages of %d", limit), pageBack(t, s, conv, limit, nil), want)
			}
		})
	}
}

// testPagingWhileWriting: paging back visits every message that was
// stored when paging began exactly once, while new turns are sent and a
// turn streams and ends between the pages.
func testPagingWhileWriting(t *testing.T, s store.Store) {
	const conv = "busy"
	var want []string
	for i := range 12 {
		res := send(t, s, req(conv, fmt.Sprintf("%c", 'z'-i), fmt.Sprintf("busy-%c", 'z'-i), at(1)))
		want = append(want, res.Message.ID, res.Turn.ID)
		if i < 11 {
			finish(t, s, res.Turn.ID, chat.StatusComplete, at(1))
		}
	}
	running := want[len(want)-1]
	if ok, err := s.StartTurn(t.Context(), running, at(1)); !ok || err != nil {
		t.Fatalf("StartTurn = %v, %v", ok, err)
	}
	added := 0
	got := pageBack(t, s, conv, 5, func(page int) {
		switch page {
		case 0:
			finish(t, s, running, chat.StatusComplete, at(1))
		default:
			res := send(t, s, req(conv, fmt.Sprintf("new%d", page), fmt.Sprintf("busy-new%d", page), at(1)))
			finish(t, s, res.Turn.ID, chat.StatusComplete, at(1))
			added++
		}
	})
	equal(t, "messages visited", got, want)
	if all := messageIDs(t, s, conv); len(all) != len(want)+2*added || !slices.Equal(all[:len(want)], want) {
		t.Fatalf("messages after paging: %v", all)
	}
}

// testUpdatedAtOrder: a conversation's updated_at is the time of its
// newest send and never goes back, and its messages' created_at never
// decreases along its history, even when the clock that stamps a send
// (another gateway's, or one set back) is behind the one of the send
// before: such a send takes the time of the one before.
func testUpdatedAtOrder(t *testing.T, s store.Store) {
	send(t, s, req("first", "m1", "first-t1", at(5)))
	finish(t, s, "first-t1", chat.StatusComplete, at(5))
	send(t, s, req("second", "m1", "second-t1", at(6)))
	finish(t, s, "second-t1", chat.StatusComplete, at(6))
	res := send(t, s, req("first", "m2", "first-t2", at(4)))
	equal(t, "sent message's created_at", res.Message.CreatedAt, at(5))
	equal(t, "sent turn's created_at", res.Turn.CreatedAt, at(5))
	cs, err := s.Conversations(t.Context(), "alice", 0)
	wantErr(t, "Conversations", err, nil)
	var got []string
	var updated []time.Time
	for _, c := range cs {
		got = append(got, c.ID)
		updated = append(updated, c.UpdatedAt)
	}
	equal(t, "Conversations", got, []string{"second", "first"})
	equal(t, "updated_at", updated, []time.Time{at(6), at(5)})
	ms, err := s.Messages(t.Context(), "first", 0, "")
	wantErr(t, "Messages", err, nil)
	var created []time.Time
	for _, m := range ms {
		created = append(created, m.CreatedAt)
	}
	equal(t, "created_at", created, []time.Time{at(5), at(5), at(5), at(5)})
	// A later clock moves both on again.
	send(t, s, req("second", "m2", "second-t2", at(9)))
	c, err := s.Conversation(t.Context(), "second")
	wantErr(t, "Conversation", err, nil)
	equal(t, "updated_at after a later send", c.UpdatedAt, at(9))
}
