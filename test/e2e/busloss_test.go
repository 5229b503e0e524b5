package e2e_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenrelay/tokenrelay/internal/auth"
	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/gateway"
	"github.com/tokenrelay/tokenrelay/internal/provider/sim"
	"github.com/tokenrelay/tokenrelay/internal/store"
	"github.com/tokenrelay/tokenrelay/internal/store/sqlite"
	"github.com/tokenrelay/tokenrelay/internal/trtest"
	"github.com/tokenrelay/tokenrelay/internal/worker"
)

// TestGatewayCutOffFromNATSMissesNoEnd runs two gateways and a worker in
// one process on a real NATS server and SQLite. Gateway A's connection to
// NATS is cut while a turn it streams ends, and again while a whole turn
// runs on gateway B: live events published meanwhile never reach A, the
// ends among them. Once A is back, its client gets each turn whole and
// ended once, as B's client does, without resuming.
func TestGatewayCutOffFromNATSMissesNoEnd(t *testing.T) {
	server := bustest.Start(t)
	url := server.Conn().ConnectedUrl()
	busA, cut := bustest.OpenCuttable(t, url)
	st, a := storeAndAuth(t)

	runWorker(t, url, st)
	onA := trtest.Dial(t, serveGateway(t, gateway.New(gateway.Config{}, busA, st, a)), nil)
	onB := trtest.Dial(t, serveGateway(t, gateway.New(gateway.Config{}, bustest.Open(t, url), st, a)), nil)
	const conv = "cut-off"
	onA.Join(conv, nil)
	onB.Join(conv, nil)
	// endOf returns a channel that gets the turn's end once the worker has
	// published it (seen on a connection that is never cut).
	endOf := func(turn string) <-chan bus.Event {
		ch := make(chan bus.Event, 1)
		sub, err := server.SubscribeTurnEnd(t.Context(), turn, func(e bus.Event) { ch <- e })
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = sub.Unsubscribe() })
		return ch
	}
	waitEnd := func(ch <-chan bus.Event) {
		t.Helper()
		select {
		case <-ch:
		case <-time.After(wait):
			t.Fatal("the worker published no end")
		}
	}

	// 1. The end (and the last deltas) of a turn A streams.
	ended := endOf("t1")
	onA.Send(map[string]any{"type": "send", "conversation_id": conv, "turn_id": "t1", "text": "one [sim tokens=60 rate=100]", "id": "s1"})
	t1A, t1B := &trtest.Turn{ID: "t1"}, &trtest.Turn{ID: "t1"}
	onA.Until(wait, func(f trtest.Frame) bool { t1A.Apply(f); return t1A.Seq >= 5 })
	cut.Cut()
	waitEnd(ended)
	cut.Restore()
	finish(t, onA, t1A)
	finish(t, onB, t1B)
	if t1A.Status != "complete" || t1A.Ends != 1 || t1A.Text.String() != t1B.Text.String() || t1A.Seq != 60 {
		t.Fatalf("A got t1 %s, %d ends, %d deltas, %q; B got %q", t1A.Status, t1A.Ends, t1A.Seq, t1A.Text.String(), t1B.Text.String())
	}

	// 2. A whole turn, sent on B while A is cut off.
	ended = endOf("t2")
	cut.Cut()
	onB.Send(map[string]any{"type": "send", "conversation_id": conv, "turn_id": "t2", "text": "two [sim tokens=20 rate=0]", "id": "s2"})
	t2A, t2B := &trtest.Turn{ID: "t2"}, &trtest.Turn{ID: "t2"}
	finish(t, onB, t2B)
	waitEnd(ended)
	cut.Restore()
	var sawMessage, sawStart bool
	onA.Until(wait, func(f trtest.Frame) bool {
		switch f.Type() {
		case "message":
			sawMessage = sawMessage || strings.HasPrefix(f.Obj("message").Str("content"), "two")
		case "turn.start":
			sawStart = sawStart || f.Str("turn_id") == "t2"
		}
		t2A.Apply(f)
		return t2A.Ends > 0
	})
	if len(t2A.Errors) > 0 || !sawMessage || !sawStart {
		t.Fatalf("A got t2 with violations %v, user message %v, start %v", t2A.Errors, sawMessage, sawStart)
	}
	if t2A.Status != "complete" || t2A.Text.String() != t2B.Text.String() {
		t.Fatalf("A got t2 %s %q; B got %q", t2A.Status, t2A.Text.String(), t2B.Text.String())
	}
}

// runWorker runs a worker with the simulator on its own connection to the
// NATS server at url until the end of the test.
func runWorker(t *testing.T, url string, st store.Store) {
	t.Helper()
	w := worker.New(worker.Config{}, bustest.Open(t, url), st, sim.New(sim.Config{}))
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() { stop(); <-done })
}

// storeAndAuth opens a SQLite store for the test and a dev-mode
// authenticator.
func storeAndAuth(t *testing.T) (*sqlite.DB, *auth.Authenticator) {
	t.Helper()
	st, err := sqlite.Open(t.Context(), filepath.Join(t.TempDir(), "tokenrelay.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	a, err := auth.New(auth.Config{Dev: true})
	if err != nil {
		t.Fatal(err)
	}
	return st, a
}

// answerWorkerPing answers the gateways' probe for a worker on server's
// bus until the end of the test, as a worker would, though none runs:
// sends are taken and their turns stay queued.
func answerWorkerPing(t *testing.T, server *bus.Bus) {
	t.Helper()
	ping, err := server.ServeWorkerPing("test", func() string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ping.Unsubscribe() })
}

// serveGateway serves gw over HTTP until the end of the test and returns
// its WebSocket URL.
func serveGateway(t *testing.T, gw *gateway.Server) string {
	srv := httptest.NewServer(gw)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = gw.Shutdown(ctx)
		srv.Close()
	})
	return "ws" + strings.TrimPrefix(srv.URL, "http") + "/v1/ws"
}

// TestGatewayReadsAQuietTurnAgain: a turn's deltas and end reach the
// events stream and the chat store but never the gateway live (a loss
// nothing reports, as a NATS route between cluster nodes dropping them).
// Once the turn has been quiet for --quiet-check, the view reads it again
// from the stream and the client gets the text and the end.
func TestGatewayReadsAQuietTurnAgain(t *testing.T) {
	server := bustest.Start(t)
	st, a := storeAndAuth(t)
	gw := gateway.New(gateway.Config{QuietCheck: 100 * time.Millisecond}, bustest.Open(t, server.Conn().ConnectedUrl()), st, a)
	c := trtest.Dial(t, serveGateway(t, gw), nil)
	const conv = "quiet"
	c.Join(conv, nil)
	// No worker runs (the test answers the gateways' worker probe): the
	// turn stays queued until the test produces it.
	answerWorkerPing(t, server)
	if err := server.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	c.Send(map[string]any{"type": "send", "conversation_id": conv, "turn_id": "q1", "text": "hello?", "id": "s"})
	tr := &trtest.Turn{ID: "q1"}
	c.Until(wait, func(f trtest.Frame) bool { tr.Apply(f); return f.Type() == "turn.start" })

	// A worker's output, stored but never announced.
	js, err := jetstream.New(server.Conn())
	if err != nil {
		t.Fatal(err)
	}
	store1 := func(e bus.Event) {
		t.Helper()
		e.ConversationID, e.TurnID = conv, "q1"
		data, err := json.Marshal(e)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := js.Publish(t.Context(), e.StoredSubject(), data); err != nil {
			t.Fatal(err)
		}
	}
	if ok, err := st.StartTurn(t.Context(), "q1", time.Now()); !ok || err != nil {
		t.Fatalf("start turn: %v %v", ok, err)
	}
	store1(bus.Event{Kind: bus.KindDelta, Seq: 1, Text: "hello"})
	store1(bus.Event{Kind: bus.KindDelta, Seq: 2, Off: 5, Text: " world"})
	if _, _, err := st.FinishTurn(t.Context(), store.TurnResult{TurnID: "q1", Status: chat.StatusComplete, Content: "hello world", Seq: 2, Now: time.Now()}); err != nil {
		t.Fatal(err)
	}
	store1(bus.Event{Kind: bus.KindEnd, Seq: 2, Status: chat.StatusComplete})

	c.Until(wait, func(f trtest.Frame) bool { tr.Apply(f); return tr.Ends > 0 })
	if len(tr.Errors) > 0 || tr.Status != "complete" || tr.Text.String() != "hello world" {
		t.Fatalf("got %s %q %v, want complete \"hello world\"", tr.Status, tr.Text.String(), tr.Errors)
	}
}

// TestInProcessGatewayDoesNotPingItsWorker: under serve's in-process bus
// the worker lives and dies with the gateway, so a send is not refused for
// a worker ping that goes unanswered (as it can on an overloaded machine):
// here no worker answers at all, and the send is still taken.
func TestInProcessGatewayDoesNotPingItsWorker(t *testing.T) {
	b, _ := openBus(t, bus.Config{Local: bus.NewLocal()})
	st, a := storeAndAuth(t)
	c := trtest.Dial(t, serveGateway(t, gateway.New(gateway.Config{}, b, st, a)), nil)
	c.Join("in-process", nil)
	c.Send(map[string]any{"type": "send", "conversation_id": "in-process", "text": "hello", "id": "s"})
	f := c.Until(wait, func(f trtest.Frame) bool { return f.Str("id") == "s" })
	if last := f[len(f)-1]; last.Type() != "ack" {
		t.Fatalf("send with no worker answering pings: %v, want an ack", last)
	}
}

// TestSendsShareOneWorkerPing: with no worker answering (a frozen one still
// subscribed, so each ping waits out its timeout), sends that arrive together
// share one ping and are all refused `unavailable`, instead of pinging one
// after another behind each other's timeouts.
func TestSendsShareOneWorkerPing(t *testing.T) {
	b, nc := openBus(t, bus.Config{})
	pings := make(chan struct{}, 100)
	frozen, err := nc.Subscribe(bus.WorkerPingSubj, func(*nats.Msg) { pings <- struct{}{} })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = frozen.Unsubscribe() })
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	st, a := storeAndAuth(t)
	url := serveGateway(t, gateway.New(gateway.Config{}, b, st, a))
	const sends = 8
	clients := make([]*trtest.Client, sends)
	for i := range clients {
		clients[i] = trtest.Dial(t, url, nil)
		clients[i].Join(fmt.Sprintf("frozen-%d", i), nil)
	}
	for i, c := range clients {
		c.Send(map[string]any{"type": "send", "conversation_id": fmt.Sprintf("frozen-%d", i), "text": "hello", "id": "s"})
	}
	for i, c := range clients {
		f := c.Until(wait, func(f trtest.Frame) bool { return f.Str("id") == "s" })
		if last := f[len(f)-1]; last.Type() != "error" || last.Str("code") != "unavailable" {
			t.Fatalf("send %d with a frozen worker: %v, want error unavailable", i, last)
		}
	}
	if n := len(pings); n >= sends {
		t.Fatalf("%d sends pinged the workers %d times, want them to share pings", sends, n)
	}
}

// TestSendsStopBeforeTheWorker: once serve starts shutting down (StopSends,
// before it stops its worker), a send is refused `unavailable` and stores
// nothing, while a retry of a stored message is still answered with it.
func TestSendsStopBeforeTheWorker(t *testing.T) {
	b, _ := openBus(t, bus.Config{Local: bus.NewLocal()})
	st, a := storeAndAuth(t)
	gw := gateway.New(gateway.Config{}, b, st, a)
	c := trtest.Dial(t, serveGateway(t, gw), nil)
	c.Join("draining", nil)
	c.Send(map[string]any{"type": "send", "conversation_id": "draining", "text": "before", "message_id": "m1", "id": "s1"})
	if f := c.Until(wait, func(f trtest.Frame) bool { return f.Str("id") == "s1" }); f[len(f)-1].Type() != "ack" {
		t.Fatalf("send before shutdown: %v", f[len(f)-1])
	}
	gw.StopSends(t.Context())
	c.Send(map[string]any{"type": "send", "conversation_id": "draining", "text": "after", "message_id": "m2", "id": "s2"})
	if last := c.Until(wait, func(f trtest.Frame) bool { return f.Str("id") == "s2" }); last[len(last)-1].Str("code") != "unavailable" {
		t.Fatalf("send while shutting down: %v, want error unavailable", last[len(last)-1])
	}
	c.Send(map[string]any{"type": "send", "conversation_id": "draining", "text": "before", "message_id": "m1", "id": "s3"})
	if last := c.Until(wait, func(f trtest.Frame) bool { return f.Str("id") == "s3" }); last[len(last)-1].Type() != "ack" {
		t.Fatalf("retry while shutting down: %v, want its ack", last[len(last)-1])
	}
	msgs, err := st.Messages(t.Context(), "draining", 10, "")
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range msgs {
		if m.ID == "m2" {
			t.Fatal("a send refused while shutting down was stored")
		}
	}
}

// openBus opens a bus with cfg on a connection of its own to a new NATS
// server, and returns it with that connection.
func openBus(t *testing.T, cfg bus.Config) (*bus.Bus, *nats.Conn) {
	t.Helper()
	server := bustest.Start(t)
	nc, err := nats.Connect(server.Conn().ConnectedUrl())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	b, err := bus.Open(t.Context(), nc, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return b, nc
}

// TestCancelWhileTombstonesFail: while the cancels bucket refuses writes
// (as when its stream has no leader, for seconds after a NATS node is
// lost), a cancel of a streaming turn still stops it, and is answered
// cancelled: the signal goes over any live route, and the answer waits for
// the end as ever.
func TestCancelWhileTombstonesFail(t *testing.T) {
	server := bustest.Start(t)
	url := server.Conn().ConnectedUrl()
	st, a := storeAndAuth(t)
	runWorker(t, url, st)
	c := trtest.Dial(t, serveGateway(t, gateway.New(gateway.Config{}, bustest.Open(t, url), st, a)), nil)
	const conv = "no-tombstones"
	c.Join(conv, nil)
	tr := startTurn(t, c, conv, "[sim tokens=1000 rate=50] go on", 2)

	js, err := jetstream.New(server.Conn())
	if err != nil {
		t.Fatal(err)
	}
	kv, err := js.Stream(t.Context(), "KV_"+bus.CancelBucket)
	if err != nil {
		t.Fatal(err)
	}
	refusing := kv.CachedInfo().Config
	refusing.MaxMsgSize = 1
	if _, err := js.UpdateStream(t.Context(), refusing); err != nil {
		t.Fatal(err)
	}
	c.Send(map[string]any{"type": "cancel", "turn_id": tr.ID, "id": "c"})
	if ack := ackOf(t, c, "c", tr); ack.Type() != "ack" || ack.Str("status") != "cancelled" {
		t.Fatalf("cancel answered %v", ack)
	}
	finish(t, c, tr)
	if tr.Status != "cancelled" {
		t.Fatalf("turn ended %s", tr.Status)
	}
}
