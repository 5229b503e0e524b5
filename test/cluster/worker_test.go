package cluster_test

import (
	"context"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// flight is one turn being streamed to one client.
type flight struct {
	conv string
	c    *trtest.Client
	tr   *trtest.Turn
}

// spread starts long turns, each in its own conversation and alternating
// between gateways, until both workers are producing at least one (for
// 10 s at most: a worker whose pull request was lost with a NATS node may
// take a missed heartbeat, 2 s, to pull again). It returns the turns and
// how many each worker runs.
func spread(t *testing.T, c *cluster, prefix, text string) ([]*flight, []float64) {
	t.Helper()
	waitWorkersPulling(t, c)
	var fl []*flight
	for i, start := 0, time.Now(); i < 40 && time.Since(start) < 10*time.Second; i++ {
		f := &flight{conv: fmt.Sprintf("%s-%d", prefix, i)}
		f.tr = &trtest.Turn{ID: f.conv + "-t"}
		f.c = trtest.Dial(t, c.gw[i%len(c.gw)].WSURL(), nil)
		f.c.Join(f.conv, nil)
		send(f.c, f.conv, f.tr.ID, text)
		until(t, f.c, f.tr, 3)
		fl = append(fl, f)
		running := []float64{
			metric(t, c.wk[0].URL, "tokenrelay_turns_running"),
			metric(t, c.wk[1].URL, "tokenrelay_turns_running"),
		}
		if running[0]+running[1] != float64(len(fl)) {
			t.Fatalf("workers report %v turns running, %d streaming", running, len(fl))
		}
		if running[0] > 0 && running[1] > 0 {
			return fl, running
		}
	}
	t.Fatalf("%d turns in 10 s all went to one worker", len(fl))
	return nil, nil
}

// waitWorkersPulling waits until the job consumer's leader holds a waiting
// pull request from every worker, so that turns sent next can reach any of
// them. A pull request is lost when the node leading the consumer stops,
// and the worker pulls again from the new leader.
func waitWorkersPulling(t *testing.T, c *cluster) {
	t.Helper()
	js, err := jetstream.New(c.nats.connect(t))
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "every worker pulling jobs", func() bool {
		// Right after a NATS node stops, the consumer may have no leader
		// yet and its info request times out: ask again until it answers.
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		defer cancel()
		cons, err := js.Consumer(ctx, bus.JobsStream, bus.JobsConsumer)
		return err == nil && cons.CachedInfo().NumWaiting >= len(c.wk)
	})
}

// statuses counts the stored statuses of the flights' turns.
func statuses(t *testing.T, base string, fl []*flight) map[string]int {
	t.Helper()
	n := map[string]int{}
	for _, f := range fl {
		n[storedTurn(t, base, f.conv, f.tr.ID).Status]++
	}
	return n
}

// TestWorkerKilledMidTurn: a worker killed with SIGKILL leaves its turns
// streaming; the job is redelivered after the ack wait and the other worker
// ends them as interrupted, text saved, within 10s, without calling the
// model again. The other worker's own turns complete undisturbed.
func TestWorkerKilledMidTurn(t *testing.T) {
	c := startCluster(t, clusterOptions{})
	fl, running := spread(t, c, "kill", "speak [sim tokens=800 rate=100]")
	victim, survivor := c.wk[0], c.wk[1]
	reqsBefore := metric(t, survivor.URL, "tokenrelay_provider_requests_total")
	victim.Kill()
	killed := time.Now()
	eventually(t, 10*time.Second, "the killed worker's turns end interrupted", func() bool {
		return statuses(t, c.gw[0].URL, fl)["interrupted"] == int(running[0])
	})
	t.Logf("%d turns of the killed worker interrupted %v after SIGKILL (ack wait 4s)", int(running[0]), time.Since(killed).Round(10*time.Millisecond))
	var interrupted, complete int
	for _, f := range fl {
		finish(t, f.c, f.tr)
		m := storedTurn(t, c.gw[1].URL, f.conv, f.tr.ID)
		if m.Status != f.tr.Status || m.Content != f.tr.Text.String() {
			t.Fatalf("%s: streamed %s %d bytes, stored %s %d bytes", f.tr.ID, f.tr.Status, len(f.tr.Text.String()), m.Status, len(m.Content))
		}
		switch f.tr.Status {
		case "interrupted":
			interrupted++
			if m.Content == "" {
				t.Fatalf("%s: interrupted with no text saved", f.tr.ID)
			}
		case "complete":
			complete++
		default:
			t.Fatalf("%s ended %s", f.tr.ID, f.tr.Status)
		}
	}
	if interrupted != int(running[0]) || complete != int(running[1]) {
		t.Fatalf("%d interrupted, %d complete; the workers ran %v", interrupted, complete, running)
	}
	if got := metric(t, survivor.URL, "tokenrelay_provider_requests_total"); got != reqsBefore {
		t.Fatalf("the surviving worker called the model %v times more: a lost turn was re-run", got-reqsBefore)
	}
	if got := metric(t, survivor.URL, `tokenrelay_turns_total{status="interrupted"}`); got != running[0] {
		t.Fatalf("the surviving worker ended %v turns as interrupted, want %v", got, running[0])
	}
}

// TestWorkerStopped: SIGTERM makes a worker end its own turns as
// interrupted at once (the other worker's continue); with no worker left the
// gateways are not ready and refuse sends; a new worker brings them back.
func TestWorkerStopped(t *testing.T) {
	c := startCluster(t, clusterOptions{})
	fl, running := spread(t, c, "term", "speak [sim tokens=600 rate=100]")
	stopped := time.Now()
	if err := c.wk[0].Stop(); err != nil {
		t.Fatalf("worker exit after SIGTERM: %v\n%s", err, c.wk[0].Stderr())
	}
	took := time.Since(stopped)
	// Its turns are ended before it exits.
	if n := statuses(t, c.gw[0].URL, fl)["interrupted"]; n != int(running[0]) {
		t.Fatalf("after the worker exited, %d turns are interrupted, want %v", n, running[0])
	}
	t.Logf("SIGTERM to exit: %v, %d turns interrupted", took.Round(time.Millisecond), int(running[0]))
	if code := trtest.Get(t, c.gw[0].URL+"/readyz", nil); code != http.StatusOK {
		t.Fatalf("/readyz with one worker left: %d", code)
	}
	for _, f := range fl {
		finish(t, f.c, f.tr)
		if f.tr.Status != "interrupted" && f.tr.Status != "complete" {
			t.Fatalf("%s ended %s", f.tr.ID, f.tr.Status)
		}
	}
	if n := statuses(t, c.gw[1].URL, fl)["complete"]; n != int(running[1]) {
		t.Fatalf("%d turns complete, want the other worker's %v", n, running[1])
	}

	// No worker: not ready, and a send is refused rather than queued.
	if err := c.wk[1].Stop(); err != nil {
		t.Fatalf("worker exit after SIGTERM: %v", err)
	}
	var ready struct {
		Checks map[string]string `json:"checks"`
	}
	if code := trtest.Get(t, c.gw[1].URL+"/readyz", &ready); code != http.StatusServiceUnavailable {
		t.Fatalf("/readyz with no worker: %d %v", code, ready)
	}
	cl := fl[0].c
	cl.Send(map[string]any{"type": "send", "conversation_id": fl[0].conv, "text": "anyone?", "id": "none"})
	fs := cl.Until(wait, func(f trtest.Frame) bool { return f.Str("id") == "none" })
	if last := fs[len(fs)-1]; last.Type() != "error" || last.Str("code") != "unavailable" {
		t.Fatalf("send with no worker answered %v", last)
	}
	c.startWorker(t)
	c.gw[1].WaitReady(t)
	send(cl, fl[0].conv, "back", "hello [sim tokens=10 rate=0]")
	tr := &trtest.Turn{ID: "back"}
	finish(t, cl, tr)
	if tr.Status != "complete" {
		t.Fatalf("turn after a new worker started ended %s", tr.Status)
	}
}

// TestServeRestartLeavesOtherWorkersTurns runs an external worker on the
// NATS of `serve --nats-listen`. serve is killed mid-turn and started
// again: the turns the external worker produces run on to their end,
// serve's own turn, whose producer died with it, ends interrupted, and
// every turn's stored text is what its events hold.
func TestServeRestartLeavesOtherWorkersTurns(t *testing.T) {
	pg := postgresURL(t)
	migrate(t, pg)
	hub := fmt.Sprintf("127.0.0.1:%d", bustest.FreePorts(t, 1)[0])
	srv := trtest.Serve(t, "--nats-listen", hub, "--store-url", pg, "--worker-concurrency", "1",
		"--limit-turns", "0", "--limit-sends", "0", "--limit-connections", "0")
	wk := trtest.Start(t, "worker", "--nats-url", "nats://"+hub, "--store-url", pg, "--metrics-addr", "127.0.0.1:0")
	var convs []string
	for i := range 4 {
		conv := fmt.Sprintf("hub-%d", i)
		c := trtest.Dial(t, srv.WSURL(), nil)
		c.Join(conv, nil)
		tr := &trtest.Turn{ID: conv + "-t"}
		send(c, conv, tr.ID, "[sim tokens=150 rate=30]")
		until(t, c, tr, 3)
		convs = append(convs, conv)
	}
	if n := metric(t, wk.URL, "tokenrelay_turns_running"); n < 1 {
		t.Fatalf("the external worker produces %v turns, want at least 1 (serve's takes one at a time)", n)
	}
	srv.Kill()
	srv = srv.Restart(t)
	complete := 0
	for _, conv := range convs {
		id := conv + "-t"
		var m message
		eventually(t, 60*time.Second, "turn "+id+" ends", func() bool {
			m = storedTurn(t, srv.URL, conv, id)
			return m.Status != "queued" && m.Status != "streaming"
		})
		if m.Status == "complete" {
			complete++
		}
		// Its events, from the start, against the store.
		c := trtest.Dial(t, srv.WSURL(), nil)
		tr := &trtest.Turn{ID: id}
		resume(t, tr, c.Join(conv, map[string]any{"after": map[string]any{"turn_id": id, "seq": 0}, "history": 0}))
		finish(t, c, tr)
		if tr.Text.String() != m.Content || tr.Status != m.Status {
			t.Errorf("turn %s: events hold %d bytes to seq %d (%s), the store %d bytes (%s)", id, tr.Text.Len(), tr.Seq, tr.Status, len(m.Content), m.Status)
		}
	}
	if complete == 0 {
		t.Error("no turn completed: the external worker's turns were ended under it")
	}
	if t.Failed() {
		t.Logf("worker's log:\n%s\nserve's log:\n%s", wk.Stderr(), srv.Stderr())
	}
}

// TestWorkerServesProfiler: a worker given --debug-addr serves Go's
// profiler there, as serve and gateway do.
func TestWorkerServesProfiler(t *testing.T) {
	nc := startNATS(t)
	pg := postgresURL(t)
	migrate(t, pg)
	addr := fmt.Sprintf("127.0.0.1:%d", bustest.FreePorts(t, 1)[0])
	trtest.Start(t, "worker", "--nats-url", nc.URLs(), "--store-url", pg, "--replicas", "3", "--debug-addr", addr)
	resp, err := http.Get("http://" + addr + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		t.Fatalf("the worker's --debug-addr: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("the worker's /debug/pprof/goroutine answered %d", resp.StatusCode)
	}
}
