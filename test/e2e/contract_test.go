package e2e_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// These tests hold the statements of the wire protocol that no other test
// checks on its own, each named after its rule.

var uuidV7 = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)

// reply waits for the answer to the frame with id on c.
func reply(t *testing.T, c *trtest.Client, id string) trtest.Frame {
	t.Helper()
	fs := c.Until(wait, func(f trtest.Frame) bool {
		return f.Str("id") == id && (f.Type() == "ack" || f.Type() == "error" || f.Type() == "joined" || f.Type() == "pong")
	})
	return fs[len(fs)-1]
}

// apiError is the body of an HTTP API error.
type apiError struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
		TurnID  string `json:"turn_id"`
	} `json:"error"`
}

// TestServerMadeIDsAreUUIDv7: a send that names no ids gets a message_id
// and a turn_id the server made, UUIDv7, over WebSocket and HTTP.
func TestServerMadeIDsAreUUIDv7(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "0", "--sim-tokens", "2")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("made", nil)
	c.Send(map[string]any{"type": "send", "conversation_id": "made", "text": "hi", "id": "s"})
	ack := reply(t, c, "s")
	if ack.Type() != "ack" || !uuidV7.MatchString(ack.Str("message_id")) || !uuidV7.MatchString(ack.Str("turn_id")) {
		t.Fatalf("send without ids answered %v, want UUIDv7 ids", ack)
	}
	c.UntilType(wait, "turn.end")
	var posted struct {
		Message struct {
			MessageID string `json:"message_id"`
		} `json:"message"`
		TurnID string `json:"turn_id"`
	}
	if code := trtest.Do(t, "POST", p.URL+"/v1/conversations/made-http/messages", "", map[string]any{"text": "hi"}, &posted); code != 202 {
		t.Fatalf("POST: %d", code)
	}
	if !uuidV7.MatchString(posted.Message.MessageID) || !uuidV7.MatchString(posted.TurnID) {
		t.Fatalf("POST without ids answered %+v, want UUIDv7 ids", posted)
	}
}

// TestIdentifierRule: ids match ^[A-Za-z0-9_.:-]{1,128}$; anything else is
// bad_request, over WebSocket and in the HTTP API's paths.
func TestIdentifierRule(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "0", "--sim-tokens", "2")
	c := trtest.Dial(t, p.WSURL(), nil)
	long := strings.Repeat("aZ9_.:-", 19)[:128]
	c.Join(long, nil)
	c.Send(map[string]any{"type": "send", "conversation_id": long, "text": "hi", "message_id": "m" + long[1:], "turn_id": "t" + long[1:], "id": "ok"})
	if f := reply(t, c, "ok"); f.Type() != "ack" || f.Str("turn_id") != "t"+long[1:] {
		t.Fatalf("send with 128-character ids: %v", f)
	}
	c.UntilType(wait, "turn.end")
	for _, bad := range []string{"", long + "a", "é", "a b", "a/b", "a+b", "a\x00"} {
		// A connection of its own: bad frames are counted (--limit-bad-frames).
		c := trtest.Dial(t, p.WSURL(), nil)
		for _, field := range []string{"conversation_id", "message_id", "turn_id"} {
			m := map[string]any{"type": "send", "conversation_id": "ids", "text": "hi", "id": "bad"}
			m[field] = bad
			c.Send(m)
			if f := reply(t, c, "bad"); f.Type() != "error" || f.Str("code") != "bad_request" {
				t.Errorf("send with %s %q: %v, want bad_request", field, bad, f)
			}
		}
		c.Send(map[string]any{"type": "cancel", "turn_id": bad, "id": "bad"})
		if f := reply(t, c, "bad"); f.Type() != "error" || f.Str("code") != "bad_request" {
			t.Errorf("cancel of %q: %v, want bad_request", bad, f)
		}
	}
	for _, bad := range []string{"a%20b", "%C3%A9", long + "a", "a%2Fb"} {
		for _, req := range []struct{ method, path string }{
			{"GET", "/v1/conversations/" + bad + "/messages"},
			{"POST", "/v1/conversations/" + bad + "/messages"},
			{"DELETE", "/v1/conversations/" + bad},
			{"POST", "/v1/turns/" + bad + "/cancel"},
			{"GET", "/v1/turns/" + bad + "/events"},
		} {
			var e apiError
			var body any
			if req.method == "POST" && strings.HasSuffix(req.path, "/messages") {
				body = map[string]any{"text": "hi"}
			}
			if code := trtest.Do(t, req.method, p.URL+req.path, "", body, &e); code != 400 || e.Error.Code != "bad_request" {
				t.Errorf("%s %s: %d %+v, want 400 bad_request", req.method, req.path, code, e)
			}
		}
	}
	for _, bad := range []string{"a b", "", long + "a"} {
		for _, field := range []string{"message_id", "turn_id"} {
			var e apiError
			if code := trtest.Do(t, "POST", p.URL+"/v1/conversations/ids-http/messages", "", map[string]any{"text": "hi", field: bad}, &e); code != 400 || e.Error.Code != "bad_request" {
				t.Errorf("POST with %s %q: %d %+v, want 400 bad_request", field, bad, code, e)
			}
		}
	}
	// An id left out, or null, is the server's to make.
	c.Send(`{"type":"send","conversation_id":"ids-null","text":"hi","message_id":null,"turn_id":null,"id":"null"}`)
	if f := reply(t, c, "null"); f.Type() != "ack" || !uuidV7.MatchString(f.Str("turn_id")) {
		t.Errorf("send with null ids: %v", f)
	}
}

// TestJoinedCarriesHistoryAndTheActiveTurn: joined.messages holds the last
// K messages (50 by default), oldest first, the user message of a running
// turn included; joined.active is that turn with every field, and null
// when none runs.
func TestJoinedCarriesHistoryAndTheActiveTurn(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "0", "--sim-tokens", "1", "--limit-sends", "0")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("hist", nil)
	for i := range 26 {
		runTurn(t, c, "hist", fmt.Sprintf("question %d", i), nil)
	}
	all := messages(t, p.URL, "hist", "?limit=500")
	ids := func(ms []any) []string {
		var out []string
		for _, m := range ms {
			out = append(out, trtest.Frame(m.(map[string]any)).Str("message_id"))
		}
		return out
	}
	want := func(ms []message) []string {
		var out []string
		for _, m := range ms {
			out = append(out, m.MessageID)
		}
		return out
	}
	for _, tt := range []struct {
		extra map[string]any
		n     int
	}{{nil, 50}, {map[string]any{"history": 3}, 3}, {map[string]any{"history": 0}, 0}, {map[string]any{"history": 500}, 52}} {
		d := trtest.Dial(t, p.WSURL(), nil)
		j := d.Join("hist", tt.extra)
		got, _ := j["messages"].([]any)
		if strings.Join(ids(got), ",") != strings.Join(want(all[len(all)-tt.n:]), ",") {
			t.Errorf("join %v: messages %v, want the last %d oldest first", tt.extra, ids(got), tt.n)
		}
		if v, ok := j["active"]; !ok || v != nil {
			t.Errorf("join %v with no turn running: active %v, want null", tt.extra, v)
		}
	}

	// A running turn: its user message is the last of joined.messages, and
	// joined.active describes it.
	c.Send(map[string]any{"type": "send", "conversation_id": "hist", "text": "[sim tokens=100000 rate=50] go on", "message_id": "running-m", "turn_id": "running-t", "id": "s"})
	tr := &trtest.Turn{ID: "running-t"}
	c.Until(wait, func(f trtest.Frame) bool { tr.Apply(f); return tr.Seq >= 3 })
	d := trtest.Dial(t, p.WSURL(), nil)
	j := d.Join("hist", map[string]any{"history": 2})
	ms, _ := j["messages"].([]any)
	if got := ids(ms); len(got) != 2 || got[1] != "running-m" {
		t.Fatalf("joined.messages of a running turn: %v, want its user message last", got)
	}
	a := j.Obj("active")
	if a.Str("turn_id") != "running-t" || a.Str("reply_to") != "running-m" || a.Str("status") != "streaming" ||
		a.Int("seq") < 3 || a.Str("model") == "" || a["from"] != nil {
		t.Fatalf("joined.active %v", a)
	}
	c.Until(wait, func(f trtest.Frame) bool { tr.Apply(f); return tr.Seq >= a.Int("seq") })
	if !strings.HasPrefix(tr.Text.String(), a.Str("text")) || len(a.Str("text")) == 0 {
		t.Fatalf("joined.active.text %q is not the turn's text up to seq %d", a.Str("text"), a.Int("seq"))
	}
	for _, k := range []string{"turn_id", "reply_to", "status", "seq", "text", "model"} {
		if _, ok := a[k]; !ok {
			t.Errorf("joined.active lacks %q: %v", k, a)
		}
	}
	c.Send(map[string]any{"type": "cancel", "turn_id": "running-t", "id": "c"})
	reply(t, c, "c")
}

// TestFramesOfATurnCarryTheirFields: message, turn.start, turn.delta,
// turn.end and ack carry what the protocol lists; a send's model is the
// turn's.
func TestFramesOfATurnCarryTheirFields(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "200", "--models", "other-model")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("fields", nil)
	c.Send(map[string]any{"type": "send", "conversation_id": "fields", "text": "[sim tokens=5] hi", "message_id": "fm", "turn_id": "ft", "model": "other-model", "id": "s"})
	fs := c.Until(wait, func(f trtest.Frame) bool { return f.Type() == "turn.end" })
	var sawAck, sawMsg, sawStart bool
	for _, f := range fs {
		switch f.Type() {
		case "ack":
			sawAck = true
			if f.Str("id") != "s" || f.Str("message_id") != "fm" || f.Str("turn_id") != "ft" {
				t.Errorf("ack %v", f)
			}
		case "message":
			sawMsg = true
			m := f.Obj("message")
			if f.Str("conversation_id") != "fields" || m.Str("message_id") != "fm" || m.Str("conversation_id") != "fields" ||
				m.Str("role") != "user" || m.Str("content") != "[sim tokens=5] hi" || m.Str("status") != "complete" {
				t.Errorf("message frame %v", f)
			}
			if _, err := time.Parse("2006-01-02T15:04:05.000Z", m.Str("created_at")); err != nil {
				t.Errorf("message created_at %q", m.Str("created_at"))
			}
		case "turn.start":
			sawStart = true
			if f.Str("conversation_id") != "fields" || f.Str("turn_id") != "ft" || f.Str("reply_to") != "fm" || f.Str("model") != "other-model" {
				t.Errorf("turn.start %v", f)
			}
		case "turn.delta":
			if f.Str("conversation_id") != "fields" || f.Str("turn_id") != "ft" {
				t.Errorf("turn.delta %v", f)
			}
			if from, ok := f["from"]; ok && int64(from.(float64)) == f.Int("seq") {
				t.Errorf("turn.delta carries from = seq: %v", f)
			}
			if _, ok := f["ts"]; ok {
				t.Errorf("turn.delta carries ts without --delta-timestamps: %v", f)
			}
		case "turn.end":
			if f.Str("conversation_id") != "fields" || f.Str("turn_id") != "ft" || f.Int("seq") != 5 || f.Str("status") != "complete" {
				t.Errorf("turn.end %v", f)
			}
			if _, ok := f["error"]; ok {
				t.Errorf("a complete turn's end carries an error: %v", f)
			}
		}
	}
	if !sawAck || !sawMsg || !sawStart {
		t.Fatalf("ack %v, message %v, turn.start %v among %v", sawAck, sawMsg, sawStart, fs)
	}
	m := storedTurn(t, p.URL, "fields", "ft")
	if m.Role != "assistant" || m.TurnID != "ft" || m.ReplyTo != "fm" || m.Status != "complete" {
		t.Fatalf("stored assistant message %+v", m)
	}
	// A model the server does not offer is refused.
	c.Send(map[string]any{"type": "send", "conversation_id": "fields", "text": "hi", "model": "no-such-model", "id": "bad"})
	if f := reply(t, c, "bad"); f.Type() != "error" || f.Str("code") != "bad_request" {
		t.Fatalf("send with an unknown model: %v", f)
	}
}

// TestErroredTurnKeepsItsText: a turn whose model fails ends with status
// error and an error message, and its stored content is the concatenation
// of its deltas.
func TestErroredTurnKeepsItsText(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "0")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("fails", nil)
	c.Send(map[string]any{"type": "send", "conversation_id": "fails", "text": "[sim tokens=50 error_after=10] hi", "turn_id": "et", "id": "s"})
	tr := &trtest.Turn{ID: "et"}
	var end trtest.Frame
	c.Until(wait, func(f trtest.Frame) bool {
		tr.Apply(f)
		if f.Type() == "turn.end" {
			end = f
		}
		return tr.Ends > 0
	})
	if len(tr.Errors) > 0 || tr.Status != "error" || tr.Seq != 10 || end.Str("error") == "" {
		t.Fatalf("turn ended %v (%v), want error after delta 10 with a message", end, tr.Errors)
	}
	if m := storedTurn(t, p.URL, "fails", "et"); m.Status != "error" || m.Content != tr.Text.String() || m.Content == "" {
		t.Fatalf("stored %s %q, streamed %q", m.Status, m.Content, tr.Text.String())
	}
}

// TestLeaveStopsEvents: after leave, a connection receives none of the
// conversation's events; a join starts them again.
func TestLeaveStopsEvents(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "0", "--sim-tokens", "3")
	a := trtest.Dial(t, p.WSURL(), nil)
	b := trtest.Dial(t, p.WSURL(), nil)
	a.Join("left", nil)
	b.Join("left", nil)
	b.Send(map[string]any{"type": "leave", "conversation_id": "left", "id": "l"})
	if f := reply(t, b, "l"); f.Type() != "ack" {
		t.Fatalf("leave: %v", f)
	}
	away := runTurn(t, a, "left", "while b is away", nil)
	// b's frames are written in order: had it received the turn's events,
	// they would come before the answer to this ping.
	b.Send(map[string]any{"type": "ping", "id": "p"})
	fs := b.Until(wait, func(f trtest.Frame) bool { return f.Type() == "pong" })
	if len(fs) != 1 {
		t.Fatalf("a connection that left received %v", fs)
	}
	b.Join("left", nil)
	tr := runTurn(t, a, "left", "b is back", nil)
	bt := &trtest.Turn{ID: tr.ID}
	for _, f := range finish(t, b, bt) {
		if f.Str("turn_id") == away.ID {
			t.Fatalf("a connection that left received %v", f)
		}
	}
	if bt.Text.String() != tr.Text.String() {
		t.Fatalf("after a new join: %q, want %q", bt.Text.String(), tr.Text.String())
	}
}

// TestConversationListOrderAndFields: GET /v1/conversations lists the
// user's conversations most recent first, with title and updated_at, and
// active_turn_id while a turn runs.
func TestConversationListOrderAndFields(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "50")
	c := trtest.Dial(t, p.WSURL(), nil)
	for _, conv := range []string{"older", "newer"} {
		c.Join(conv, nil)
		runTurn(t, c, conv, "[sim tokens=2] about "+conv, nil)
	}
	type entry struct {
		ConversationID string  `json:"conversation_id"`
		Title          string  `json:"title"`
		UpdatedAt      string  `json:"updated_at"`
		ActiveTurnID   *string `json:"active_turn_id"`
	}
	list := func() []entry {
		var body struct {
			Conversations []entry `json:"conversations"`
		}
		if code := trtest.Get(t, p.URL+"/v1/conversations", &body); code != 200 {
			t.Fatalf("GET /v1/conversations: %d", code)
		}
		return body.Conversations
	}
	l := list()
	if len(l) != 2 || l[0].ConversationID != "newer" || l[1].ConversationID != "older" {
		t.Fatalf("list %+v, want newer then older", l)
	}
	for _, e := range l {
		if e.Title != "[sim tokens=2] about "+e.ConversationID || e.ActiveTurnID != nil {
			t.Errorf("entry %+v", e)
		}
		if _, err := time.Parse(time.RFC3339, e.UpdatedAt); err != nil {
			t.Errorf("updated_at %q: %v", e.UpdatedAt, err)
		}
	}
	tr := startTurn(t, c, "older", "[sim tokens=100000] again", 1)
	l = list()
	if len(l) != 2 || l[0].ConversationID != "older" || l[0].ActiveTurnID == nil || *l[0].ActiveTurnID != tr.ID || l[1].ActiveTurnID != nil {
		t.Fatalf("list while a turn of older runs: %+v, want older first naming %s", l, tr.ID)
	}
	c.Send(map[string]any{"type": "cancel", "turn_id": tr.ID, "id": "c"})
	reply(t, c, "c")
}

// TestHTTPSendAndCancelAnswers: POST …/messages answers 202 with the
// message and turn id, 409 turn_active naming the running turn; POST
// …/cancel answers 200 with turn_id, status and already.
func TestHTTPSendAndCancelAnswers(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "50")
	var posted struct {
		Message struct {
			MessageID      string `json:"message_id"`
			ConversationID string `json:"conversation_id"`
			Role           string `json:"role"`
			Content        string `json:"content"`
			Status         string `json:"status"`
			CreatedAt      string `json:"created_at"`
		} `json:"message"`
		TurnID string `json:"turn_id"`
	}
	if code := trtest.Do(t, "POST", p.URL+"/v1/conversations/h/messages", "", map[string]any{"text": "[sim tokens=100000] hi", "message_id": "hm", "turn_id": "ht"}, &posted); code != 202 {
		t.Fatalf("POST: %d", code)
	}
	m := posted.Message
	if posted.TurnID != "ht" || m.MessageID != "hm" || m.ConversationID != "h" || m.Role != "user" || m.Content != "[sim tokens=100000] hi" || m.Status != "complete" || m.CreatedAt == "" {
		t.Fatalf("POST answered %+v", posted)
	}
	var e apiError
	if code := trtest.Do(t, "POST", p.URL+"/v1/conversations/h/messages", "", map[string]any{"text": "another"}, &e); code != 409 || e.Error.Code != "turn_active" || !strings.Contains(e.Error.Message+e.Error.TurnID, "ht") {
		t.Fatalf("POST while a turn runs: %d %+v, want 409 turn_active naming ht", code, e)
	}
	var cancel map[string]any
	if code := trtest.Do(t, "POST", p.URL+"/v1/turns/ht/cancel", "", nil, &cancel); code != 200 || cancel["turn_id"] != "ht" || cancel["status"] != "cancelled" || cancel["already"] != false {
		t.Fatalf("cancel: %d %v", code, cancel)
	}
	if code := trtest.Do(t, "POST", p.URL+"/v1/turns/ht/cancel", "", nil, &cancel); code != 200 || cancel["status"] != "cancelled" || cancel["already"] != true {
		t.Fatalf("second cancel: %d %v", code, cancel)
	}
}

// TestHealthReadinessAndMetrics: /healthz 200, /readyz 200 with status ok
// and its checks, /metrics in Prometheus text format.
func TestHealthReadinessAndMetrics(t *testing.T) {
	p := trtest.Serve(t)
	if code := trtest.Get(t, p.URL+"/healthz", nil); code != 200 {
		t.Fatalf("/healthz: %d", code)
	}
	var ready struct {
		Status string            `json:"status"`
		Checks map[string]string `json:"checks"`
	}
	if code := trtest.Get(t, p.URL+"/readyz", &ready); code != 200 || ready.Status != "ok" || len(ready.Checks) == 0 {
		t.Fatalf("/readyz: %d %+v", code, ready)
	}
	resp, err := http.Get(p.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") || !strings.Contains(string(body), "# TYPE ") {
		t.Fatalf("/metrics: %d %q\n%.300s", resp.StatusCode, resp.Header.Get("Content-Type"), body)
	}
}

// TestFlagsFromTheEnvironment: every flag is read from TOKENRELAY_<NAME>
// too, and the command line wins. It sets the environment of the servers
// it starts.
func TestFlagsFromTheEnvironment(t *testing.T) {
	t.Setenv("TOKENRELAY_SIM_TOKENS", "7")
	t.Setenv("TOKENRELAY_SIM_RATE", "0")
	p := trtest.Serve(t)
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("env", nil)
	if tr := runTurn(t, c, "env", "hi", nil); tr.Seq != 7 {
		t.Fatalf("TOKENRELAY_SIM_TOKENS=7: %d deltas", tr.Seq)
	}
	q := trtest.Serve(t, "--sim-tokens", "4")
	d := trtest.Dial(t, q.WSURL(), nil)
	d.Join("env", nil)
	if tr := runTurn(t, d, "env", "hi", nil); tr.Seq != 4 {
		t.Fatalf("--sim-tokens 4 beside TOKENRELAY_SIM_TOKENS=7: %d deltas", tr.Seq)
	}
}

// TestDefaultLimits: without limit flags, a frame of 65536 bytes is taken
// and one more closes 1009; a text of 32768 bytes is taken and one more is
// too_large; a user has 20 connections, the 21st closes 4009; a connection
// joins 16 conversations; a user runs 4 turns at once.
func TestDefaultLimits(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "20", "--sim-tokens", "100000")
	pad := func(n int) string {
		s := `{"type":"ping","id":"big","pad":""}`
		return s[:len(s)-2] + strings.Repeat("x", n-len(s)) + `"}`
	}
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Send(pad(65536))
	if f := reply(t, c, "big"); f.Type() != "pong" {
		t.Fatalf("65536-byte frame: %v", f)
	}
	over := trtest.Dial(t, p.WSURL(), nil)
	over.Send(pad(65537))
	if code := over.CloseStatus(); code != websocket.StatusMessageTooBig {
		t.Fatalf("65537-byte frame: close %d, want 1009", code)
	}

	c.Join("text", nil)
	c.Send(map[string]any{"type": "send", "conversation_id": "text", "text": strings.Repeat("b", 32769), "id": "over"})
	if f := reply(t, c, "over"); f.Type() != "error" || f.Str("code") != "too_large" {
		t.Fatalf("32769-byte text: %v", f)
	}
	c.Send(map[string]any{"type": "send", "conversation_id": "text", "text": strings.Repeat("b", 32768), "turn_id": "text-t", "id": "at"})
	if f := reply(t, c, "at"); f.Type() != "ack" {
		t.Fatalf("32768-byte text: %v", f)
	}

	// Joins: 16 on one connection (the one above is the first).
	for i := range 15 {
		c.Join(fmt.Sprintf("j%d", i), nil)
	}
	c.Send(map[string]any{"type": "join", "conversation_id": "j-over", "id": "j"})
	if f := reply(t, c, "j"); f.Type() != "error" || f.Str("code") != "rate_limited" {
		t.Fatalf("17th join: %v", f)
	}

	// Turns: 4 at once (text-t is the first).
	for i := range 3 {
		c.Send(map[string]any{"type": "send", "conversation_id": fmt.Sprintf("j%d", i), "text": "hi", "id": "t"})
		if f := reply(t, c, "t"); f.Type() != "ack" {
			t.Fatalf("turn %d: %v", i+2, f)
		}
	}
	c.Send(map[string]any{"type": "send", "conversation_id": "j3", "text": "hi", "id": "t"})
	if f := reply(t, c, "t"); f.Type() != "error" || f.Str("code") != "rate_limited" {
		t.Fatalf("5th turn at once: %v", f)
	}

	// Connections: c and 19 more; the 21st is closed with 4009.
	for i := range 19 {
		d := trtest.Dial(t, p.WSURL(), nil)
		d.Send(map[string]any{"type": "ping", "id": "p"})
		if f := reply(t, d, "p"); f.Type() != "pong" {
			t.Fatalf("connection %d: %v", i+2, f)
		}
	}
	last := trtest.Dial(t, p.WSURL(), nil)
	if code := last.CloseStatus(); code != 4009 {
		t.Fatalf("21st connection: close %d, want 4009", code)
	}
}

// TestCancelAckShape: a cancel's ack is exactly
// {"type":"ack","id","turn_id","status","already"}.
func TestCancelAckShape(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "50")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("shape", nil)
	tr := startTurn(t, c, "shape", "[sim tokens=100000] hi", 1)
	c.Send(map[string]any{"type": "cancel", "turn_id": tr.ID, "id": "c"})
	ack := ackOf(t, c, "c", tr)
	b, _ := json.Marshal(ack)
	keys := map[string]bool{}
	for k := range ack {
		keys[k] = true
	}
	if len(keys) != 5 || !keys["type"] || !keys["id"] || !keys["turn_id"] || !keys["status"] || !keys["already"] ||
		ack.Str("status") != "cancelled" || ack["already"] != false {
		t.Fatalf("cancel ack %s", b)
	}
}

// TestSimulatorDefaults: the simulator replies with 200 tokens by default,
// and a directive sets any subset of its knobs.
func TestSimulatorDefaults(t *testing.T) {
	p := trtest.Serve(t)
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("sim", nil)
	if tr := runTurn(t, c, "sim", "[sim rate=0] hi", nil); tr.Seq != 200 || tr.Status != "complete" {
		t.Fatalf("default reply: %s at seq %d, want complete at 200", tr.Status, tr.Seq)
	}
	if tr := runTurn(t, c, "sim", "[sim tokens=500 rate=2000 error_after=40] hi", nil); tr.Seq != 40 || tr.Status != "error" {
		t.Fatalf("[sim tokens=500 rate=2000 error_after=40]: %s at seq %d, want error at 40", tr.Status, tr.Seq)
	}
	if tr := runTurn(t, c, "sim", "[sim tokens=7 rate=0] hi", nil); tr.Seq != 7 || tr.Status != "complete" {
		t.Fatalf("[sim tokens=7 rate=0]: %s at seq %d, want complete at 7", tr.Status, tr.Seq)
	}
}

// TestQueuedTurnIsAnnouncedAndShown: a turn that waits for a worker is
// announced with turn.start when it is created, a join shows it as the
// active turn with status queued and no text, and a cancel ends it at seq 0.
func TestQueuedTurnIsAnnouncedAndShown(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "20", "--sim-tokens", "100000", "--worker-concurrency", "1")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("busy", nil)
	startTurn(t, c, "busy", "long", 1)
	w := trtest.Dial(t, p.WSURL(), nil)
	w.Join("waiting", nil)
	c.Send(map[string]any{"type": "send", "conversation_id": "waiting", "text": "next", "message_id": "qm", "turn_id": "qt", "id": "q"})
	// The busy turn holds the one worker slot for good: the turn.start
	// comes while qt is queued.
	fs := w.Until(wait, func(f trtest.Frame) bool { return f.Type() == "turn.start" || f.Type() == "turn.end" })
	if f := fs[len(fs)-1]; f.Type() != "turn.start" || f.Str("turn_id") != "qt" || f.Str("reply_to") != "qm" || f.Str("model") == "" {
		t.Fatalf("the queued turn was announced with %v", fs)
	}
	d := trtest.Dial(t, p.WSURL(), nil)
	j := d.Join("waiting", nil)
	a := j.Obj("active")
	if a.Str("turn_id") != "qt" || a.Str("status") != "queued" || a.Int("seq") != 0 || a.Str("text") != "" || a.Str("reply_to") != "qm" {
		t.Fatalf("joined.active of a queued turn: %v", a)
	}
	if ms, _ := j["messages"].([]any); len(ms) != 1 || trtest.Frame(ms[0].(map[string]any)).Str("message_id") != "qm" {
		t.Fatalf("joined.messages of a queued turn's conversation: %v", ms)
	}
	w.Send(map[string]any{"type": "cancel", "turn_id": "qt", "id": "c"})
	fs = w.Until(wait, func(f trtest.Frame) bool { return f.Type() == "turn.end" || f.Type() == "turn.delta" })
	if end := fs[len(fs)-1]; end.Type() != "turn.end" || end.Str("status") != "cancelled" || end.Int("seq") != 0 {
		t.Fatalf("queued turn cancelled: %v", fs)
	}
}

// TestSIGINTShutsDownLikeSIGTERM: SIGINT stops serve gracefully: the
// running turn ends interrupted with its text so far, connections get 1001,
// and the process exits 0.
func TestSIGINTShutsDownLikeSIGTERM(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "20", "--sim-tokens", "500")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("int", nil)
	tr := startTurn(t, c, "int", "long", 3)
	if err := p.StopWith(os.Interrupt); err != nil {
		t.Fatalf("exit after SIGINT: %v\n%s", err, p.Stderr())
	}
	for {
		f, err := c.Next(wait)
		if err != nil {
			break
		}
		tr.Apply(f)
	}
	if tr.Ends != 1 || tr.Status != "interrupted" || len(tr.Errors) > 0 {
		t.Fatalf("turn ended %d times with %q (%v), want once interrupted", tr.Ends, tr.Status, tr.Errors)
	}
	if code := c.CloseStatus(); code != websocket.StatusGoingAway {
		t.Fatalf("close code %d, want 1001", code)
	}
	q := p.Restart(t)
	if m := storedTurn(t, q.URL, "int", tr.ID); m.Status != "interrupted" || m.Content != tr.Text.String() {
		t.Fatalf("stored %s %q, streamed %q", m.Status, m.Content, tr.Text.String())
	}
}

// TestZeroLimitsAreUnlimited: 0 lifts a limit: a frame and a text far past
// the defaults are taken.
func TestZeroLimitsAreUnlimited(t *testing.T) {
	p := trtest.Serve(t, "--limit-frame-bytes", "0", "--limit-text-bytes", "0", "--limit-joins", "0", "--sim-rate", "0", "--sim-tokens", "2")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("big", nil)
	text := strings.Repeat("t", 300_000)
	c.Send(map[string]any{"type": "send", "conversation_id": "big", "text": text, "id": "s"})
	if f := reply(t, c, "s"); f.Type() != "ack" {
		t.Fatalf("300 kB text with no limits: %v", f)
	}
	c.UntilType(wait, "turn.end")
	for i := range 20 {
		c.Join(fmt.Sprintf("many-%d", i), nil)
	}
	var posted struct {
		Message struct {
			Content string `json:"content"`
		} `json:"message"`
	}
	if code := trtest.Do(t, "POST", p.URL+"/v1/conversations/big-http/messages", "", map[string]any{"text": text}, &posted); code != 202 || posted.Message.Content != text {
		t.Fatalf("POST of a 300 kB text with no limits: %d", code)
	}
}

// TestDeltaTimestamps: with --delta-timestamps every turn.delta carries
// ts, the producer's emission time in Unix microseconds.
func TestDeltaTimestamps(t *testing.T) {
	p := trtest.Serve(t, "--delta-timestamps", "--sim-rate", "100", "--sim-tokens", "20")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("ts", nil)
	before := time.Now()
	c.Send(map[string]any{"type": "send", "conversation_id": "ts", "text": "hi", "id": "s"})
	n := 0
	c.Until(wait, func(f trtest.Frame) bool {
		if f.Type() == "turn.delta" {
			n++
			ts, ok := f["ts"].(float64)
			at := time.UnixMicro(int64(ts))
			if !ok || at.Before(before.Add(-time.Second)) || at.After(time.Now().Add(time.Second)) {
				t.Fatalf("delta %v: ts is not its emission time in µs (sent at %v)", f, before)
			}
		}
		return f.Type() == "turn.end"
	})
	if n == 0 {
		t.Fatal("no deltas")
	}
}

// TestListeningAddressIsLogged: the address serve and gateway listen on,
// port 0 resolved, is logged as listening addr=….
func TestListeningAddressIsLogged(t *testing.T) {
	p := trtest.Serve(t, "--log-level", "info")
	deadline := time.Now().Add(wait)
	want := "listening addr=" + strings.TrimPrefix(p.URL, "http://")
	for !strings.Contains(p.Stderr(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("no %q in the log:\n%s", want, p.Stderr())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestSendDoesNotJoin: a connection that sends to a conversation it has
// not joined gets the ack and none of the conversation's events; a join
// whose after names a turn that is not the conversation's is a plain join.
func TestSendDoesNotJoin(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "0", "--sim-tokens", "3")
	c := trtest.Dial(t, p.WSURL(), nil)
	w := trtest.Dial(t, p.WSURL(), nil)
	w.Join("unjoined", nil)
	c.Send(map[string]any{"type": "send", "conversation_id": "unjoined", "text": "hi", "turn_id": "ut", "id": "s"})
	if f := reply(t, c, "s"); f.Type() != "ack" {
		t.Fatalf("send: %v", f)
	}
	finish(t, w, &trtest.Turn{ID: "ut"})
	c.Send(map[string]any{"type": "ping", "id": "p"})
	if fs := c.Until(wait, func(f trtest.Frame) bool { return f.Type() == "pong" }); len(fs) != 1 {
		t.Fatalf("a connection that did not join received %v", fs)
	}
	for _, after := range []string{"no-such-turn", "ut"} {
		j := c.Join("elsewhere", map[string]any{"after": map[string]any{"turn_id": after, "seq": 1}})
		if j["active"] != nil || j["from"] != nil {
			t.Fatalf("join with after naming %s, not this conversation's: %v", after, j)
		}
	}
}
