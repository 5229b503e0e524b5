package e2e_test

import (
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/coder/websocket"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// startTurn sends a message and waits until the turn has streamed n deltas.
func startTurn(t *testing.T, c *trtest.Client, conv, text string, n int64) *trtest.Turn {
	t.Helper()
	c.Send(map[string]any{"type": "send", "conversation_id": conv, "text": text, "id": "send"})
	var tr *trtest.Turn
	c.Until(wait, func(f trtest.Frame) bool {
		if f.Type() == "error" {
			t.Fatalf("send: %v", f)
		}
		if f.Type() == "turn.start" && tr == nil {
			tr = &trtest.Turn{ID: f.Str("turn_id")}
		}
		if tr != nil {
			tr.Apply(f)
		}
		return tr != nil && tr.Seq >= n
	})
	return tr
}

// finish reads c's frames until tr ends (it may have ended already).
func finish(t *testing.T, c *trtest.Client, tr *trtest.Turn) []trtest.Frame {
	t.Helper()
	var fs []trtest.Frame
	if tr.Ends == 0 {
		fs = c.Until(wait, func(f trtest.Frame) bool {
			tr.Apply(f)
			return tr.Ends > 0
		})
	}
	if len(tr.Errors) > 0 {
		t.Fatalf("delivery violations: %v", tr.Errors)
	}
	return fs
}

func ackOf(t *testing.T, c *trtest.Client, id string, seen ...*trtest.Turn) trtest.Frame {
	t.Helper()
	fs := c.Until(wait, func(f trtest.Frame) bool {
		for _, tr := range seen {
			tr.Apply(f)
		}
		return f.Str("id") == id && (f.Type() == "ack" || f.Type() == "error")
	})
	return fs[len(fs)-1]
}

func TestCancelDuringStreaming(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "50", "--sim-tokens", "1000")
	for _, from := range []string{"sender", "other tab", "http"} {
		t.Run(from, func(t *testing.T) {
			conv := "cancel-" + strings.ReplaceAll(from, " ", "-")
			a := trtest.Dial(t, p.WSURL(), nil)
			b := trtest.Dial(t, p.WSURL(), nil)
			a.Join(conv, nil)
			b.Join(conv, nil)
			tr := startTurn(t, a, conv, "a long answer please", 3)
			tb := &trtest.Turn{ID: tr.ID}
			var status string
			var already bool
			switch from {
			case "sender", "other tab":
				c, seen := a, tr
				if from == "other tab" {
					c, seen = b, tb
				}
				c.Send(map[string]any{"type": "cancel", "turn_id": tr.ID, "id": "stop"})
				ack := ackOf(t, c, "stop", seen)
				status, already = ack.Str("status"), ack["already"] == true
				if ack.Type() != "ack" || ack.Str("turn_id") != tr.ID {
					t.Fatalf("cancel answered %v", ack)
				}
			case "http":
				var body map[string]any
				if code := trtest.Do(t, "POST", p.URL+"/v1/turns/"+tr.ID+"/cancel", "", nil, &body); code != 200 {
					t.Fatalf("POST cancel: %d %v", code, body)
				}
				status, already = body["status"].(string), body["already"] == true
			}
			if status != "cancelled" || already {
				t.Fatalf("cancel ack status=%s already=%v, want cancelled, false", status, already)
			}
			finish(t, a, tr)
			if tr.Status != "cancelled" || tr.Seq >= 1000 {
				t.Fatalf("turn ended %s at %d", tr.Status, tr.Seq)
			}
			if tb.Ends == 0 {
				b.Until(wait, func(f trtest.Frame) bool { tb.Apply(f); return tb.Ends > 0 })
			}
			if tb.Status != "cancelled" || tb.Text.String() != tr.Text.String() {
				t.Fatalf("other tab saw %s %q", tb.Status, tb.Text.String())
			}
			m := storedTurn(t, p.URL, conv, tr.ID)
			if m.Status != "cancelled" || m.Content != tr.Text.String() {
				t.Fatalf("stored %s %q, streamed %q", m.Status, m.Content, tr.Text.String())
			}
			// A late cancel is acknowledged with the same status.
			var late map[string]any
			trtest.Do(t, "POST", p.URL+"/v1/turns/"+tr.ID+"/cancel", "", nil, &late)
			if late["status"] != "cancelled" || late["already"] != true {
				t.Fatalf("late cancel answered %v", late)
			}
		})
	}
}

// TestCancelBeforeStartNeverCallsTheModel sends cancels right behind their
// sends on the same connection. With the start grace off, a worker would
// start each turn as soon as its job exists: only the connection holding
// the job until it has handled the frames behind the send keeps the model
// from being called, however long a busy server takes over the cancel.
func TestCancelBeforeStartNeverCallsTheModel(t *testing.T) {
	for _, grace := range []string{"50ms", "-1ms"} {
		t.Run("start grace "+grace, func(t *testing.T) {
			cancelRightBehindSends(t, trtest.Serve(t, "--sim-rate", "100", "--sim-tokens", "20", "--limit-sends", "0", "--start-grace", grace))
		})
	}
}

func cancelRightBehindSends(t *testing.T, p *trtest.Proc) {
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("early", nil)
	before := trtest.Metric(t, p.URL, "tokenrelay_provider_requests_total", "")
	for i := range 20 {
		turn := fmt.Sprintf("early-turn-%d", i)
		c.SendTogether(fmt.Sprintf(`{"type":"send","conversation_id":"early","text":"hi %d","turn_id":%q,"id":"s%d"}`, i, turn, i),
			fmt.Sprintf(`{"type":"cancel","turn_id":%q,"id":"c%d"}`, turn, i))
		tr := &trtest.Turn{ID: turn}
		fs := c.Until(wait, func(f trtest.Frame) bool { tr.Apply(f); return tr.Ends > 0 })
		if tr.Status != "cancelled" || tr.Seq != 0 {
			t.Fatalf("turn %d ended %s after %d deltas, want cancelled after 0", i, tr.Status, tr.Seq)
		}
		var ack trtest.Frame
		for _, f := range fs {
			if f.Str("id") == fmt.Sprintf("c%d", i) {
				ack = f
			}
		}
		if ack == nil {
			ack = ackOf(t, c, fmt.Sprintf("c%d", i))
		}
		if ack.Type() != "ack" || ack.Str("status") != "cancelled" {
			t.Fatalf("cancel %d answered %v", i, ack)
		}
	}
	if after := trtest.Metric(t, p.URL, "tokenrelay_provider_requests_total", ""); after != before {
		t.Fatalf("the provider was called %v times for turns cancelled before they started", after-before)
	}
}

// TestFramesRightBehindASend: a send's job, held while the frames that
// came with it are handled, is enqueued once they are, or after a moment
// when the next frame has come only in part: the turn runs either way.
func TestFramesRightBehindASend(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "1000", "--sim-tokens", "5", "--limit-sends", "0", "--start-grace", "-1ms")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("behind", nil)
	ping := `{"type":"ping","id":"p1"}`
	for i, next := range [][]byte{c.Frames(ping), c.Frames(ping)[:3]} {
		turn := fmt.Sprintf("behind-%d", i)
		send := fmt.Sprintf(`{"type":"send","conversation_id":"behind","text":"hi","turn_id":%q,"id":"s%d"}`, turn, i)
		c.WriteRaw(append(c.Frames(send), next...))
		tr := &trtest.Turn{ID: turn}
		pong := false
		c.Until(wait, func(f trtest.Frame) bool {
			tr.Apply(f)
			pong = pong || f.Type() == "pong"
			return tr.Ends > 0
		})
		if tr.Status != "complete" || tr.Seq != 5 {
			t.Fatalf("%d: turn ended %s after %d deltas, want complete after 5", i, tr.Status, tr.Seq)
		}
		if i == 1 {
			c.WriteRaw(c.Frames(ping)[3:])
		}
		if !pong {
			c.Until(wait, func(f trtest.Frame) bool { return f.Type() == "pong" })
		}
	}
}

// TestCancelBehindASecondSend: frames behind a held send count from the
// last send, so a second send far behind the first still holds its own job
// while its cancel, right behind it, is handled.
func TestCancelBehindASecondSend(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "0", "--sim-tokens", "3", "--limit-sends", "0", "--start-grace", "-1ms")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("first", nil)
	c.Join("second", nil)
	before := trtest.Metric(t, p.URL, "tokenrelay_provider_requests_total", "")
	frames := []any{`{"type":"send","conversation_id":"first","text":"hi","turn_id":"first-1","id":"s1"}`}
	for range 15 {
		frames = append(frames, `{"type":"ping"}`)
	}
	frames = append(frames, `{"type":"send","conversation_id":"second","text":"hi","turn_id":"second-1","id":"s2"}`,
		`{"type":"cancel","turn_id":"second-1","id":"c2"}`)
	c.SendTogether(frames...)
	first, second := &trtest.Turn{ID: "first-1"}, &trtest.Turn{ID: "second-1"}
	c.Until(wait, func(f trtest.Frame) bool {
		first.Apply(f)
		second.Apply(f)
		return first.Ends > 0 && second.Ends > 0
	})
	if first.Status != "complete" || second.Status != "cancelled" || second.Seq != 0 {
		t.Fatalf("first ended %s, second %s after %d deltas: want complete, and cancelled after 0", first.Status, second.Status, second.Seq)
	}
	trtest.WaitMetric(t, p.URL, "tokenrelay_provider_requests_total", "", wait, func(v float64) bool { return v >= before+1 })
	if after := trtest.Metric(t, p.URL, "tokenrelay_provider_requests_total", ""); after != before+1 {
		t.Fatalf("the provider was called %v times, want once (the first turn only)", after-before)
	}
}

// TestOversizedFrameBehindACancel: a frame over --limit-frame-bytes closes
// the connection with 1009 only after the answers to the frames before it,
// a cancel's included, whose answer is written by a goroutine of its own.
func TestOversizedFrameBehindACancel(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "0", "--sim-tokens", "3", "--limit-sends", "0", "--limit-frame-bytes", "1024")
	big := `{"type":"ping","id":"big","pad":"` + strings.Repeat("x", 1024) + `"}`
	for i := range 5 {
		c := trtest.Dial(t, p.WSURL(), nil)
		conv, turn := fmt.Sprintf("big-%d", i), fmt.Sprintf("big-turn-%d", i)
		c.Join(conv, nil)
		c.SendTogether(fmt.Sprintf(`{"type":"send","conversation_id":%q,"text":"hi","turn_id":%q,"id":"s"}`, conv, turn),
			fmt.Sprintf(`{"type":"cancel","turn_id":%q,"id":"c"}`, turn), big)
		answered := map[string]bool{}
		for {
			f, err := c.Next(wait)
			if err != nil {
				break
			}
			if f.Type() == "ack" {
				answered[f.Str("id")] = true
			}
		}
		if !answered["s"] || !answered["c"] {
			t.Fatalf("%d: answered %v before the close, want the send's and the cancel's acks", i, answered)
		}
		if code := c.CloseStatus(); code != websocket.StatusMessageTooBig {
			t.Fatalf("%d: close %d, want 1009", i, code)
		}
	}
}

func TestConcurrentCancels(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "50", "--sim-tokens", "1000", "--limit-connections", "0", "--limit-requests", "0")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("many", nil)
	tr := startTurn(t, c, "many", "go on", 2)
	const n = 100
	var wg sync.WaitGroup
	results := make(chan map[string]any, n)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var body map[string]any
			code := trtest.Do(t, "POST", p.URL+"/v1/turns/"+tr.ID+"/cancel", "", nil, &body)
			body["code"] = code
			results <- body
		}()
	}
	wg.Wait()
	close(results)
	first := 0
	for r := range results {
		if r["code"] != 200 || r["status"] != "cancelled" {
			t.Fatalf("a concurrent cancel answered %v", r)
		}
		if r["already"] == false {
			first++
		}
	}
	if first != 1 {
		t.Fatalf("%d cancels answered already=false, want exactly 1", first)
	}
	finish(t, c, tr)
	if tr.Status != "cancelled" {
		t.Fatalf("turn ended %s", tr.Status)
	}
}

// TestCancelRacingCompletion cancels turns right as they finish: whichever
// wins, the store, every connection and every ack agree.
func TestCancelRacingCompletion(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "1000", "--limit-sends", "0", "--start-grace", "-1ms")
	a := trtest.Dial(t, p.WSURL(), nil)
	b := trtest.Dial(t, p.WSURL(), nil)
	a.Join("race", nil)
	b.Join("race", nil)
	outcomes := map[string]int{}
	for i := range 200 {
		// The cancel is sent after k of the turn's deltas have arrived, so
		// it lands before, during and right at the end.
		tokens := 2 + i%5
		k := int64(i % (tokens + 1))
		turn := fmt.Sprintf("race-%d", i)
		a.Send(fmt.Sprintf(`{"type":"send","conversation_id":"race","text":"[sim tokens=%d] q%d","turn_id":%q,"id":"s%d"}`, tokens, i, turn, i))
		ta := &trtest.Turn{ID: turn}
		tb := &trtest.Turn{ID: turn}
		started := false
		a.Until(wait, func(f trtest.Frame) bool {
			started = started || f.Type() == "turn.start"
			ta.Apply(f)
			return started && (ta.Seq >= k || ta.Ends > 0)
		})
		b.Send(fmt.Sprintf(`{"type":"cancel","turn_id":%q,"id":"c%d"}`, turn, i))
		var ack trtest.Frame
		if ta.Ends == 0 {
			a.Until(wait, func(f trtest.Frame) bool { ta.Apply(f); return ta.Ends > 0 })
		}
		b.Until(wait, func(f trtest.Frame) bool {
			tb.Apply(f)
			if f.Str("id") == fmt.Sprintf("c%d", i) {
				ack = f
			}
			return tb.Ends > 0 && ack != nil
		})
		m := storedTurn(t, p.URL, "race", turn)
		if len(ta.Errors)+len(tb.Errors) > 0 {
			t.Fatalf("turn %d: violations %v %v", i, ta.Errors, tb.Errors)
		}
		if ta.Status != tb.Status || ta.Status != m.Status || ack.Str("status") != m.Status {
			t.Fatalf("turn %d: a=%s b=%s ack=%v stored=%s", i, ta.Status, tb.Status, ack, m.Status)
		}
		if m.Content != ta.Text.String() || m.Content != tb.Text.String() {
			t.Fatalf("turn %d: stored %q, streamed %q / %q", i, m.Content, ta.Text.String(), tb.Text.String())
		}
		outcomes[m.Status]++
	}
	t.Logf("outcomes: %v", outcomes)
}

func TestCancelErrors(t *testing.T) {
	p := trtest.Serve(t)
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Send(`{"type":"cancel","turn_id":"no-such-turn","id":"x"}`)
	if f := ackOf(t, c, "x"); f.Type() != "error" || f.Str("code") != "not_found" {
		t.Fatalf("unknown turn answered %v", f)
	}
	var body map[string]any
	if code := trtest.Do(t, "POST", p.URL+"/v1/turns/no-such-turn/cancel", "", nil, &body); code != 404 {
		t.Fatalf("HTTP cancel of an unknown turn: %d %v", code, body)
	}
}

func TestDeleteCancelsRunningTurn(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "50", "--sim-tokens", "1000")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("doomed", nil)
	tr := startTurn(t, c, "doomed", "talk", 2)
	if code := trtest.Do(t, "DELETE", p.URL+"/v1/conversations/doomed", "", nil, nil); code != 204 {
		t.Fatalf("DELETE: %d", code)
	}
	finish(t, c, tr)
	if tr.Status != "cancelled" {
		t.Fatalf("turn of a deleted conversation ended %s", tr.Status)
	}
	var body map[string]any
	if code := trtest.Do(t, "GET", p.URL+"/v1/conversations/doomed/messages", "", nil, &body); code != 404 {
		t.Fatalf("messages of a deleted conversation: %d %v", code, body)
	}
}

// TestDeletedTurnIDIsNotReused: after a conversation is deleted, a send that
// names one of its turn ids again is refused (the bus still holds that
// turn's events), while the conversation and message ids are free; a fresh
// turn id then answers the new prompt, not the deleted one.
func TestDeletedTurnIDIsNotReused(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "0")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("gone", nil)
	send := func(id, text, turn string) trtest.Frame {
		c.Send(map[string]any{"type": "send", "conversation_id": "gone", "text": text, "message_id": "m1", "turn_id": turn, "id": id})
		return ackOf(t, c, id)
	}
	if f := send("s1", "[sim tokens=30] first", "t-old"); f.Type() != "ack" {
		t.Fatalf("first send: %v", f)
	}
	old := &trtest.Turn{ID: "t-old"}
	finish(t, c, old)
	if code := trtest.Do(t, "DELETE", p.URL+"/v1/conversations/gone", "", nil, nil); code != 204 {
		t.Fatalf("DELETE: %d", code)
	}
	c.Until(wait, func(f trtest.Frame) bool { return f.Type() == "error" && f.Str("code") == "not_found" }) // no longer joined
	// A resume of the deleted turn gets nothing of it.
	d := trtest.Dial(t, p.WSURL(), nil)
	d.Send(map[string]any{"type": "join", "conversation_id": "gone", "after": map[string]any{"turn_id": "t-old", "seq": 5}, "id": "j"})
	for _, f := range d.Until(wait, func(f trtest.Frame) bool { return f.Type() == "joined" || f.Type() == "error" }) {
		if f.Str("turn_id") == "t-old" || f["active"] != nil || len(asList(f["messages"])) != 0 {
			t.Fatalf("resume of a deleted turn got %v", f)
		}
	}
	d.Send(map[string]any{"type": "ping", "id": "p"})
	for _, f := range d.Until(wait, func(f trtest.Frame) bool { return f.Type() == "pong" }) {
		if f.Type() != "pong" && f.Type() != "ack" {
			t.Fatalf("after the resume of a deleted turn: %v", f)
		}
	}
	c.Join("gone", nil)
	f := send("s2", "[sim tokens=60] second, another prompt", "t-old")
	if f.Type() != "error" || f.Str("code") != "bad_request" || !strings.Contains(f.Str("message"), "turn_id") {
		t.Fatalf("send with the deleted turn's id: %v", f)
	}
	var body map[string]any
	if code := trtest.Do(t, "POST", p.URL+"/v1/conversations/gone/messages", "", map[string]any{"text": "x", "message_id": "m1", "turn_id": "t-old"}, &body); code != 400 {
		t.Fatalf("HTTP send with the deleted turn's id: %d %v", code, body)
	}
	if f := send("s3", "[sim tokens=60] second, another prompt", "t-new"); f.Type() != "ack" {
		t.Fatalf("send with a new turn id: %v", f)
	}
	tr := &trtest.Turn{ID: "t-new"}
	finish(t, c, tr)
	if tr.Status != "complete" || tr.Seq != 60 || tr.Text.String() == old.Text.String() {
		t.Fatalf("new turn %s after %d deltas, text %q (the deleted one's: %q)", tr.Status, tr.Seq, tr.Text.String(), old.Text.String())
	}
}

// asList is v as a JSON array (nil when it is not one).
func asList(v any) []any { l, _ := v.([]any); return l }

// A connection that follows a conversation deleted elsewhere (another tab,
// over HTTP) is told so: an error not_found with the conversation_id and
// no id. It keeps following the id, as a join would: a new turn its user
// starts there (the conversation created afresh) reaches it.
func TestDeletedConversationIsAnnounced(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "0")
	a := trtest.Dial(t, p.WSURL(), nil)
	a.Join("shared", nil)
	b := trtest.Dial(t, p.WSURL(), nil)
	b.Join("shared", nil)
	tr := startTurn(t, a, "shared", "[sim tokens=5] hello", 1)
	finish(t, a, tr)
	finish(t, b, &trtest.Turn{ID: tr.ID})
	if code := trtest.Do(t, "DELETE", p.URL+"/v1/conversations/shared", "", nil, nil); code != 204 {
		t.Fatalf("DELETE: %d", code)
	}
	for _, c := range []*trtest.Client{a, b} {
		frames := c.Until(wait, func(f trtest.Frame) bool { return f.Type() == "error" })
		f := frames[len(frames)-1]
		if f.Str("code") != "not_found" || f.Str("conversation_id") != "shared" || f["id"] != nil {
			t.Fatalf("notice of the delete: %v", f)
		}
	}
	tr2 := startTurn(t, b, "shared", "[sim tokens=5] again", 1)
	finish(t, b, tr2)
	seen := &trtest.Turn{ID: tr2.ID}
	finish(t, a, seen)
	if seen.Text.String() != tr2.Text.String() || seen.Status != "complete" {
		t.Fatalf("the other connection saw %q (%s) of the new turn, the sender %q", seen.Text.String(), seen.Status, tr2.Text.String())
	}
}
