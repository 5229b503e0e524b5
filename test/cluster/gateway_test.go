package cluster_test

import (
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// TestAnyGatewayServesAnyConversation: a client on gateway A sends while two
// tabs on gateway B watch; B cancels A's turn; everyone sees the same text
// and one end, and both gateways read the same stored history.
func TestAnyGatewayServesAnyConversation(t *testing.T) {
	c := startCluster(t, clusterOptions{})
	a := trtest.Dial(t, c.gw[0].WSURL(), nil)
	b1 := trtest.Dial(t, c.gw[1].WSURL(), nil)
	b2 := trtest.Dial(t, c.gw[1].WSURL(), nil)
	const conv = "across"
	for _, cl := range []*trtest.Client{a, b1, b2} {
		cl.Join(conv, nil)
	}

	// A short turn sent on A is seen whole on B.
	send(a, conv, "t1", "hello [sim tokens=40 rate=0]")
	ta, tb := &trtest.Turn{ID: "t1"}, &trtest.Turn{ID: "t1"}
	finish(t, a, ta)
	fs := b1.Until(wait, func(f trtest.Frame) bool { tb.Apply(f); return tb.Ends > 0 })
	if len(tb.Errors) > 0 || tb.Status != "complete" || tb.Text.String() != ta.Text.String() {
		t.Fatalf("B saw %s %q %v, A saw %s %q", tb.Status, tb.Text.String(), tb.Errors, ta.Status, ta.Text.String())
	}
	if !sawStart(fs, "t1") {
		t.Fatal("B got no turn.start for a turn sent on A")
	}

	// A long turn sent on A, cancelled from the other tab on B.
	send(a, conv, "t2", "go on [sim tokens=5000 rate=100]")
	t2a, t2b1, t2b2 := &trtest.Turn{ID: "t2"}, &trtest.Turn{ID: "t2"}, &trtest.Turn{ID: "t2"}
	until(t, b1, t2b1, 10)
	b2.Send(map[string]any{"type": "cancel", "turn_id": "t2", "id": "c"})
	sent := time.Now()
	var ack trtest.Frame
	b2.Until(wait, func(f trtest.Frame) bool {
		t2b2.Apply(f)
		if f.Str("id") == "c" && (f.Type() == "ack" || f.Type() == "error") {
			ack = f
		}
		return ack != nil && t2b2.Ends > 0
	})
	ended := time.Since(sent)
	if ack.Type() != "ack" || ack.Str("status") != "cancelled" || ack["already"] != false {
		t.Fatalf("cancel on B answered %v", ack)
	}
	finish(t, a, t2a)
	finish(t, b1, t2b1)
	for name, tr := range map[string]*trtest.Turn{"A": t2a, "B1": t2b1, "B2": t2b2} {
		if tr.Status != "cancelled" || tr.Ends != 1 || len(tr.Errors) > 0 {
			t.Fatalf("%s: turn ended %d× %s %v", name, tr.Ends, tr.Status, tr.Errors)
		}
		if tr.Text.String() != t2a.Text.String() {
			t.Fatalf("%s saw %q, A saw %q", name, tr.Text.String(), t2a.Text.String())
		}
	}
	if t2a.Seq >= 5000 {
		t.Fatal("the turn ran to its end: the cancel did not stop it")
	}
	t.Logf("cancel on gateway B of a turn sent on A: end seen on B %v after the cancel, at seq %d", ended, t2a.Seq)

	// Both gateways read the same history, and B can start the next turn.
	for _, gw := range c.gw {
		m := storedTurn(t, gw.URL, conv, "t2")
		if m.Status != "cancelled" || m.Content != t2a.Text.String() {
			t.Fatalf("%s stores t2 as %s %q, streamed %q", gw.URL, m.Status, m.Content, t2a.Text.String())
		}
	}
	send(b1, conv, "t3", "again [sim tokens=20 rate=0]")
	t3a, t3b := &trtest.Turn{ID: "t3"}, &trtest.Turn{ID: "t3"}
	finish(t, b1, t3b)
	finish(t, a, t3a)
	if t3a.Status != "complete" || t3a.Text.String() != t3b.Text.String() {
		t.Fatalf("t3: A %s %q, B %s %q", t3a.Status, t3a.Text.String(), t3b.Status, t3b.Text.String())
	}

	// Deleted through A, the conversation is no longer followed on B
	// either: its tabs are told.
	if code := trtest.Do(t, "DELETE", c.gw[0].URL+"/v1/conversations/"+conv, "", nil, nil); code != 204 {
		t.Fatalf("DELETE on A: %d", code)
	}
	for name, cl := range map[string]*trtest.Client{"A": a, "B1": b1, "B2": b2} {
		fs := cl.Until(wait, func(f trtest.Frame) bool { return f.Type() == "error" })
		if f := fs[len(fs)-1]; f.Str("code") != "not_found" || f.Str("conversation_id") != conv {
			t.Fatalf("%s was told %v of the delete", name, f)
		}
	}
}

func sawStart(fs []trtest.Frame, turn string) bool {
	for _, f := range fs {
		if f.Type() == "turn.start" && f.Str("turn_id") == turn {
			return true
		}
	}
	return false
}

// TestGatewayLost: the gateway a client streams from dies (SIGKILL) or is
// stopped (SIGTERM, close 1001); the client joins another gateway with
// "after" and gets the rest of the turn with no gap and no duplicate, while
// a client on the surviving gateway never notices.
func TestGatewayLost(t *testing.T) {
	// A drain, as behind a load balancer; the turn outlives it.
	c := startCluster(t, clusterOptions{gateways: 3, gatewayArgs: []string{"--shutdown-drain", "1s"}})
	tests := []struct {
		name string
		gw   int
		stop func(t *testing.T, p *trtest.Proc)
		want websocket.StatusCode // -1: no close frame
	}{
		{"SIGKILL", 0, func(_ *testing.T, p *trtest.Proc) { p.Kill() }, -1},
		{"SIGTERM", 1, func(t *testing.T, p *trtest.Proc) {
			if err := p.Stop(); err != nil {
				t.Errorf("gateway exit after SIGTERM: %v\n%s", err, p.Stderr())
			}
		}, websocket.StatusGoingAway},
	}
	survivor := c.gw[2]
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			conv := "lost-" + tt.name
			doomed := c.gw[tt.gw]
			cl := trtest.Dial(t, doomed.WSURL(), nil)
			watcher := trtest.Dial(t, survivor.WSURL(), nil)
			cl.Join(conv, nil)
			watcher.Join(conv, nil)
			turn := "t-" + tt.name
			send(cl, conv, turn, "a long one [sim tokens=400 rate=100]")
			tr, tw := &trtest.Turn{ID: turn}, &trtest.Turn{ID: turn}
			until(t, cl, tr, 20)
			tt.stop(t, doomed)
			// Drain what the dead socket had already delivered.
			for {
				f, err := cl.Next(wait)
				if err != nil {
					break
				}
				tr.Apply(f)
			}
			if code := cl.CloseStatus(); code != tt.want {
				t.Fatalf("close code %d, want %d", code, tt.want)
			}
			// Reconnect elsewhere, resuming after the last seq applied.
			had := tr.Seq
			re := trtest.Dial(t, survivor.WSURL(), nil)
			resume(t, tr, re.Join(conv, map[string]any{"after": map[string]any{"turn_id": turn, "seq": tr.Seq}}))
			finish(t, re, tr)
			finish(t, watcher, tw)
			m := storedTurn(t, survivor.URL, conv, turn)
			if tr.Status != "complete" || tr.Text.String() != m.Content || tw.Text.String() != m.Content {
				t.Fatalf("resumed client: %s, %d bytes; watcher %d bytes; stored %s, %d bytes",
					tr.Status, len(tr.Text.String()), len(tw.Text.String()), m.Status, len(m.Content))
			}
			t.Logf("resumed after seq %d of %d on another gateway", had, tr.Seq)
		})
	}
}
