package security_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// TestFrameAndTextSize checks --limit-frame-bytes (close 1009 above it) and
// --limit-text-bytes (too_large over WebSocket and HTTP, the connection
// staying open).
func TestFrameAndTextSize(t *testing.T) {
	t.Parallel()
	p := serveJWT(t, "--limit-frame-bytes", "1024", "--limit-text-bytes", "100", "--sim-rate", "0", "--sim-tokens", "3")
	tok := tokenFor(t, "alice")
	pad := func(n int) string {
		s := `{"type":"ping","id":"big","pad":""}`
		return s[:len(s)-2] + strings.Repeat("x", n-len(s)) + `"}`
	}

	t.Run("frame at the limit", func(t *testing.T) {
		c := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: tok})
		c.Send(pad(1024))
		if f := reply(t, c, "big"); f.Type() != "pong" {
			t.Fatalf("1024-byte frame: %v", f)
		}
	})
	t.Run("frame over the limit", func(t *testing.T) {
		c := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: tok})
		c.Send(pad(1025))
		if code := c.CloseStatus(); code != websocket.StatusMessageTooBig {
			t.Fatalf("1025-byte frame: close %d, want 1009", code)
		}
	})
	t.Run("answers to the frames before it go out first", func(t *testing.T) {
		c := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: tok})
		want := map[string]bool{}
		for i := range 20 {
			id := "p" + strconv.Itoa(i)
			want[id] = true
			c.Send(map[string]any{"type": "ping", "id": id})
		}
		c.Send(pad(1025))
		for len(want) > 0 {
			f, err := c.Next(wait)
			if err != nil {
				t.Fatalf("%v, before the answers to %d frames", err, len(want))
			}
			delete(want, f.Str("id"))
		}
		if code := c.CloseStatus(); code != websocket.StatusMessageTooBig {
			t.Fatalf("after the answers: close %d, want 1009", code)
		}
	})
	waitMetric(t, p.URL, "tokenrelay_limit_hits_total", `limit="frame_bytes"`, 2)

	c := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: tok})
	c.Join("sizes", nil)
	send := func(id, text string) trtest.Frame {
		c.Send(map[string]any{"type": "send", "conversation_id": "sizes", "text": text, "id": id})
		return reply(t, c, id)
	}
	wantError(t, send("over", strings.Repeat("a", 101)), "too_large")
	wantError(t, send("over-utf8", strings.Repeat("é", 51)), "too_large") // bytes, not characters
	if f := send("at", strings.Repeat("é", 50)); f.Type() != "ack" {
		t.Fatalf("100-byte text: %v", f)
	}
	c.UntilType(wait, "turn.end")

	code, e := httpErr(t, "POST", p.URL+"/v1/conversations/sizes/messages", tok, `{"text":"`+strings.Repeat("b", 101)+`"}`)
	if code != 413 || e.Error.Code != "too_large" {
		t.Fatalf("HTTP 101-byte text: %d %+v", code, e)
	}
	code, e = httpErr(t, "POST", p.URL+"/v1/conversations/sizes/messages", tok, `{"text":"`+strings.Repeat("b", 1<<20)+`"}`)
	if code != 413 || e.Error.Code != "too_large" {
		t.Fatalf("HTTP 1 MiB body: %d %+v", code, e)
	}
	if got := trtest.Metric(t, p.URL, "tokenrelay_limit_hits_total", `limit="text_bytes"`); got != 3 {
		t.Errorf("text_bytes hits = %v, want 3", got)
	}
	// Nothing over the limit was stored.
	for _, m := range storedMessages(t, p.URL, tok, "sizes") {
		if m.Role == "user" && len(m.Content) > 100 {
			t.Fatalf("stored a %d-byte message", len(m.Content))
		}
	}
}

// TestHugeTextLimit: a --limit-text-bytes too large to bound a request's
// body by (6 times it) is as good as no limit; it does not wrap around to
// refuse every message posted over HTTP, native or compat.
func TestHugeTextLimit(t *testing.T) {
	t.Parallel()
	p := serveJWT(t, "--limit-text-bytes", "2000000000000000000", "--sim-rate", "0", "--sim-tokens", "3")
	tok := tokenFor(t, "alice")
	if code, _, b := do(t, "POST", p.URL+"/v1/conversations/huge/messages", tok, `{"text":"hello"}`, nil); code != 202 {
		t.Fatalf("POST a message: %d %s", code, b)
	}
	if code, _, b := do(t, "POST", p.URL+"/api/chat", tok, `{"session_id":"huge-compat","message":"hello"}`, nil); code != 200 {
		t.Fatalf("POST /api/chat: %d %s", code, b)
	}
}

// TestSendRate checks --limit-sends: a burst of 10, then rate_limited with
// retry_after_ms (WebSocket) or 429 with Retry-After (HTTP); other users
// keep their own budget.
func TestSendRate(t *testing.T) {
	t.Parallel()
	p := serveJWT(t, "--limit-sends", "6", "--limit-turns", "0", "--sim-rate", "0", "--sim-tokens", "2")
	alice := tokenFor(t, "alice")
	c := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: alice})
	for i := range 10 {
		id := "s" + strconv.Itoa(i)
		c.Send(map[string]any{"type": "send", "conversation_id": "rate-" + strconv.Itoa(i), "text": "hi", "id": id})
		if f := reply(t, c, id); f.Type() != "ack" {
			t.Fatalf("send %d of the burst: %v", i+1, f)
		}
	}
	c.Send(map[string]any{"type": "send", "conversation_id": "rate-x", "text": "hi", "id": "over"})
	f := reply(t, c, "over")
	wantError(t, f, "rate_limited")
	if ms := f.Int("retry_after_ms"); ms <= 0 || ms > 10_000 {
		t.Fatalf("retry_after_ms %d, want about 10000 (one send per 10 s)", ms)
	}
	code, hdr, body := do(t, "POST", p.URL+"/v1/conversations/rate-x/messages", alice, `{"text":"hi"}`, nil)
	if code != 429 || hdr.Get("Retry-After") == "" || !strings.Contains(string(body), `"retry_after_ms"`) {
		t.Fatalf("HTTP over the rate: %d Retry-After=%q %s", code, hdr.Get("Retry-After"), body)
	}
	// Bob is not affected.
	code, _, body = do(t, "POST", p.URL+"/v1/conversations/bob-1/messages", tokenFor(t, "bob"), `{"text":"hi"}`, nil)
	if code != 202 {
		t.Fatalf("bob's send: %d %s", code, body)
	}
	if got := trtest.Metric(t, p.URL, "tokenrelay_limit_hits_total", `limit="sends"`); got != 2 {
		t.Errorf("sends hits = %v, want 2", got)
	}
}

// TestRetriesAndTheSendRate checks that a retried message_id is answered
// with the stored pair without spending the send budget, even once the
// budget is spent.
func TestRetriesAndTheSendRate(t *testing.T) {
	t.Parallel()
	p := serveJWT(t, "--limit-sends", "6", "--limit-turns", "0", "--sim-rate", "0", "--sim-tokens", "2")
	alice := tokenFor(t, "alice")
	c := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: alice})
	send := func(conv, msg, id string) trtest.Frame {
		t.Helper()
		c.Send(map[string]any{"type": "send", "conversation_id": conv, "message_id": msg, "text": "hi", "id": id})
		return reply(t, c, id)
	}
	first := send("retry-0", "m0", "first")
	if first.Type() != "ack" || first.Str("turn_id") == "" {
		t.Fatalf("first send: %v", first)
	}
	retry := func(id string) {
		t.Helper()
		if f := send("retry-0", "m0", id); f.Type() != "ack" || f.Str("message_id") != "m0" || f.Str("turn_id") != first.Str("turn_id") {
			t.Fatalf("retry %s: %v, want the ack of %v", id, f, first)
		}
	}
	for i := range 12 {
		retry("r" + strconv.Itoa(i))
	}
	// The retries spent nothing: nine new sends fill the burst of ten.
	for i := 1; i < 10; i++ {
		if f := send("retry-"+strconv.Itoa(i), "n"+strconv.Itoa(i), "n"+strconv.Itoa(i)); f.Type() != "ack" {
			t.Fatalf("new send %d after the retries: %v", i, f)
		}
	}
	wantError(t, send("retry-x", "nx", "over"), "rate_limited")
	// Over the budget, a retry still gets its pair, over HTTP too.
	retry("limited")
	var out struct {
		Message struct {
			MessageID string `json:"message_id"`
		} `json:"message"`
		TurnID string `json:"turn_id"`
	}
	code, _, body := do(t, "POST", p.URL+"/v1/conversations/retry-0/messages", alice, `{"text":"hi","message_id":"m0"}`, nil)
	if err := json.Unmarshal(body, &out); code != 202 || err != nil || out.Message.MessageID != "m0" || out.TurnID != first.Str("turn_id") {
		t.Fatalf("HTTP retry over the budget: %d %s", code, body)
	}
	// Another user's message id is not a retry of hers.
	code, _, body = do(t, "POST", p.URL+"/v1/conversations/retry-0/messages", tokenFor(t, "bob"), `{"text":"hi","message_id":"m0"}`, nil)
	if code != 403 {
		t.Fatalf("bob retrying alice's message: %d %s, want 403", code, body)
	}
}

// TestConnectionsPerUser checks --limit-connections: the next connection
// of that user is closed with 4009, another user's is not, and a closed
// connection frees its slot.
func TestConnectionsPerUser(t *testing.T) {
	t.Parallel()
	p := serveJWT(t, "--limit-connections", "3")
	alice := &trtest.DialOptions{Token: tokenFor(t, "alice")}
	var open []*trtest.Client
	for range 3 {
		c := trtest.Dial(t, p.WSURL(), alice)
		c.Send(`{"type":"ping","id":"p"}`)
		reply(t, c, "p")
		open = append(open, c)
	}
	if code := closeCode(t, p.WSURL(), alice, wait); code != 4009 {
		t.Fatalf("4th connection: close %d, want 4009", code)
	}
	// The browser form of the token counts for the same user.
	if code := closeCode(t, p.WSURL()+"?access_token="+url.QueryEscape(alice.Token), nil, wait); code != 4009 {
		t.Fatalf("4th connection with ?access_token=: close %d, want 4009", code)
	}
	if code := closeCode(t, p.WSURL(), &trtest.DialOptions{Token: tokenFor(t, "bob")}, time.Second); code != -1 {
		t.Fatalf("bob's connection closed with %d", code)
	}
	open[0].Conn.Close(websocket.StatusNormalClosure, "")
	deadline := time.Now().Add(wait)
	for closeCode(t, p.WSURL(), alice, 300*time.Millisecond) != -1 {
		if time.Now().After(deadline) {
			t.Fatal("a closed connection's slot was never freed")
		}
	}
	if got := trtest.Metric(t, p.URL, "tokenrelay_limit_hits_total", `limit="connections"`); got < 2 {
		t.Errorf("connections hits = %v, want at least 2", got)
	}
}

// TestJoinsPerConnection checks --limit-joins: re-joining a conversation
// already joined does not count, leaving frees a slot, and the limit is per
// connection.
func TestJoinsPerConnection(t *testing.T) {
	t.Parallel()
	p := serveJWT(t, "--limit-joins", "3", "--sim-rate", "0", "--sim-tokens", "5")
	alice := &trtest.DialOptions{Token: tokenFor(t, "alice")}
	c := trtest.Dial(t, p.WSURL(), alice)
	join := func(conv, id string) trtest.Frame {
		c.Send(map[string]any{"type": "join", "conversation_id": conv, "id": id})
		return reply(t, c, id)
	}
	for i, conv := range []string{"j1", "j2", "j3", "j1", "j1", "j3"} {
		if f := join(conv, "ok"+strconv.Itoa(i)); f.Type() != "joined" {
			t.Fatalf("join %s (#%d): %v", conv, i+1, f)
		}
	}
	f := join("j4", "over")
	wantError(t, f, "rate_limited")
	if !strings.Contains(f.Str("message"), "3") || !strings.Contains(f.Str("message"), "leave") {
		t.Errorf("the error does not name the limit and the way out: %v", f)
	}
	if ms, ok := f["retry_after_ms"].(float64); !ok || ms <= 0 {
		t.Errorf("rate_limited without retry_after_ms: %v", f)
	}
	// A refused join is not joined: no events of j4 arrive. Leave frees a
	// slot.
	c.Send(map[string]any{"type": "leave", "conversation_id": "j2", "id": "leave"})
	reply(t, c, "leave")
	if f := join("j4", "after-leave"); f.Type() != "joined" {
		t.Fatalf("join after a leave: %v", f)
	}
	wantError(t, join("j5", "over2"), "rate_limited")
	// A refused join claims nothing: another user can still create j6.
	wantError(t, join("j6", "over3"), "rate_limited")
	bob := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: tokenFor(t, "bob")})
	bob.Send(map[string]any{"type": "join", "conversation_id": "j6", "id": "bob"})
	if f := reply(t, bob, "bob"); f.Type() != "joined" {
		t.Fatalf("bob's join of a conversation alice was refused: %v", f)
	}
	// Another connection of the same user has its own count.
	d := trtest.Dial(t, p.WSURL(), alice)
	for i, conv := range []string{"j1", "j2", "j5"} {
		d.Send(map[string]any{"type": "join", "conversation_id": conv, "id": "d" + strconv.Itoa(i)})
		if f := reply(t, d, "d"+strconv.Itoa(i)); f.Type() != "joined" {
			t.Fatalf("second connection, join %s: %v", conv, f)
		}
	}
	// Events still reach the joined conversations after the refusals.
	tr := startTurn(t, c, "j4", "still joined")
	finish(t, c, tr)
	if got := trtest.Metric(t, p.URL, "tokenrelay_limit_hits_total", `limit="joins"`); got != 3 {
		t.Errorf("joins hits = %v, want 3", got)
	}
}

// TestNewConversationRate checks --limit-new-conversations: a user's
// joins (and compatibility sockets) create at most that many conversations
// in a burst, then one per minute / limit; a refused one creates nothing,
// joining conversations the user has is not limited, and another user is
// not affected.
func TestNewConversationRate(t *testing.T) {
	t.Parallel()
	p := serveJWT(t, "--limit-new-conversations", "3")
	alice := tokenFor(t, "alice")
	c := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: alice})
	join := func(c *trtest.Client, conv, id string) trtest.Frame {
		c.Send(map[string]any{"type": "join", "conversation_id": conv, "id": id})
		return reply(t, c, id)
	}
	for i := range 3 {
		conv := "n" + strconv.Itoa(i)
		if f := join(c, conv, conv); f.Type() != "joined" {
			t.Fatalf("join %s: %v", conv, f)
		}
		c.Send(map[string]any{"type": "leave", "conversation_id": conv})
	}
	f := join(c, "n3", "over")
	wantError(t, f, "rate_limited")
	if ms, ok := f["retry_after_ms"].(float64); !ok || ms < 1000 {
		t.Errorf("rate_limited without a retry_after_ms of a new conversation's time: %v", f)
	}
	if !strings.Contains(f.Str("message"), "3") {
		t.Errorf("the error does not name the limit: %v", f)
	}
	// Conversations alice has are joined as before.
	if f := join(c, "n0", "again"); f.Type() != "joined" {
		t.Fatalf("re-join of alice's conversation: %v", f)
	}
	// Her compatibility socket on a new session is refused the same way,
	// with the "try again later" close; on one she has it is served.
	compat := strings.Replace(p.WSURL(), "/v1/ws", "/ws/chat", 1) + "?user_id=alice&token=" + alice + "&session_id="
	cw := trtest.Dial(t, compat+"n4", nil)
	if f, err := cw.Next(wait); err != nil || f.Type() != "error" || cw.CloseStatus() != websocket.StatusTryAgainLater {
		t.Errorf("compat socket on a new session over the limit: %v %v, close %d", f, err, cw.CloseStatus())
	}
	cw = trtest.Dial(t, compat+"n1", nil)
	if f, err := cw.Next(wait); err != nil || f.Type() != "welcome" {
		t.Errorf("compat socket on alice's session: %v %v", f, err)
	}
	// Nothing was created by the refusals: bob can take both ids, and he
	// has a budget of his own.
	bob := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: tokenFor(t, "bob")})
	for _, conv := range []string{"n3", "n4"} {
		if f := join(bob, conv, "bob-"+conv); f.Type() != "joined" {
			t.Fatalf("bob's join of %s, refused to alice: %v", conv, f)
		}
	}
	if got := trtest.Metric(t, p.URL, "tokenrelay_limit_hits_total", `limit="new_conversations"`); got != 2 {
		t.Errorf("new_conversations hits = %v, want 2", got)
	}
}

// TestConcurrentTurns checks --limit-turns: a send past the limit is
// rate_limited (429 over HTTP) until one of the user's turns ends; another
// user is not affected.
func TestConcurrentTurns(t *testing.T) {
	t.Parallel()
	p := serveJWT(t, "--limit-turns", "2", "--sim-rate", "40", "--sim-tokens", "2000")
	alice := tokenFor(t, "alice")
	c := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: alice})
	for _, conv := range []string{"t1", "t2", "t3"} {
		c.Join(conv, nil)
	}
	t1 := startTurn(t, c, "t1", "one")
	startTurn(t, c, "t2", "two")
	c.Send(map[string]any{"type": "send", "conversation_id": "t3", "text": "three", "id": "over"})
	f := reply(t, c, "over")
	wantError(t, f, "rate_limited")
	if f.Int("retry_after_ms") <= 0 {
		t.Errorf("no retry_after_ms: %v", f)
	}
	if code, e := httpErr(t, "POST", p.URL+"/v1/conversations/t3/messages", alice, `{"text":"three"}`); code != 429 || e.Error.Code != "rate_limited" {
		t.Fatalf("HTTP past the turn limit: %d %+v", code, e)
	}
	if code, _, body := do(t, "POST", p.URL+"/v1/conversations/bob/messages", tokenFor(t, "bob"), `{"text":"hi"}`, nil); code != 202 {
		t.Fatalf("bob: %d %s", code, body)
	}
	c.Send(map[string]any{"type": "cancel", "turn_id": t1.ID, "id": "c1"})
	if f := reply(t, c, "c1"); f.Type() != "ack" {
		t.Fatalf("cancel: %v", f)
	}
	c.Send(map[string]any{"type": "send", "conversation_id": "t3", "text": "three", "id": "again"})
	if f := reply(t, c, "again"); f.Type() != "ack" {
		t.Fatalf("send after a turn ended: %v", f)
	}
	if got := trtest.Metric(t, p.URL, "tokenrelay_limit_hits_total", `limit="turns"`); got != 2 {
		t.Errorf("turns hits = %v, want 2", got)
	}
}

// TestTokenBudget checks --limit-tokens-per-hour: a turn that reaches the
// budget while it streams stops there with status error, a message saying
// why and its text so far; the next turn ends at once the same way, in
// turn.end, in the stored message and over SSE; another user is not
// affected.
func TestTokenBudget(t *testing.T) {
	t.Parallel()
	p := serveJWT(t, "--limit-tokens-per-hour", "30", "--sim-rate", "0", "--sim-tokens", "25")
	alice := tokenFor(t, "alice")
	c := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: alice})
	c.Join("budget", nil)
	run := func(text string) (*trtest.Turn, trtest.Frame) {
		c.Send(map[string]any{"type": "send", "conversation_id": "budget", "text": text, "id": text})
		tr := &trtest.Turn{}
		var end trtest.Frame
		c.Until(wait, func(f trtest.Frame) bool {
			if f.Type() == "error" {
				t.Fatalf("send: %v", f)
			}
			if f.Type() == "turn.start" {
				tr.ID = f.Str("turn_id")
			}
			tr.Apply(f)
			if f.Type() == "turn.end" && f.Str("turn_id") == tr.ID {
				end = f
			}
			return end != nil
		})
		return tr, end
	}
	if tr, _ := run("first question"); tr.Status != "complete" { // 2 + 25 tokens: within 30
		t.Fatalf("first turn: %s", tr.Status)
	}
	// Starts with 27 spent: stopped after 3 of its 25 tokens, which it keeps.
	cut, cutEnd := run("second question")
	if cut.Status != "error" || cut.Seq != 3 || !strings.Contains(cutEnd.Str("error"), "budget") {
		t.Fatalf("second turn: %s after %d deltas, error %q; want error after 3", cut.Status, cut.Seq, cutEnd.Str("error"))
	}
	if stored := storedMessages(t, p.URL, alice, "budget"); stored[len(stored)-1].Content != cut.Text.String() {
		t.Fatalf("stored %q, streamed %q", stored[len(stored)-1].Content, cut.Text.String())
	}
	tr, end := run("third question")
	msg := end.Str("error")
	if tr.Status != "error" || tr.Seq != 0 || !strings.Contains(msg, "budget") || !strings.Contains(msg, "30") {
		t.Fatalf("over budget: status %s, error %q; want error naming the budget", tr.Status, msg)
	}
	stored := storedMessages(t, p.URL, alice, "budget")
	if last := stored[len(stored)-1]; last.Status != "error" || last.Error != msg {
		t.Fatalf("stored: %+v", last)
	}
	_, _, body := do(t, "GET", p.URL+"/v1/turns/"+tr.ID+"/events", alice, "", nil)
	if !strings.Contains(string(body), "event: end") || !strings.Contains(string(body), "budget") {
		t.Fatalf("SSE of the refused turn: %s", body)
	}
	b := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: tokenFor(t, "bob")})
	b.Join("bob", nil)
	if tr := startTurn(t, b, "bob", "bob's question"); tr == nil {
		t.Fatal("bob's turn did not stream")
	}
	waitMetric(t, p.URL, "tokenrelay_limit_hits_total", `limit="tokens_per_hour"`, 2)
}

// TestBadFrames checks --limit-bad-frames: each bad frame is answered with
// bad_request, and one more than the limit closes the connection with 1008.
func TestBadFrames(t *testing.T) {
	t.Parallel()
	p := serveJWT(t, "--limit-bad-frames", "3")
	tok := &trtest.DialOptions{Token: tokenFor(t, "alice")}
	c := trtest.Dial(t, p.WSURL(), tok)
	bad := []string{`{"type":"nope","id":"b0"}`, `{"type":"join","conversation_id":"a b","id":"b1"}`, `not json`}
	for i, f := range bad {
		c.Send(f)
		got, err := c.Next(wait)
		if err != nil || got.Str("code") != "bad_request" {
			t.Fatalf("bad frame %d: %v %v", i, got, err)
		}
	}
	// Good frames in between do not reset the count, nor close it.
	c.Send(`{"type":"ping","id":"ok"}`)
	if f := reply(t, c, "ok"); f.Type() != "pong" {
		t.Fatalf("ping: %v", f)
	}
	if err := c.Conn.Write(trtest.Ctx(t, wait), websocket.MessageBinary, []byte(`{"type":"ping"}`)); err != nil {
		t.Fatal(err)
	}
	if code := c.CloseStatus(); code != websocket.StatusPolicyViolation {
		t.Fatalf("4th bad frame (binary): close %d (%v), want 1008", code, c.CloseErr())
	}
	// Errors that are not about the frame (forbidden, not_found) do not count.
	d := trtest.Dial(t, p.WSURL(), tok)
	for i := range 5 {
		id := fmt.Sprint("nf", i)
		d.Send(map[string]any{"type": "cancel", "turn_id": "unknown", "id": id})
		wantError(t, reply(t, d, id), "not_found")
	}
	d.Send(`{"type":"ping","id":"alive"}`)
	if f := reply(t, d, "alive"); f.Type() != "pong" {
		t.Fatalf("after not_found errors: %v", f)
	}
	if got := trtest.Metric(t, p.URL, "tokenrelay_limit_hits_total", `limit="bad_frames"`); got != 1 {
		t.Errorf("bad_frames hits = %v, want 1", got)
	}

	// A burst: the frame past the limit is answered and closes the
	// connection; nothing sent after it is handled.
	e := trtest.Dial(t, p.WSURL(), tok)
	// The server may close before the burst is all written.
	burst := make([]string, 0, 11)
	for i := range 10 {
		burst = append(burst, fmt.Sprintf(`{"type":"nope","id":"burst%d"}`, i))
	}
	for _, f := range append(burst, `{"type":"ping","id":"late"}`) {
		if e.Conn.Write(trtest.Ctx(t, wait), websocket.MessageText, []byte(f)) != nil {
			break
		}
	}
	var got []string
	for {
		f, err := e.Next(wait)
		if errors.Is(err, trtest.ErrClosed) {
			break
		}
		if err != nil {
			t.Fatalf("burst: %v after %v", err, got)
		}
		got = append(got, f.Type()+":"+f.Str("id"))
	}
	want := []string{"error:burst0", "error:burst1", "error:burst2", "error:burst3"}
	if !slices.Equal(got, want) {
		t.Errorf("burst of 10 bad frames and a ping, limit 3: got %v, want %v", got, want)
	}
	if code := e.CloseStatus(); code != websocket.StatusPolicyViolation {
		t.Errorf("burst: close %d (%v), want 1008", code, e.CloseErr())
	}
}

// TestLimitFromEnvironment checks that a limit is also read from
// TOKENRELAY_LIMIT_<WHAT>. It sets the environment of the server it starts,
// so it does not run in parallel.
func TestLimitFromEnvironment(t *testing.T) {
	t.Setenv("TOKENRELAY_LIMIT_CONNECTIONS", "1")
	p := serveJWT(t)
	alice := &trtest.DialOptions{Token: tokenFor(t, "alice")}
	c := trtest.Dial(t, p.WSURL(), alice)
	c.Send(`{"type":"ping","id":"p"}`)
	reply(t, c, "p")
	if code := closeCode(t, p.WSURL(), alice, wait); code != 4009 {
		t.Fatalf("2nd connection with TOKENRELAY_LIMIT_CONNECTIONS=1: close %d, want 4009", code)
	}
}

// A compat socket refused for --limit-connections (close 4009) creates
// nothing: its session stays free for anyone, and the user's allowance of
// new conversations is untouched.
func TestCompatSocketRefusedForConnectionsCreatesNothing(t *testing.T) {
	p := serveJWT(t, "--limit-connections", "1", "--limit-new-conversations", "1")
	alice := tokenFor(t, "alice")
	c := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: alice}) // her one connection
	c.Send(map[string]any{"type": "ping", "id": "p"})
	reply(t, c, "p")

	compat := strings.Replace(p.WSURL(), "/v1/ws", "/ws/chat", 1) + "?user_id=alice&token=" + alice + "&session_id=refused"
	cw := trtest.Dial(t, compat, nil)
	<-cw.Done()
	if code := cw.CloseStatus(); code != 4009 {
		t.Fatalf("compat socket past --limit-connections: close %d, want 4009", code)
	}
	bob := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: tokenFor(t, "bob")})
	bob.Send(map[string]any{"type": "join", "conversation_id": "refused", "id": "j"})
	if f := reply(t, bob, "j"); f.Type() != "joined" {
		t.Errorf("the refused socket's session was created: another user's join of it got %v", f)
	}
	c.Send(map[string]any{"type": "join", "conversation_id": "fresh", "id": "j2"})
	if f := reply(t, c, "j2"); f.Type() != "joined" {
		t.Errorf("the refused socket spent a new conversation: the user's next one got %v", f)
	}
}
