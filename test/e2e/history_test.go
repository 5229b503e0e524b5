package e2e_test

import (
	"fmt"
	"slices"
	"testing"

	"github.com/tokenrelay/tokenrelay/internal/store/postgres/pgtest"
	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

func messageIDs(ms []message) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.MessageID
	}
	return out
}

func joinedIDs(j trtest.Frame) []string {
	ms, _ := j["messages"].([]any)
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = trtest.Frame(m.(map[string]any)).Str("message_id")
	}
	return out
}

// pageBack pages conv back from its newest page with before, limit at a
// time, calling between after each page, and returns the ids visited,
// oldest first.
func pageBack(t *testing.T, base, conv string, limit int, between func()) []string {
	t.Helper()
	var visited []string
	query := fmt.Sprintf("?limit=%d", limit)
	for {
		page, more := messagePage(t, base, conv, query)
		visited = append(messageIDs(page), visited...)
		if !more {
			return visited
		}
		if len(page) == 0 {
			t.Fatalf("empty page %s with has_more", query)
		}
		query = fmt.Sprintf("?limit=%d&before=%s", limit, page[0].MessageID)
		if between != nil {
			between()
		}
	}
}

// TestHistoryReadersAgree: with fast turns (many messages in one
// millisecond) and ids that sort against the order of sending, client-
// chosen and server-made, every reader of the history gives the messages
// in the order they were sent, each user message before its reply;
// joined.messages is the HTTP page of the same K; paging back with before
// visits each message once while turns are sent and one streams. On
// SQLite and on PostgreSQL alike.
func TestHistoryReadersAgree(t *testing.T) {
	for _, store := range []string{"sqlite", "postgres"} {
		t.Run(store, func(t *testing.T) {
			args := []string{"--sim-rate", "0", "--sim-tokens", "1", "--limit-sends", "0"}
			if store == "postgres" {
				args = append(args, "--store-url", pgtest.SchemaURL(t))
			}
			historyReadersAgree(t, trtest.Serve(t, args...))
		})
	}
}

func historyReadersAgree(t *testing.T, p *trtest.Proc) {
	c := trtest.Dial(t, p.WSURL(), nil)
	const conv = "agree"
	c.Join(conv, nil)
	var turns []string
	for i := range 15 {
		var ids map[string]any
		if i%3 != 2 { // every third turn with server-made ids
			ids = map[string]any{"message_id": fmt.Sprintf("%c%d", 'z'-i, i), "turn_id": fmt.Sprintf("%c%d-t", 'Z'-i, i)}
		}
		turns = append(turns, runTurn(t, c, conv, fmt.Sprintf("[sim tokens=1 rate=0] q%d", i), ids).ID)
	}
	all := messages(t, p.URL, conv, "?limit=500")
	if len(all) != 2*len(turns) {
		t.Fatalf("%d messages, want %d", len(all), 2*len(turns))
	}
	for i, turn := range turns {
		u, a := all[2*i], all[2*i+1]
		if u.Role != "user" || u.TurnID != turn || a.Role != "assistant" || a.MessageID != turn || a.ReplyTo != u.MessageID {
			t.Fatalf("messages %d, %d = %+v, %+v; want turn %s's user message and reply", 2*i, 2*i+1, u, a, turn)
		}
	}
	want := messageIDs(all)

	for _, k := range []int{1, 2, 3, 7, 30, 50} {
		http := messageIDs(messages(t, p.URL, conv, fmt.Sprintf("?limit=%d", k)))
		joined := joinedIDs(trtest.Dial(t, p.WSURL(), nil).Join(conv, map[string]any{"history": k}))
		if !slices.Equal(joined, http) || !slices.Equal(http, want[max(0, len(want)-k):]) {
			t.Errorf("K=%d: joined %v, HTTP page %v, want %v", k, joined, http, want[max(0, len(want)-k):])
		}
	}
	for _, limit := range []int{1, 4, 29, 30} {
		if got := pageBack(t, p.URL, conv, limit, nil); !slices.Equal(got, want) {
			t.Errorf("paging by %d: %v, want %v", limit, got, want)
		}
	}

	// New turns sent from another connection between the pages: the pages
	// still visit what was there once each.
	d := trtest.Dial(t, p.WSURL(), nil)
	d.Join(conv, nil)
	n := 0
	got := pageBack(t, p.URL, conv, 4, func() {
		n++
		runTurn(t, d, conv, fmt.Sprintf("[sim tokens=1 rate=0] meanwhile %d", n), map[string]any{"message_id": fmt.Sprintf("a-new%d", n)})
	})
	if !slices.Equal(got, want) {
		t.Fatalf("paging while turns are sent: %v, want %v", got, want)
	}
	all = messages(t, p.URL, conv, "?limit=500")
	want = messageIDs(all)

	// A turn streaming: joined.messages is the HTTP page of K+1 without
	// the turn's assistant message (which is joined.active), and paging
	// back while it streams and ends visits every message once.
	e := trtest.Dial(t, p.WSURL(), nil)
	e.Join(conv, nil)
	tr := startTurn(t, e, conv, "[sim tokens=100000 rate=50] go on", 2)
	for _, k := range []int{1, 2, 5} {
		page := messages(t, p.URL, conv, fmt.Sprintf("?limit=%d", k+1))
		last := page[len(page)-1]
		if last.MessageID != tr.ID || last.Status != "streaming" {
			t.Fatalf("K=%d: the HTTP page ends with %+v, want the streaming turn %s", k, last, tr.ID)
		}
		j := trtest.Dial(t, p.WSURL(), nil).Join(conv, map[string]any{"history": k})
		if got, want := joinedIDs(j), messageIDs(page[:k]); !slices.Equal(got, want) {
			t.Errorf("K=%d while a turn streams: joined %v, want %v", k, got, want)
		}
		if j.Obj("active").Str("turn_id") != tr.ID {
			t.Errorf("K=%d: joined.active %v, want %s", k, j["active"], tr.ID)
		}
	}
	userMsg := messages(t, p.URL, conv, "?limit=2")[0].MessageID
	want = append(want, userMsg, tr.ID)
	pages := 0
	got = pageBack(t, p.URL, conv, 3, func() {
		if pages++; pages == 2 {
			e.Send(map[string]any{"type": "cancel", "turn_id": tr.ID, "id": "c"})
			finish(t, e, tr)
		}
	})
	if !slices.Equal(got, want) {
		t.Fatalf("paging while a turn streams and ends: %v, want %v", got, want)
	}
}
