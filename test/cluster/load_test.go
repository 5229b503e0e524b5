package cluster_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// load is one run of many conversations at once, each sending turns one
// after the other through one gateway while a second tab watches through
// the other gateway.
type load struct {
	convs, turns, tokens int
	rate                 int // tokens per second per turn; 0 = as fast as possible
}

// loadResult is what a load run measured.
type loadResult struct {
	turns     int
	deltas    int64 // deltas applied by the senders' clients
	elapsed   time.Duration
	latency   []time.Duration // producer-to-client delay of deltas, when stamped
	cpu       map[string]time.Duration
	perWorker []float64
}

// TestEveryTurnOnExactlyOneWorker runs many turns through both gateways at
// once: each runs on exactly one of the two workers (the model is asked
// once per turn, summed over both), and both tabs of each conversation get
// every turn whole.
func TestEveryTurnOnExactlyOneWorker(t *testing.T) {
	c := startCluster(t, clusterOptions{})
	r := runLoad(t, c, load{convs: 16, turns: 8, tokens: 50})
	reqs := sumMetric(t, c.wk, "tokenrelay_provider_requests_total")
	done := sumMetric(t, c.wk, `tokenrelay_turns_total{status="complete"}`)
	if int(reqs) != r.turns || int(done) != r.turns {
		t.Fatalf("%d turns ran; the workers made %v model requests and completed %v turns", r.turns, reqs, done)
	}
	t.Logf("%d turns split %v between the workers; %.0f turns/s, %.0f deltas/s", r.turns, r.perWorker,
		float64(r.turns)/r.elapsed.Seconds(), float64(r.deltas)/r.elapsed.Seconds())
}

// TestClusterLoad measures the cluster for docs/operations.md. It runs only
// when TOKENRELAY_CLUSTER_LOAD is set: to "1" for the standard scenarios, or
// to convs,turns,tokens,rate for one of your own.
func TestClusterLoad(t *testing.T) {
	spec := os.Getenv("TOKENRELAY_CLUSTER_LOAD")
	if spec == "" {
		t.Skip("set TOKENRELAY_CLUSTER_LOAD=1 to measure the cluster")
	}
	scenarios := []load{
		{convs: 50, turns: 10, tokens: 100},           // turn throughput
		{convs: 200, turns: 1, tokens: 300, rate: 30}, // many readers at model speed
		{convs: 500, turns: 1, tokens: 300, rate: 30},
	}
	if spec != "1" {
		var n [4]int
		for i, f := range strings.Split(spec, ",") {
			if i < 4 {
				n[i], _ = strconv.Atoi(f)
			}
		}
		scenarios = []load{{convs: n[0], turns: n[1], tokens: n[2], rate: n[3]}}
	}
	c := startCluster(t, clusterOptions{gatewayArgs: []string{"--delta-timestamps"}, workerArgs: []string{"--delta-timestamps"}})
	for _, l := range scenarios {
		r := runLoad(t, c, l)
		slices.Sort(r.latency)
		q := func(p float64) time.Duration {
			if len(r.latency) == 0 {
				return 0
			}
			return r.latency[int(p*float64(len(r.latency)-1))].Round(100 * time.Microsecond)
		}
		t.Logf("%+v: %d turns in %v = %.1f turns/s, %.0f deltas/s to senders (×2 with watchers); delta latency p50 %v p99 %v max %v; CPU %v; split %v",
			l, r.turns, r.elapsed.Round(time.Millisecond), float64(r.turns)/r.elapsed.Seconds(), float64(r.deltas)/r.elapsed.Seconds(),
			q(0.5), q(0.99), q(1), r.cpu, r.perWorker)
	}
	// What a delta costs in the events stream, for sizing its storage.
	st := c.nats.streamInfo(t, c.nats.connect(t), bus.EventsStream).State
	t.Logf("%s holds %d events in %d bytes per replica: %d bytes per event", bus.EventsStream, st.Msgs, st.Bytes, st.Bytes/max(st.Msgs, 1))
}

// runLoad runs l on c and checks every turn: complete, whole, identical in
// both tabs, and equal to the stored message.
func runLoad(t *testing.T, c *cluster, l load) loadResult {
	t.Helper()
	before := make([]float64, len(c.wk))
	for i, w := range c.wk {
		before[i] = metric(t, w.URL, "tokenrelay_provider_requests_total")
	}
	cpu0 := cpuTimes(t, c)
	run := fmt.Sprintf("load%d-%d", l.convs, time.Now().UnixNano()%1e6)
	type tab struct {
		conv          string
		sender, watch *trtest.Client
	}
	tabs := make([]tab, l.convs)
	for i := range tabs {
		tabs[i].conv = fmt.Sprintf("%s-%d", run, i)
		tabs[i].sender = trtest.Dial(t, c.gw[i%2].WSURL(), nil)
		tabs[i].watch = trtest.Dial(t, c.gw[(i+1)%2].WSURL(), nil)
		tabs[i].sender.Join(tabs[i].conv, nil)
		tabs[i].watch.Join(tabs[i].conv, nil)
	}
	var (
		mu      sync.Mutex
		errs    []error
		latency []time.Duration
		deltas  int64
		texts   = map[string][2]string{} // turn → sender's, watcher's text
	)
	start := time.Now()
	var wg sync.WaitGroup
	for _, tb := range tabs {
		wg.Go(func() {
			for k := range l.turns {
				id := fmt.Sprintf("%s-%d", tb.conv, k)
				text := fmt.Sprintf("turn %d of %s [sim tokens=%d rate=%d]", k, tb.conv, l.tokens, l.rate)
				tr, lat, err := sendAndFollow(tb.sender, tb.conv, id, text)
				if err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
					return
				}
				tw := &trtest.Turn{ID: id}
				err = followTurn(tb.watch, tw, nil)
				mu.Lock()
				if err != nil {
					errs = append(errs, fmt.Errorf("watcher: %w", err))
				}
				latency = append(latency, lat...)
				deltas += tr.Seq
				texts[id] = [2]string{tr.Text.String(), tw.Text.String()}
				mu.Unlock()
				if err != nil {
					return
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if len(errs) > 0 {
		t.Fatalf("%d of %d conversations failed, first: %v", len(errs), l.convs, errs[0])
	}
	for _, tb := range tabs[:min(len(tabs), 4)] {
		m := storedTurn(t, c.gw[0].URL, tb.conv, tb.conv+"-0")
		if got := texts[tb.conv+"-0"]; got[0] != m.Content || got[1] != m.Content || m.Status != "complete" {
			t.Fatalf("%s: stored %s %d bytes; sender %d, watcher %d bytes", tb.conv, m.Status, len(m.Content), len(got[0]), len(got[1]))
		}
	}
	for id, tx := range texts {
		if tx[0] != tx[1] {
			t.Fatalf("%s: the two tabs differ", id)
		}
	}
	r := loadResult{turns: l.convs * l.turns, deltas: deltas, elapsed: elapsed, latency: latency, cpu: map[string]time.Duration{}}
	for i, w := range c.wk {
		r.perWorker = append(r.perWorker, metric(t, w.URL, "tokenrelay_provider_requests_total")-before[i])
	}
	for k, v := range cpuTimes(t, c) {
		r.cpu[k] = (v - cpu0[k]).Round(10 * time.Millisecond)
	}
	for _, tb := range tabs {
		_ = tb.sender.Conn.Close(websocket.StatusNormalClosure, "")
		_ = tb.watch.Conn.Close(websocket.StatusNormalClosure, "")
	}
	return r
}

// sendAndFollow sends a turn on c and follows it to its end. Safe to call
// from any goroutine (it never fails the test itself).
func sendAndFollow(c *trtest.Client, conv, id, text string) (*trtest.Turn, []time.Duration, error) {
	data, _ := json.Marshal(map[string]any{"type": "send", "conversation_id": conv, "text": text, "turn_id": id, "message_id": "m-" + id})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Conn.Write(ctx, websocket.MessageText, data); err != nil {
		return nil, nil, err
	}
	tr := &trtest.Turn{ID: id}
	var lat []time.Duration
	err := followTurn(c, tr, func(f trtest.Frame) {
		if ts := f.Int("ts"); ts > 0 && f.Type() == "turn.delta" {
			lat = append(lat, time.Since(time.UnixMicro(ts)))
		}
	})
	return tr, lat, err
}

// followTurn applies c's frames to tr until it ends complete.
func followTurn(c *trtest.Client, tr *trtest.Turn, each func(trtest.Frame)) error {
	deadline := time.Now().Add(2 * time.Minute)
	for tr.Ends == 0 {
		f, err := c.Next(time.Until(deadline))
		if err != nil {
			return fmt.Errorf("turn %s at seq %d: %w", tr.ID, tr.Seq, err)
		}
		if f.Type() == "error" {
			return fmt.Errorf("turn %s: %v", tr.ID, f)
		}
		if each != nil {
			each(f)
		}
		tr.Apply(f)
	}
	if len(tr.Errors) > 0 || tr.Status != "complete" {
		return fmt.Errorf("turn %s ended %s: %v", tr.ID, tr.Status, tr.Errors)
	}
	return nil
}

// cpuTimes reads the CPU time (user+system) used so far by the gateway and
// worker processes of c, found in /proc by their store URL, and by this
// test process (the three NATS nodes and every client).
func cpuTimes(t *testing.T, c *cluster) map[string]time.Duration {
	t.Helper()
	out := map[string]time.Duration{"nats+clients": procCPU("/proc/self")}
	pids, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range pids {
		b, err := os.ReadFile(p)
		if err != nil || !strings.Contains(string(b), c.store) {
			continue
		}
		args := strings.Split(string(b), "\x00")
		if len(args) < 2 || (args[1] != "gateway" && args[1] != "worker") {
			continue
		}
		out[args[1]+"s"] += procCPU(filepath.Dir(p))
	}
	return out
}

// procCPU is the user+system CPU time of the process at dir (/proc/<pid>).
func procCPU(dir string) time.Duration {
	st, err := os.ReadFile(filepath.Join(dir, "stat"))
	if err != nil {
		return 0
	}
	// Fields after the command name's closing parenthesis: utime is the
	// 12th, stime the 13th, in USER_HZ (100 on Linux) ticks.
	f := strings.Fields(string(st[strings.LastIndexByte(string(st), ')')+2:]))
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseFloat(f[11], 64)
	stt, _ := strconv.ParseFloat(f[12], 64)
	return time.Duration((ut + stt) / 100 * float64(time.Second))
}
