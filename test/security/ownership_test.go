package security_test

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// TestOwnership has a second user try every operation on the first user's
// conversation and running turn — join (also with after), send (also
// retrying the owner's message id), cancel over WebSocket and HTTP, GET
// messages, SSE, DELETE, and the compat paths — and checks each is
// forbidden (403 over HTTP), that the intruder learns nothing, and that
// nothing changed: the turn was never cancelled and streams on to the
// owner, and the stored conversation is the same.
func TestOwnership(t *testing.T) {
	t.Parallel()
	p := serveJWT(t, "--sim-rate", "50", "--sim-tokens", "2000")
	alice, mallory := tokenFor(t, "alice"), tokenFor(t, "mallory")
	const conv = "alice-conv"

	a := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: alice})
	a.Join(conv, nil)
	a.Send(map[string]any{"type": "send", "conversation_id": conv, "text": "alice's question", "message_id": "alice-m1", "id": "s"})
	tr := &trtest.Turn{}
	a.Until(wait, func(f trtest.Frame) bool {
		if f.Type() == "turn.start" {
			tr.ID = f.Str("turn_id")
		}
		tr.Apply(f)
		return tr.ID != "" && tr.Seq >= 1
	})
	before := storedMessages(t, p.URL, alice, conv)

	m := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: mallory})
	ws := []struct {
		name  string
		frame map[string]any
	}{
		{"join", map[string]any{"type": "join", "conversation_id": conv}},
		{"join after", map[string]any{"type": "join", "conversation_id": conv, "after": map[string]any{"turn_id": tr.ID, "seq": 0}}},
		{"send", map[string]any{"type": "send", "conversation_id": conv, "text": "hijack"}},
		{"send retrying alice's message id", map[string]any{"type": "send", "conversation_id": conv, "text": "x", "message_id": "alice-m1"}},
		{"send with alice's turn id", map[string]any{"type": "send", "conversation_id": conv, "text": "x", "turn_id": tr.ID}},
		{"cancel", map[string]any{"type": "cancel", "turn_id": tr.ID}},
		{"cancel again", map[string]any{"type": "cancel", "turn_id": tr.ID}},
	}
	for i, op := range ws {
		id := "op" + string(rune('a'+i))
		op.frame["id"] = id
		m.Send(op.frame)
		f := reply(t, m, id)
		if f.Type() != "error" || f.Str("code") != "forbidden" {
			t.Errorf("WS %s: %v, want forbidden", op.name, f)
		}
		if s := f.Str("message"); strings.Contains(s, "alice") || strings.Contains(s, tr.ID) {
			t.Errorf("WS %s: the error names the owner or the turn: %q", op.name, s)
		}
	}
	// An unknown turn is not_found, so forbidden means "exists, not yours";
	// ids are not secrets.
	m.Send(map[string]any{"type": "cancel", "turn_id": "no-such-turn", "id": "unk"})
	wantError(t, reply(t, m, "unk"), "not_found")

	sse := p.URL + "/v1/turns/" + tr.ID + "/events"
	httpOps := []struct {
		name, method, url, body string
	}{
		{"GET messages", "GET", p.URL + "/v1/conversations/" + conv + "/messages", ""},
		{"GET messages before", "GET", p.URL + "/v1/conversations/" + conv + "/messages?before=alice-m1", ""},
		{"POST message", "POST", p.URL + "/v1/conversations/" + conv + "/messages", `{"text":"hijack"}`},
		{"POST message retrying alice's id", "POST", p.URL + "/v1/conversations/" + conv + "/messages", `{"text":"x","message_id":"alice-m1"}`},
		{"cancel", "POST", p.URL + "/v1/turns/" + tr.ID + "/cancel", ""},
		{"SSE", "GET", sse, ""},
		{"SSE after", "GET", sse + "?after=1", ""},
		{"DELETE", "DELETE", p.URL + "/v1/conversations/" + conv, ""},
	}
	for _, op := range httpOps {
		code, hdr, body := do(t, op.method, op.url, mallory, op.body, nil)
		var e errorBody
		_ = json.Unmarshal(body, &e)
		if code != 403 || e.Error.Code != "forbidden" {
			t.Errorf("HTTP %s: %d %s, want 403 forbidden", op.name, code, body)
		}
		if strings.Contains(hdr.Get("Content-Type"), "event-stream") || strings.Contains(string(body), "alice's") {
			t.Errorf("HTTP %s leaked: %s", op.name, body)
		}
	}
	// SSE with Last-Event-ID too.
	if code, _, _ := do(t, "GET", sse, mallory, "", map[string][]string{"Last-Event-Id": {"1"}}); code != 403 {
		t.Errorf("SSE with Last-Event-ID: %d", code)
	}
	// The compatibility protocol's history and cancel, with mallory's token.
	for _, op := range []struct{ method, path, body string }{
		{"GET", "/api/history/" + conv, ""},
		{"DELETE", "/api/history/" + conv, ""},
		{"POST", "/api/cancel", `{"session_id":"` + conv + `","message_id":"` + tr.ID + `"}`},
	} {
		code, _, body := do(t, op.method, p.URL+op.path, mallory, op.body, nil)
		if code != 403 {
			t.Errorf("compat %s %s: %d %s, want 403", op.method, op.path, code, body)
		}
	}
	cw := trtest.Dial(t, strings.Replace(p.WSURL(), "/v1/ws", "/ws/chat", 1)+"?session_id="+conv+"&user_id=mallory&token="+mallory, nil)
	if f, err := cw.Next(wait); err != nil || f.Type() != "error" || cw.CloseStatus() != 1003 {
		t.Errorf("compat socket on alice's session: %v %v, close %d", f, err, cw.CloseStatus())
	}
	// Mallory's list does not show it, and her socket heard nothing of it.
	var list struct {
		Conversations []struct {
			ID string `json:"conversation_id"`
		} `json:"conversations"`
	}
	trtest.Do(t, "GET", p.URL+"/v1/conversations", mallory, nil, &list)
	for _, c := range list.Conversations {
		if c.ID == conv {
			t.Errorf("mallory's list shows alice's conversation")
		}
	}
	m.Send(`{"type":"ping","id":"last"}`)
	for _, f := range m.Until(wait, func(f trtest.Frame) bool { return f.Type() == "pong" }) {
		if f.Str("conversation_id") == conv && f.Type() != "error" {
			t.Errorf("mallory received %v", f)
		}
	}

	// Nothing changed: the turn is still streaming to alice; her own cancel
	// is the first one (already=false); the history is as it was.
	a.Send(map[string]any{"type": "cancel", "turn_id": tr.ID, "id": "alice-cancel"})
	var ack trtest.Frame
	a.Until(wait, func(f trtest.Frame) bool {
		tr.Apply(f)
		if f.Str("id") == "alice-cancel" {
			ack = f
		}
		return ack != nil && tr.Ends > 0
	})
	if ack.Type() != "ack" || ack.Str("status") != "cancelled" || ack["already"] != false {
		t.Fatalf("alice's cancel: %v; someone else's cancel took effect first", ack)
	}
	if tr.Status != "cancelled" || len(tr.Errors) > 0 {
		t.Fatalf("alice's turn: %s %v", tr.Status, tr.Errors)
	}
	after := storedMessages(t, p.URL, alice, conv)
	if len(after) != len(before) {
		t.Fatalf("stored messages went from %d to %d", len(before), len(after))
	}
	for i := range before {
		if before[i].ID != after[i].ID || before[i].Role == "user" && before[i].Content != after[i].Content {
			t.Fatalf("message %d changed: %+v → %+v", i, before[i], after[i])
		}
	}
	// Naming alice's (now ended) turn from mallory's own conversation
	// neither replays it nor reuses it.
	m.Join("mallory-conv", map[string]any{"after": map[string]any{"turn_id": tr.ID, "seq": 0}})
	m.Send(map[string]any{"type": "send", "conversation_id": "mallory-conv", "text": "x", "turn_id": tr.ID, "id": "reuse"})
	wantError(t, reply(t, m, "reuse"), "bad_request")
	m.Send(`{"type":"ping","id":"last2"}`)
	for _, f := range m.Until(wait, func(f trtest.Frame) bool { return f.Type() == "pong" }) {
		if f.Str("turn_id") == tr.ID && f.Type() != "error" {
			t.Errorf("mallory received alice's turn: %v", f)
		}
	}
	// Alice can still delete it.
	if code, _, body := do(t, "DELETE", p.URL+"/v1/conversations/"+conv, alice, "", nil); code != 204 {
		t.Fatalf("alice's delete: %d %s", code, body)
	}
	if code, _, _ := do(t, "GET", p.URL+"/v1/conversations/"+conv+"/messages", alice, "", nil); code != 404 {
		t.Fatalf("deleted conversation: %d", code)
	}
}

type storedMessage struct {
	ID      string `json:"message_id"`
	Role    string `json:"role"`
	Content string `json:"content"`
	Status  string `json:"status"`
	Error   string `json:"error"`
}

func storedMessages(t *testing.T, base, token, conv string) []storedMessage {
	t.Helper()
	var body struct {
		Messages []storedMessage `json:"messages"`
	}
	if code := trtest.Do(t, "GET", base+"/v1/conversations/"+conv+"/messages?limit=500", token, nil, &body); code != 200 {
		t.Fatalf("GET messages of %s: %d", conv, code)
	}
	return body.Messages
}

// TestDeletedConversationTakenByAnother: a user joined to a conversation
// that is deleted and then taken by another user receives nothing of the
// new owner's turns: her connection is told it no longer follows the
// conversation, and a join again is forbidden. A tab that stays on a
// conversation its own user deletes is told so, and keeps following the
// conversation she re-creates.
func TestDeletedConversationTakenByAnother(t *testing.T) {
	t.Parallel()
	p := serveJWT(t, "--sim-rate", "0", "--sim-tokens", "20")
	mallory, victim := tokenFor(t, "mallory"), tokenFor(t, "victim")
	const conv = "project-notes"

	m := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: mallory})
	m.Join(conv, nil)
	if code, _, body := do(t, "DELETE", p.URL+"/v1/conversations/"+conv, mallory, "", nil); code != 204 {
		t.Fatalf("DELETE: %d %s", code, body)
	}
	v := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: victim})
	v.Join(conv, nil)
	turn := func(c *trtest.Client, conv, text string) *trtest.Turn {
		c.Send(map[string]any{"type": "send", "conversation_id": conv, "text": text, "id": "s"})
		tr := &trtest.Turn{}
		c.Until(wait, func(f trtest.Frame) bool {
			if f.Type() == "turn.start" {
				tr.ID = f.Str("turn_id")
			}
			tr.Apply(f)
			return tr.ID != "" && tr.Ends > 0
		})
		return tr
	}
	turn(v, conv, "my password is hunter2")
	// Mallory's stale subscription is told of her delete, then that the
	// id is another user's now, and nothing else of conv.
	seen := m.Until(wait, func(f trtest.Frame) bool { return f.Type() == "error" && f.Str("code") == "forbidden" })
	if f := seen[0]; f.Type() != "error" || f.Str("code") != "not_found" || f.Str("conversation_id") != conv {
		t.Fatalf("mallory's connection was first told %v", f)
	}
	if last := seen[len(seen)-1]; last.Str("conversation_id") != conv {
		t.Fatalf("mallory's connection was told %v", last)
	}
	m.Send(map[string]any{"type": "join", "conversation_id": conv, "id": "again"})
	if f := reply(t, m, "again"); f.Str("code") != "forbidden" {
		t.Fatalf("mallory's join again: %v", f)
	}
	turn(v, conv, "and my pin is 1234")
	m.Send(map[string]any{"type": "ping", "id": "p"})
	seen = append(seen, m.Until(wait, func(f trtest.Frame) bool { return f.Type() == "pong" })...)
	for _, f := range seen {
		b, _ := json.Marshal(f)
		if strings.Contains(string(b), "hunter2") || strings.Contains(string(b), "1234") ||
			(f.Str("conversation_id") == conv && f.Type() != "error" && f.Type() != "ack") {
			t.Fatalf("mallory received %s", b)
		}
	}

	// The owner's own other tab follows the conversation she re-creates.
	tab1 := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: victim})
	tab1.Join("mine", nil)
	tab2 := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: victim})
	tab2.Join("mine", nil)
	turn(tab1, "mine", "first")
	if code, _, body := do(t, "DELETE", p.URL+"/v1/conversations/mine", victim, "", nil); code != 204 {
		t.Fatalf("DELETE mine: %d %s", code, body)
	}
	for _, tab := range []*trtest.Client{tab1, tab2} {
		seen := tab.Until(wait, func(f trtest.Frame) bool { return f.Type() == "error" })
		if last := seen[len(seen)-1]; last.Str("code") != "not_found" || last.Str("conversation_id") != "mine" || last["id"] != nil {
			t.Fatalf("a tab of the owner was told %v of the delete", last)
		}
	}
	sent := turn(tab1, "mine", "after the delete")
	got := &trtest.Turn{ID: sent.ID}
	tab2.Until(wait, func(f trtest.Frame) bool { got.Apply(f); return got.Ends > 0 })
	if got.Text.String() != sent.Text.String() || got.Status != "complete" {
		t.Fatalf("the other tab got %q (%s), the sender %q", got.Text.String(), got.Status, sent.Text.String())
	}
}
