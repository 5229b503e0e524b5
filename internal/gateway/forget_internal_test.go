package gateway

import (
	"context"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/auth"
	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
	"github.com/tokenrelay/tokenrelay/internal/store"
	"github.com/tokenrelay/tokenrelay/internal/store/sqlite"
	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// A gateway keeps a conversation's bus subscription and its subscribers
// only while somebody follows it: once the last socket has
// left (or closed) and the last SSE reader has gone, it holds nothing of
// the conversation, however many were followed.
func TestGatewayForgetsConversationsNobodyFollows(t *testing.T) {
	st, err := sqlite.Open(t.Context(), filepath.Join(t.TempDir(), "t.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	a, err := auth.New(auth.Config{Dev: true})
	if err != nil {
		t.Fatal(err)
	}
	s := New(Config{}, bustest.Start(t), st, a)
	srv := httptest.NewServer(s)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = s.Shutdown(ctx)
		srv.Close()
	})
	ws := "ws" + strings.TrimPrefix(srv.URL, "http")

	// A turn that stays streaming (no worker runs here), for an SSE reader
	// and a compat socket to follow.
	if _, err := st.Send(t.Context(), store.SendRequest{ConversationID: "open", Owner: "dev", MessageID: "m1", TurnID: "t-open", Text: "hi", Now: time.Now()}); err != nil {
		t.Fatal(err)
	}
	if ok, err := st.StartTurn(t.Context(), "t-open", time.Now()); !ok || err != nil {
		t.Fatal(ok, err)
	}

	c1 := trtest.Dial(t, ws+"/v1/ws", nil)
	c2 := trtest.Dial(t, ws+"/v1/ws", nil)
	for _, conv := range []string{"a", "b", "open"} {
		c1.Join(conv, nil)
		c2.Join(conv, nil)
	}
	page := trtest.Dial(t, ws+"/ws/chat?session_id=open&user_id=dev&token=dev-token", nil)
	page.UntilType(10*time.Second, "welcome")
	resp, err := http.Get(srv.URL + "/v1/turns/t-open/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("SSE: %d", resp.StatusCode)
	}
	followed := func() map[string]int {
		out := map[string]int{}
		for conv, subs := range s.hub.subscribers("") {
			out[conv] = len(subs)
		}
		return out
	}
	waitFor := func(what string, ok func(map[string]int) bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for got := followed(); !ok(got); got = followed() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: the hub follows %v", what, got)
			}
			time.Sleep(10 * time.Millisecond) // polling the hub, not synchronising
		}
	}
	// Two sockets, the page and the SSE reader on "open".
	waitFor("all following", func(m map[string]int) bool { return m["a"] == 2 && m["b"] == 2 && m["open"] == 4 })

	c1.Send(map[string]any{"type": "leave", "conversation_id": "a"})
	waitFor("one left a", func(m map[string]int) bool { return m["a"] == 1 })
	c2.Send(map[string]any{"type": "leave", "conversation_id": "a"})
	waitFor("both left a", func(m map[string]int) bool { _, ok := m["a"]; return !ok })

	_ = c1.Conn.CloseNow()
	_ = c2.Conn.Close(1000, "")
	_ = page.Conn.CloseNow()
	waitFor("sockets closed", func(m map[string]int) bool { return len(m) == 1 && m["open"] == 1 })
	resp.Body.Close()
	waitFor("all gone", func(m map[string]int) bool { return len(m) == 0 })
}
