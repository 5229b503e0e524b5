package compat_test

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/golang-jwt/jwt/v5"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// A new session: welcome, no history frame (nothing stored), and the
// defaults of session_id and user_id; /ws/chat/v2 is the same path.
func TestWelcomeWithoutHistory(t *testing.T) {
	t.Parallel()
	p := serve(t)
	c := page(t, p, "fresh-session", "demo_user")
	if before := pingPong(t, c); len(before) != 0 {
		t.Fatalf("frames after welcome on an empty session: %v", before)
	}

	d := trtest.Dial(t, wsURL(p, "/ws/chat/v2", url.Values{"token": {"dev-token"}}), nil)
	f, err := d.Next(wait)
	if err != nil || f.Type() != "welcome" || f.Str("sessionId") != "default" {
		t.Fatalf("v2 without session_id: %v %v, want welcome to session default", f, err)
	}
	// The default user owns the default session now.
	sendChat(t, p, "default", "", "[sim tokens=3 rate=0] hello")
	r := &reply{t: t}
	r.untilFinal(d)
	msgs := history(t, p, "default")
	if len(msgs) != 2 || msgs[0].Str("user_id") != "default_user" {
		t.Fatalf("history of session default = %v", msgs)
	}
}

// Keep-alives: JSON ping, text ping, heartbeat; anything else is ignored
// and the socket stays open.
func TestKeepAlivesAndUnknownFrames(t *testing.T) {
	t.Parallel()
	p := serve(t)
	c := page(t, p, "keepalive", "demo_user")

	c.Send("ping")
	f, err := c.Next(wait)
	if err != nil || f.Type() != "!invalid" || f.Str("raw") != "pong" {
		t.Fatalf("text ping answered %v %v, want text pong", f, err)
	}
	c.Send(map[string]any{"type": "heartbeat"})
	if f, err := c.Next(wait); err != nil || f.Type() != "heartbeat_ack" {
		t.Fatalf("heartbeat answered %v %v", f, err)
	}
	c.Send("not json at all")
	c.Send(map[string]any{"type": "no-such-type"})
	c.Send(map[string]any{"type": "reconnect", "messageId": 42})
	c.Send(map[string]any{"kind": "ping"})
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if err := c.Conn.Write(ctx, websocket.MessageBinary, []byte{1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	if before := pingPong(t, c); len(before) != 0 {
		t.Fatalf("frames answered to ignored input: %v", before)
	}
	if raw := string(c.Raw[len(c.Raw)-1]); raw != `{"type":"pong"}` {
		t.Fatalf("pong frame = %s", raw)
	}
}

// A reply streams as frames whose content is the whole text so far, then
// one complete frame; the user message is not sent live; history then
// holds both, finished.
func TestReplyStreamsWholeText(t *testing.T) {
	t.Parallel()
	p := serve(t)
	c := page(t, p, "stream", "demo_user")
	prompt := `[sim echo=1 rate=200] Xin chào "bạn" — a\tb <tag> & \u2028 line` + "\nend"
	userID := sendChat(t, p, "stream", "demo_user", prompt)
	r := &reply{t: t}
	r.untilFinal(c)
	d := r.final.Obj("data")
	if d.Str("session_id") != "stream" || d.Str("user_id") != "demo_user" || d.Str("role") != "assistant" {
		t.Fatalf("final frame %v", r.final)
	}
	if d["chunk"] != nil {
		t.Fatalf("final frame chunk = %v, want null", d["chunk"])
	}
	if r.frames < 3 {
		t.Fatalf("only %d frames for an echoed reply", r.frames)
	}
	msgs := history(t, p, "stream")
	if len(msgs) != 2 {
		t.Fatalf("history = %v", msgs)
	}
	u, a := msgs[0], msgs[1]
	if u.Str("message_id") != userID || u.Str("role") != "user" || !strings.Contains(prompt, u.Str("content")) || u["is_complete"] != true || u["chunk"] != nil {
		t.Fatalf("history user message = %v (sent %s)", u, userID)
	}
	if a.Str("message_id") != r.id || a.Str("content") != r.content || a["is_complete"] != true {
		t.Fatalf("history reply = %v, streamed %q as %s", a, r.content, r.id)
	}
	if !strings.Contains(r.content, `"bạn"`) || !strings.Contains(r.content, "\nend") {
		t.Fatalf("echoed text lost characters: %q", r.content)
	}

	// A new socket gets history (both messages) and nothing else.
	c2 := page(t, p, "stream", "demo_user")
	f, err := c2.Next(wait)
	if err != nil || f.Type() != "history" {
		t.Fatalf("second socket: %v %v, want history", f, err)
	}
	hm := messages(t, f["messages"])
	if len(hm) != 2 || hm[0].Str("message_id") != userID || hm[1].Str("content") != r.content {
		t.Fatalf("history frame = %v", f)
	}
	if before := pingPong(t, c2); len(before) != 0 {
		t.Fatalf("frames after history of a finished session: %v", before)
	}
}

// Reload mid-reply: welcome, history without the partial reply, one frame
// with all text so far, live frames, completion; the final text is exact.
func TestReloadMidReply(t *testing.T) {
	t.Parallel()
	p := serve(t)
	a := page(t, p, "reload", "demo_user")
	userID := sendChat(t, p, "reload", "demo_user", "[sim tokens=300 rate=100] tell me")
	ra := &reply{t: t}
	ra.untilFrames(a, 10)
	_ = a.Conn.CloseNow()

	b := page(t, p, "reload", "demo_user")
	f, err := b.Next(wait)
	if err != nil || f.Type() != "history" {
		t.Fatalf("after reload: %v %v, want history", f, err)
	}
	hm := messages(t, f["messages"])
	if len(hm) != 1 || hm[0].Str("message_id") != userID || hm[0].Str("role") != "user" {
		t.Fatalf("history during a reply = %v, want only the user message", hm)
	}
	snap, err := b.Next(wait)
	if err != nil || snap.Type() != "message" {
		t.Fatalf("after history: %v %v, want the text so far", snap, err)
	}
	sd := snap.Obj("data")
	if sd.Str("message_id") != ra.id || sd["is_complete"] != false || !strings.HasPrefix(sd.Str("content"), ra.content) {
		t.Fatalf("snapshot frame %v does not continue %q", snap, ra.content)
	}
	if sd.Str("chunk") != sd.Str("content") {
		t.Fatalf("the first frame after a reload is a live one (chunk %q), not the text so far", sd.Str("chunk"))
	}
	rb := &reply{t: t}
	rb.apply(snap)
	rb.untilFinal(b)
	if rb.frames < 3 {
		t.Fatalf("only %d frames after the reload", rb.frames)
	}
	msgs := history(t, p, "reload")
	if got := lastAssistant(t, msgs).Str("content"); got != rb.content {
		t.Fatalf("final text %q, stored %q", rb.content, got)
	}
}

// Reconnecting every ~300 ms during a reply never loses a word: each new
// socket starts from all text so far, and the final text is exact.
func TestReconnectEvery300ms(t *testing.T) {
	t.Parallel()
	p := serve(t)
	c := page(t, p, "flaky", "demo_user")
	sendChat(t, p, "flaky", "demo_user", "[sim tokens=400 rate=100] long story")
	var all []string // every content seen, on every socket
	last := ""
	final := ""
	tick := time.NewTicker(300 * time.Millisecond)
	defer tick.Stop()
	reconnects := 0
	for final == "" {
		var historyReply string
	frames:
		for {
			select {
			case <-tick.C:
				break frames
			default:
			}
			f, err := c.Next(50 * time.Millisecond)
			if err != nil {
				continue
			}
			switch f.Type() {
			case "history":
				for _, m := range messages(t, f["messages"]) {
					if m.Str("role") == "assistant" {
						historyReply = m.Str("content") // ended while we were away
					}
				}
			case "message":
				d := f.Obj("data")
				content := d.Str("content")
				if !strings.HasPrefix(content, last) {
					t.Fatalf("socket %d lost text: had %q, got %q", reconnects, last, content)
				}
				all = append(all, content)
				last = content
				if d["is_complete"] == true {
					final = content
					break frames
				}
			}
			if historyReply != "" {
				final = historyReply
				break frames
			}
		}
		if final != "" {
			break
		}
		_ = c.Conn.CloseNow()
		reconnects++
		c = page(t, p, "flaky", "demo_user")
	}
	if reconnects < 5 {
		t.Fatalf("only %d reconnects during the reply", reconnects)
	}
	stored := lastAssistant(t, history(t, p, "flaky")).Str("content")
	if final != stored {
		t.Fatalf("final %q, stored %q", final, stored)
	}
	for _, s := range all {
		if !strings.HasPrefix(stored, s) {
			t.Fatalf("a frame showed %q, not a prefix of the reply", s)
		}
	}
}

// The reconnect frame: the missing text as one frame and recovered while
// streaming; the final frame and completed after the end; not_found for an
// unknown id.
func TestReconnectFrame(t *testing.T) {
	t.Parallel()
	p := serve(t)
	c := page(t, p, "recover", "demo_user")
	userID := sendChat(t, p, "recover", "demo_user", "[sim tokens=200 rate=80] recover me")
	r := &reply{t: t}
	r.untilFrames(c, 5)

	c.Send(map[string]any{"type": "reconnect", "messageId": r.id, "lastChunkIndex": 2})
	var got trtest.Frame
	fs := c.Until(wait, func(f trtest.Frame) bool {
		if d := f.Obj("data"); f.Type() == "message" && d["is_complete"] == false && strings.HasPrefix(d.Str("content"), r.content) && d.Str("chunk") == d.Str("content") {
			got = f
		}
		return f.Type() == "recovery_status"
	})
	status := fs[len(fs)-1]
	if got == nil || status.Str("status") != "recovered" || status.Int("chunksRecovered") < 3 {
		t.Fatalf("reconnect while streaming: %v", fs)
	}
	r2 := &reply{t: t}
	r2.untilFinal(c)

	for _, id := range []string{r.id, userID} {
		c.Send(map[string]any{"type": "reconnect", "messageId": id, "lastChunkIndex": 0})
		fs = c.UntilType(wait, "recovery_status")
		if len(fs) != 2 || fs[0].Obj("data")["is_complete"] != true || fs[0].Obj("data").Str("content") != r2.content {
			t.Fatalf("reconnect after the end (%s): %v", id, fs)
		}
		if st := fs[1]; st.Str("status") != "completed" || st.Int("chunksRecovered") < 1 {
			t.Fatalf("recovery_status after the end: %v", st)
		}
	}
	c.Send(map[string]any{"type": "reconnect", "messageId": "no-such-reply", "lastChunkIndex": 0})
	fs = c.UntilType(wait, "recovery_status")
	if len(fs) != 1 || fs[0].Str("status") != "not_found" || fs[0].Int("chunksRecovered") != 0 {
		t.Fatalf("reconnect for an unknown id: %v", fs)
	}
}

// Two sockets on one session (two tabs) both receive the whole reply.
func TestTwoSocketsOneSession(t *testing.T) {
	t.Parallel()
	p := serve(t)
	a := page(t, p, "tabs", "demo_user")
	b := page(t, p, "tabs", "demo_user")
	sendChat(t, p, "tabs", "demo_user", "[sim tokens=150 rate=150] two tabs")
	ra, rb := &reply{t: t}, &reply{t: t}
	ra.untilFinal(a)
	rb.untilFinal(b)
	stored := lastAssistant(t, history(t, p, "tabs")).Str("content")
	if ra.content != stored || rb.content != stored || ra.id != rb.id {
		t.Fatalf("tab a %q, tab b %q, stored %q", ra.content, rb.content, stored)
	}
}

// A native client and a compat client on the same conversation see the
// same text, whichever protocol sent the message.
func TestNativeAndCompatSeeSameText(t *testing.T) {
	t.Parallel()
	p := serve(t)
	n := trtest.Dial(t, p.WSURL(), nil) // dev mode: user "dev"
	n.Join("shared", nil)
	c := page(t, p, "shared", "dev")

	n.Send(map[string]any{"type": "send", "conversation_id": "shared", "text": "[sim tokens=120 rate=200] from native", "id": "s1"})
	ack := n.Until(wait, func(f trtest.Frame) bool { return f.Type() == "ack" && f.Str("id") == "s1" })
	turn := &trtest.Turn{ID: ack[len(ack)-1].Str("turn_id")}
	for _, f := range n.Until(wait, func(f trtest.Frame) bool { turn.Apply(f); return turn.Ends > 0 }) {
		_ = f
	}
	rc := &reply{t: t}
	rc.untilFinal(c)
	if len(turn.Errors) > 0 || rc.id != turn.ID || rc.content != turn.Text.String() {
		t.Fatalf("native %q (%v), compat %q", turn.Text.String(), turn.Errors, rc.content)
	}

	// And the other way round.
	sendChat(t, p, "shared", "dev", "[sim tokens=80 rate=200] from compat")
	turn2 := &trtest.Turn{}
	n.Until(wait, func(f trtest.Frame) bool {
		if f.Type() == "turn.start" {
			turn2.ID = f.Str("turn_id")
		}
		turn2.Apply(f)
		return turn2.Ends > 0
	})
	rc2 := &reply{t: t}
	rc2.untilFinal(c)
	if len(turn2.Errors) > 0 || rc2.id != turn2.ID || rc2.content != turn2.Text.String() {
		t.Fatalf("native %q (%v), compat %q", turn2.Text.String(), turn2.Errors, rc2.content)
	}
}

// A reply that fails ends with the apology, live and in history.
func TestErrorReply(t *testing.T) {
	t.Parallel()
	p := serve(t)
	c := page(t, p, "oops", "demo_user")
	sendChat(t, p, "oops", "demo_user", "[sim tokens=50 rate=200 error_after=5] fail")
	r := &reply{t: t}
	c.Until(wait, func(f trtest.Frame) bool {
		if f.Type() == "message" && f.Obj("data")["is_complete"] == true {
			r.final = f
			return true
		}
		r.apply(f)
		return false
	})
	if got := r.final.Obj("data").Str("content"); got != errorContent {
		t.Fatalf("error reply content %q", got)
	}
	if got := lastAssistant(t, history(t, p, "oops")).Str("content"); got != errorContent {
		t.Fatalf("error reply in history %q", got)
	}
}

// Authentication: dev-token or none in dev mode; a bad token gets the error
// frame and close 1003; a session of another user is refused.
func TestSocketAuth(t *testing.T) {
	t.Parallel()
	p := serve(t)
	refused := func(q url.Values) {
		t.Helper()
		c := trtest.Dial(t, wsURL(p, "/ws/chat", q), nil)
		f, err := c.Next(wait)
		if err != nil || f.Type() != "error" || f.Str("error") != "Authentication failed" {
			t.Fatalf("%v: got %v %v, want the authentication error", q, f, err)
		}
		if _, err := time.Parse(time.RFC3339Nano, f.Str("timestamp")); err != nil {
			t.Fatalf("error timestamp: %v", err)
		}
		if code := c.CloseStatus(); code != websocket.StatusUnsupportedData {
			t.Fatalf("%v: close %d, want 1003", q, code)
		}
	}
	refused(url.Values{"session_id": {"s"}, "user_id": {"demo_user"}, "token": {"not-a-jwt"}})

	// No token at all is accepted in dev mode, and so is dev-token with
	// the Bearer prefix the token parameter allows.
	c := trtest.Dial(t, wsURL(p, "/ws/chat", url.Values{"session_id": {"mine"}, "user_id": {"alice"}}), nil)
	if f, err := c.Next(wait); err != nil || f.Type() != "welcome" {
		t.Fatalf("no token in dev mode: %v %v", f, err)
	}
	c = trtest.Dial(t, wsURL(p, "/ws/chat", url.Values{"session_id": {"mine"}, "user_id": {"alice"}, "token": {"Bearer dev-token"}}), nil)
	if f, err := c.Next(wait); err != nil || f.Type() != "welcome" {
		t.Fatalf("Bearer dev-token in dev mode: %v %v", f, err)
	}
	// alice's session is not bob's.
	refused(url.Values{"session_id": {"mine"}, "user_id": {"bob"}, "token": {"dev-token"}})

	bad := trtest.Dial(t, wsURL(p, "/ws/chat", url.Values{"session_id": {"not a valid id!"}, "token": {"dev-token"}}), nil)
	if f, err := bad.Next(wait); err != nil || f.Type() != "error" {
		t.Fatalf("invalid session_id: %v %v", f, err)
	}
	if code := bad.CloseStatus(); code != websocket.StatusUnsupportedData {
		t.Fatalf("invalid session_id: close %d", code)
	}
}

// Any origin may open the compat socket: the original page is served from
// its own host.
func TestSocketAnyOrigin(t *testing.T) {
	t.Parallel()
	p := serve(t)
	h := map[string][]string{"Origin": {"http://localhost:5173"}}
	c := trtest.Dial(t, wsURL(p, "/ws/chat", url.Values{"session_id": {"o"}, "user_id": {"demo_user"}, "token": {"dev-token"}}), &trtest.DialOptions{Header: h})
	if f, err := c.Next(wait); err != nil || f.Type() != "welcome" {
		t.Fatalf("cross-origin page: %v %v", f, err)
	}
}

// Many sockets on one session under load: every one gets the same final
// text, with content that only grows.
func TestManySockets(t *testing.T) {
	t.Parallel()
	p := serve(t)
	const n = 8
	clients := make([]*trtest.Client, n)
	for i := range clients {
		clients[i] = page(t, p, "crowd", "demo_user")
	}
	sendChat(t, p, "crowd", "demo_user", "[sim tokens=300 rate=0] fast")
	finals := make([]string, n)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failures []string
	for i, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			last := ""
			deadline := time.Now().Add(wait)
			for time.Now().Before(deadline) {
				f, err := c.Next(time.Until(deadline))
				if err != nil {
					break
				}
				if f.Type() != "message" {
					continue
				}
				d := f.Obj("data")
				content := d.Str("content")
				if !strings.HasPrefix(content, last) {
					mu.Lock()
					failures = append(failures, "socket went back from "+last+" to "+content)
					mu.Unlock()
				}
				last = content
				if d["is_complete"] == true {
					finals[i] = content
					return
				}
			}
		}()
	}
	wg.Wait()
	if len(failures) > 0 {
		t.Fatal(failures[0])
	}
	stored := lastAssistant(t, history(t, p, "crowd")).Str("content")
	for i, f := range finals {
		if f != stored {
			t.Fatalf("socket %d ended with %q, stored %q", i, f, stored)
		}
	}
}

// An idle socket costs the server one goroutine, its read loop: the writer
// runs only while frames are queued, pings come from a timer, and the join
// runs on a goroutine that ends with it.
func TestIdleSocketHoldsOneGoroutine(t *testing.T) {
	t.Parallel()
	p := serve(t)
	// The first socket also starts what the server starts once, on first
	// use (the store's and the bus's goroutines): counted from there, the
	// next sockets' goroutines are their own.
	pingPong(t, page(t, p, "idle-first", "demo_user"))
	before := trtest.Metric(t, p.URL, "go_goroutines", "")
	const n = 19 // with the first, the per-user limit of 20
	for i := range n {
		c := page(t, p, fmt.Sprintf("idle-%d", i), "demo_user")
		pingPong(t, c) // the join is over and every frame so far written
	}
	// A writer returns once it finds the queue empty, a moment after its
	// last frame reached the client.
	trtest.WaitMetric(t, p.URL, "go_goroutines", "", wait, func(v float64) bool { return v-before <= n })
}

// A finished reply longer than --limit-outbound-bytes neither keeps a page
// from connecting to its session nor closes the socket that asks for it
// with reconnect: such frames are asked for whole, as a native joined frame
// is, and the backlog limit does not count them.
func TestReplyLongerThanTheOutboundLimit(t *testing.T) {
	t.Parallel()
	// The reply is made under the default limit, followed natively until
	// it ends; then the server runs again on the same data with a limit
	// the reply is longer than.
	first := serve(t)
	n := trtest.Dial(t, first.WSURL(), nil) // dev mode: user "dev"
	n.Join("long", nil)
	n.Send(map[string]any{"type": "send", "conversation_id": "long", "text": "[sim tokens=4000 rate=0] a long one", "id": "s1"})
	ack := n.Until(wait, func(f trtest.Frame) bool { return f.Type() == "ack" && f.Str("id") == "s1" })
	turn := &trtest.Turn{ID: ack[len(ack)-1].Str("turn_id")}
	n.Until(wait, func(f trtest.Frame) bool { turn.Apply(f); return turn.Ends > 0 })
	if len(turn.Errors) > 0 || turn.Text.Len() <= 16384 {
		t.Fatalf("reply of %d bytes (%v), want over the limit", turn.Text.Len(), turn.Errors)
	}
	if err := first.Stop(); err != nil {
		t.Fatal(err)
	}
	p := serve(t, "--data-dir", first.DataDir, "--limit-outbound-bytes", "16384")

	c := page(t, p, "long", "dev")
	f, err := c.Next(wait)
	if err != nil || f.Type() != "history" {
		t.Fatalf("after welcome: %v %v, want the history", f, err)
	}
	if a := lastAssistant(t, messages(t, f["messages"])); a.Str("content") != turn.Text.String() {
		t.Fatalf("history's reply has %d bytes, want the %d stored", len(a.Str("content")), turn.Text.Len())
	}
	c.Send(map[string]any{"type": "reconnect", "messageId": turn.ID, "lastChunkIndex": 0})
	fs := c.UntilType(wait, "recovery_status")
	if len(fs) != 2 || fs[0].Obj("data").Str("content") != turn.Text.String() || fs[1].Str("status") != "completed" {
		t.Fatalf("reconnect for the long reply: %d frames, last %v", len(fs), fs[len(fs)-1])
	}
	if pong := pingPong(t, c); len(pong) != 0 {
		t.Fatalf("frames before the pong: %v", pong)
	}
}

// A socket does not outlive its token, and the page is told why before the
// close: the compat error frame, then close 1003, as for a bad token. The
// token here expired 28 s ago (within the 30 s leeway), so it is accepted
// and the socket closes about 2 s after it opens.
func TestTokenExpiresOnOpenSocket(t *testing.T) {
	t.Parallel()
	secret := "0123456789abcdef0123456789abcdef"
	p := serve(t, "--jwt-secret", secret)
	now := time.Now()
	tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{"sub": "alice", "iat": now.Add(-time.Hour).Unix(), "exp": now.Add(-28 * time.Second).Unix()}).SignedString([]byte(secret))
	if err != nil {
		t.Fatal(err)
	}
	c := trtest.Dial(t, wsURL(p, "/ws/chat", url.Values{"session_id": {"expiring"}, "user_id": {"alice"}, "token": {tok}}), nil)
	if f, err := c.Next(wait); err != nil || f.Type() != "welcome" {
		t.Fatalf("token within the leeway: %v %v", f, err)
	}
	f, err := c.Next(wait)
	if err != nil || f.Type() != "error" || f.Str("error") != "Token expired" {
		t.Fatalf("when the token expired: %v %v, want the error frame first", f, err)
	}
	if _, err := time.Parse(time.RFC3339Nano, f.Str("timestamp")); err != nil {
		t.Fatalf("error timestamp: %v", err)
	}
	select {
	case <-c.Done():
	case <-time.After(wait):
		t.Fatal("the socket outlived its token")
	}
	if code := c.CloseStatus(); code != websocket.StatusUnsupportedData {
		t.Fatalf("closed with %d, want 1003", code)
	}
}

// A session cleared while its reply's producer is gone: the reply's end is
// never published (its rows are deleted), and each socket's view, finding
// the turn deleted, follows it no more. Every tab still showing the reply
// gets its final frame, as when the clear's cancel stops it in time (text
// so far and the cancelled suffix), and forgets it: a reconnect for it
// answers not_found rather than bringing the deleted text back. A gateway
// and a worker of their own make the producer's death possible.
func TestClearedSessionEndsItsLostReply(t *testing.T) {
	t.Parallel()
	// A short --cancel-wait and --quiet-check keep the test quick: the
	// clear waits for the cancel no worker answers, and the views read the
	// silent turn again after --quiet-check.
	g, w := trtest.StartScaleOut(t, "--cancel-wait", "100ms", "--quiet-check", "200ms")
	a := page(t, g, "lost", "demo_user")
	b := page(t, g, "lost", "demo_user")
	sendChat(t, g, "lost", "demo_user", "[sim tokens=5000 rate=20] long")
	ra, rb := &reply{t: t}, &reply{t: t}
	ra.untilFrames(a, 3)
	rb.untilFrames(b, 3)
	w.Kill()
	code, out, _ := call(t, "DELETE", g.URL+"/api/history/lost", nil, nil)
	if code != 200 || out["status"] != "success" {
		t.Fatalf("DELETE = %d %v", code, out)
	}
	for _, tab := range []struct {
		c *trtest.Client
		r *reply
	}{{a, ra}, {b, rb}} {
		tab.r.untilFinal(tab.c)
		if text, ok := strings.CutSuffix(tab.r.content, cancelledSuffix); !ok || !strings.HasPrefix(text, tab.r.seen[len(tab.r.seen)-2]) {
			t.Fatalf("final content %q, want the text shown and the cancelled suffix", tab.r.content)
		}
		tab.c.Send(map[string]any{"type": "reconnect", "messageId": tab.r.id, "lastChunkIndex": 0})
		fs := tab.c.UntilType(wait, "recovery_status")
		if len(fs) != 1 || fs[0].Str("status") != "not_found" {
			t.Fatalf("reconnect for the deleted reply: %v", fs)
		}
	}
	if strings.Contains(g.Stderr(), "WARNING: DATA RACE") {
		t.Fatalf("the gateway reported a data race:\n%s", g.Stderr())
	}
}

// The page across a server restart mid-reply: its socket drops, its
// 2-second reconnect finds the reply ended with the text it had (history,
// finished, extending what the page showed); a reconnect frame for it gets
// its final frame and completed, and Stop then answers completed: the
// reply did end.
func TestServerRestartMidReply(t *testing.T) {
	t.Parallel()
	for _, crash := range []bool{false, true} {
		p := serve(t)
		a := page(t, p, "restart", "demo_user")
		sendChat(t, p, "restart", "demo_user", "[sim tokens=3000 rate=50] long")
		r := &reply{t: t}
		r.untilFrames(a, 5)
		if crash {
			p.Kill()
		} else if err := p.Stop(); err != nil {
			t.Fatal(err)
		}
		<-a.Done()
		q := p.Restart(t)
		b := page(t, q, "restart", "demo_user")
		f, err := b.Next(wait)
		if err != nil || f.Type() != "history" {
			t.Fatalf("crash %v: after the restart %v %v, want history", crash, f, err)
		}
		final := lastAssistant(t, messages(t, f["messages"]))
		if final.Str("message_id") != r.id || final["is_complete"] != true || !strings.HasPrefix(final.Str("content"), r.content) {
			t.Fatalf("crash %v: history's reply %v, the page showed %q of %s", crash, final, r.content, r.id)
		}
		b.Send(map[string]any{"type": "reconnect", "messageId": r.id, "lastChunkIndex": r.frames})
		fs := b.UntilType(wait, "recovery_status")
		if len(fs) != 2 || fs[0].Obj("data").Str("content") != final.Str("content") || fs[0].Obj("data")["is_complete"] != true || fs[1].Str("status") != "completed" {
			t.Fatalf("crash %v: reconnect after the restart: %v", crash, fs)
		}
		if s := cancelReply(t, q, "restart", r.id); s != "completed" {
			t.Fatalf("crash %v: stop after the restart answered %q", crash, s)
		}
		q.Kill()
	}
}

// The page reloaded mid-reply in one tab, Stop clicked twice in the other
// with the id the reloaded tab learnt from its catch-up frame: the first
// click answers cancelled (never "already completed"), so does the second,
// and each tab gets exactly one final frame with the cancelled suffix.
// A reload before the reply's first token gets no catch-up frame, then the
// whole text live.
func TestReloadThenStopFromAnotherTab(t *testing.T) {
	t.Parallel()
	p := serve(t)
	a := page(t, p, "tabs-stop", "demo_user")
	sendChat(t, p, "tabs-stop", "demo_user", "[sim tokens=3000 rate=50] long")
	ra := &reply{t: t}
	ra.untilFrames(a, 3)
	b := page(t, p, "tabs-stop", "demo_user")
	b.UntilType(wait, "history")
	rb := &reply{t: t}
	rb.untilFrames(b, 1)
	if rb.id != ra.id {
		t.Fatalf("catch-up frame of %s, reply %s", rb.id, ra.id)
	}
	for click := range 2 {
		if s := cancelReply(t, p, "tabs-stop", rb.id); s != "cancelled" {
			t.Fatalf("click %d answered %q", click+1, s)
		}
	}
	ra.untilFinal(a)
	rb.untilFinal(b)
	if ra.content != rb.content || !strings.HasSuffix(ra.content, cancelledSuffix) {
		t.Fatalf("tab a ended with %q, tab b with %q", ra.content, rb.content)
	}
	for _, c := range []*trtest.Client{a, b} {
		if more := pingPong(t, c); len(more) != 0 {
			t.Fatalf("frames after the final one: %v", more)
		}
	}

	userID := sendChat(t, p, "tabs-stop", "demo_user", "[sim tokens=20 rate=200 delay_ms=3000] slow to start")
	c := page(t, p, "tabs-stop", "demo_user")
	f, err := c.Next(wait)
	if err != nil || f.Type() != "history" {
		t.Fatalf("reload before the first token: %v %v", f, err)
	}
	if hm := messages(t, f["messages"]); hm[len(hm)-1].Str("message_id") != userID {
		t.Fatalf("history before the first token ends with %v, want the user message", hm[len(hm)-1])
	}
	rc := &reply{t: t}
	rc.untilFinal(c)
	if got := lastAssistant(t, history(t, p, "tabs-stop")).Str("content"); rc.content != got {
		t.Fatalf("reply after an early reload %q, stored %q", rc.content, got)
	}
}
