package cluster_test

import (
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/store"
	"github.com/tokenrelay/tokenrelay/internal/store/postgres"
	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// The statements of the store calls a worker makes for a turn, as the
// PostgreSQL store sends them (a stallNext matches on them).
const (
	stmtStartTurn = `UPDATE messages SET status = 'streaming'`
	stmtTurnHead  = `m.turn_id = $1 AND m.role = 'assistant'`
	stmtContext   = `m.conversation_id = $1 AND m.position <`
	stmtQueued    = `ORDER BY m.created_at, m.position`
)

// hangCluster starts a gateway on the store and a worker whose store is
// reached through a proxy that can stall it, with args for the worker.
func hangCluster(t *testing.T, args ...string) (*cluster, *pgProxy) {
	t.Helper()
	pg := postgresURL(t)
	px := newPGProxy(t, pg)
	c := startCluster(t, clusterOptions{gateways: 1, workers: 1, storeURL: pg,
		workerArgs: append([]string{"--store-url", px.url}, args...)})
	return c, px
}

// stalled waits until the proxy has stalled the connection of a statement.
func stalled(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(wait):
		t.Fatalf("the worker never ran %s", what)
	}
}

// A store call of a worker that its connection leaves unanswered (the
// server frozen, packets dropped: the connection stays open) fails at
// --store-timeout, and the turn then goes on as when the store refuses
// the call: a start or a read of the turn not answered leaves the job to
// come back, which produces the turn; a read of the conversation for the
// model ends the turn with status error; the sweep for queued turns looks
// again at its next round and enqueues the turn it finds.
func TestStoreCallsThatHang(t *testing.T) {
	c, px := hangCluster(t, "--store-timeout", "1s", "--queued-timeout", "1s")
	for _, tc := range []struct {
		name    string
		id      string
		stall   []string
		jobless bool // stored with no job, as by a gateway that died
		want    string
		wantErr string
	}{
		{name: "start", id: "start", stall: []string{stmtStartTurn}, want: "complete"},
		{name: "read of a job that came back", id: "reread", stall: []string{stmtStartTurn, stmtTurnHead}, want: "complete"},
		{name: "read of the conversation", id: "context", stall: []string{stmtContext}, want: "error", wantErr: "the conversation could not be read"},
		{name: "sweep for queued turns", id: "sweep", stall: []string{stmtQueued}, jobless: true, want: "complete"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conv, turn := "hang-"+tc.id, "t-"+tc.id
			cl := trtest.Dial(t, c.gw[0].WSURL(), nil)
			cl.Join(conv, nil)
			var stalls []<-chan struct{}
			for _, sql := range tc.stall {
				stalls = append(stalls, px.stallNext(sql))
			}
			text := "speak [sim tokens=5 rate=0]"
			if tc.jobless {
				db, err := postgres.Open(t.Context(), c.store)
				if err != nil {
					t.Fatal(err)
				}
				defer db.Close()
				if _, err := db.Send(t.Context(), store.SendRequest{ConversationID: conv, Owner: "dev", MessageID: "m-" + turn, TurnID: turn, Text: text, Now: time.Now()}); err != nil {
					t.Fatal(err)
				}
			} else {
				send(cl, conv, turn, text)
			}
			for i, ch := range stalls {
				stalled(t, ch, tc.stall[i])
			}
			fs := cl.Until(wait, func(f trtest.Frame) bool { return f.Type() == "turn.end" && f.Str("turn_id") == turn })
			end := fs[len(fs)-1]
			if end.Str("status") != tc.want || end.Str("error") != tc.wantErr {
				t.Fatalf("the turn ended %v, want %s %q", end, tc.want, tc.wantErr)
			}
			if m := storedTurn(t, c.gw[0].URL, conv, turn); m.Status != tc.want {
				t.Fatalf("stored %s, want %s", m.Status, tc.want)
			}
		})
	}
}

// A Stop while the worker waits for the store to read the conversation for
// the model ends the turn cancelled at once: the read does not hold it up
// to --store-timeout.
func TestStopWhileTheStoreHangs(t *testing.T) {
	c, px := hangCluster(t, "--store-timeout", "1h")
	cl := trtest.Dial(t, c.gw[0].WSURL(), nil)
	cl.Join("hang-stop", nil)
	st := px.stallNext(stmtContext)
	send(cl, "hang-stop", "t-stop", "speak [sim tokens=5 rate=0]")
	stalled(t, st, stmtContext)
	cl.Send(map[string]any{"type": "cancel", "turn_id": "t-stop", "id": "stop"})
	var ack, end trtest.Frame
	cl.Until(wait, func(f trtest.Frame) bool {
		switch {
		case f.Type() == "ack" && f.Str("id") == "stop", f.Type() == "error" && f.Str("id") == "stop":
			ack = f
		case f.Type() == "turn.end" && f.Str("turn_id") == "t-stop":
			end = f
		}
		return ack != nil && end != nil
	})
	if end.Str("status") != "cancelled" || ack.Type() != "ack" || ack.Str("status") != "cancelled" {
		t.Fatalf("the turn ended %v, the Stop answered %v: want cancelled", end, ack)
	}
}

// A gateway's read of the store for a turn its client follows that its
// connection leaves unanswered fails at the request timeout, and is made
// again: here the quiet check of a turn whose end was stored and never
// published (as when the gateway that cancelled it while queued died
// before publishing the end) asks the store for the turn, and its first
// read hangs. The client still gets the turn's end, from the next read.
func TestGatewayStoreReadThatHangs(t *testing.T) {
	pg := postgresURL(t)
	px := newPGProxy(t, pg)
	c := startCluster(t, clusterOptions{gateways: 1, workers: 1, storeURL: pg,
		gatewayArgs: []string{"--store-url", px.url, "--quiet-check", "200ms"},
		// The turn is stored with no job: no worker is to take it up.
		workerArgs: []string{"--queued-timeout", "-1s"}})
	const conv, turn = "hang-quiet", "t-quiet"
	db, err := postgres.Open(t.Context(), c.store)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Send(t.Context(), store.SendRequest{ConversationID: conv, Owner: "dev", MessageID: "m-" + turn, TurnID: turn, Text: "speak", Now: time.Now()}); err != nil {
		t.Fatal(err)
	}
	cl := trtest.Dial(t, c.gw[0].WSURL(), nil)
	if a := cl.Join(conv, nil).Obj("active"); a == nil || a.Str("turn_id") != turn {
		t.Fatalf("joined with active turn %v, want %s", a, turn)
	}
	st := px.stallNext(stmtTurnHead)
	if _, ok, err := db.FinishTurn(t.Context(), store.TurnResult{TurnID: turn, Status: chat.StatusCancelled, Now: time.Now()}); err != nil || !ok {
		t.Fatalf("finish the turn in the store: %v %v", ok, err)
	}
	select {
	case <-st:
	case <-time.After(wait):
		t.Fatal("the gateway never read the turn from the store")
	}
	fs := cl.Until(wait, func(f trtest.Frame) bool { return f.Type() == "turn.end" && f.Str("turn_id") == turn })
	if end := fs[len(fs)-1]; end.Str("status") != "cancelled" || end.Int("seq") != 0 {
		t.Fatalf("the turn ended %v, want cancelled at seq 0", end)
	}
}
