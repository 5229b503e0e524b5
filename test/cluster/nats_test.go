package cluster_test

import (
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// streams are tokenrelay's JetStream streams, KV buckets included.
var streams = []string{bus.EventsStream, bus.JobsStream, "KV_" + bus.TurnsBucket, "KV_" + bus.CancelBucket}

// waitStreamsCurrent waits until every stream has a leader and all its
// replicas are current, so that losing any one node keeps a quorum.
func waitStreamsCurrent(t testing.TB, c *natsCluster, nc *nats.Conn) {
	t.Helper()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "every stream replica current", func() bool {
		for _, name := range streams {
			s, err := js.Stream(t.Context(), name)
			if err != nil {
				return false
			}
			cl := s.CachedInfo().Cluster
			if cl == nil || cl.Leader == "" || len(cl.Replicas) != 2 {
				return false
			}
			for _, r := range cl.Replicas {
				if !r.Current || r.Offline {
					return false
				}
			}
		}
		return true
	})
}

// TestNATSNodeStoppedMidTurn stops NATS nodes under running turns. Streams
// and buckets are R3 and every process was given all three URLs.
//
// First the leader of the events stream stops while a turn streams to
// clients on both gateways: the worker's publish that got no answer is
// repeated (same Nats-Msg-Id) to the new leader, and the turn streams on to
// its end with no gap. The node comes back. Then a node carrying a worker's
// cancel watch stops, and turns on both workers are cancelled: the cancel
// signal reaches them at once, not when the watch has been recreated.
func TestNATSNodeStoppedMidTurn(t *testing.T) {
	c := startCluster(t, clusterOptions{})
	nc := c.nats.connect(t)
	for _, name := range streams {
		if r := c.nats.streamInfo(t, nc, name).Config.Replicas; r != 3 {
			t.Fatalf("%s has %d replicas, want 3 (--replicas 3)", name, r)
		}
	}
	a := trtest.Dial(t, c.gw[0].WSURL(), nil)
	b := trtest.Dial(t, c.gw[1].WSURL(), nil)
	t.Cleanup(func() {
		if t.Failed() {
			for i, g := range c.gw {
				t.Logf("gateway %d stderr:\n%s", i, g.Stderr())
			}
		}
	})
	const conv = "nats-node"
	a.Join(conv, nil)
	b.Join(conv, nil)
	send(a, conv, "t1", "keep talking [sim tokens=700 rate=100]")
	ta, tb := &trtest.Turn{ID: "t1"}, &trtest.Turn{ID: "t1"}
	// Past the ack wait (4s): had the stopped node led the job consumer and
	// the job's progress been lost with it, the job would go to the other
	// worker at once, which would end the live turn as interrupted.
	until(t, b, tb, 450)

	leader := c.nats.node(t, c.nats.streamInfo(t, nc, bus.EventsStream).Cluster.Leader)
	cons := jobConsumer(t, nc)
	c.nats.nodes[leader].Shutdown()
	t.Logf("stopped NATS node n%d, leader of %s (the job consumer's leader is %s), at seq %d",
		leader+1, bus.EventsStream, cons.CachedInfo().Cluster.Leader, tb.Seq)
	// The longest silence a client sees is the failover's cost.
	var stall time.Duration
	last := time.Now()
	follow(t, b, tb, func() bool {
		stall = max(stall, time.Since(last))
		last = time.Now()
		return tb.Ends > 0
	})
	finish(t, a, ta)
	t.Logf("longest pause between frames after the node stopped: %v", stall.Round(time.Millisecond))
	m := storedTurn(t, c.gw[1].URL, conv, "t1")
	if ta.Status != "complete" || tb.Status != "complete" || m.Status != "complete" {
		t.Fatalf("after the node stopped the turn ended %s / %s, stored %s", ta.Status, tb.Status, m.Status)
	}
	if ta.Text.String() != m.Content || tb.Text.String() != m.Content || ta.Seq != 700 {
		t.Fatalf("streamed %d and %d bytes up to seq %d, stored %d", len(ta.Text.String()), len(tb.Text.String()), ta.Seq, len(m.Content))
	}
	send(b, conv, "t2", "more [sim tokens=30 rate=0]")
	t2 := &trtest.Turn{ID: "t2"}
	finish(t, a, t2)
	if t2.Status != "complete" {
		t.Fatalf("turn on two nodes ended %s", t2.Status)
	}

	c.nats.restart(t, leader)
	waitStreamsCurrent(t, c.nats, nc)
	fl, _ := spread(t, c, "nats-cancel", "long [sim tokens=3000 rate=100]")
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	st, err := js.Stream(t.Context(), "KV_"+bus.CancelBucket)
	if err != nil {
		t.Fatal(err)
	}
	var hosts []string
	for ci := range st.ListConsumers(t.Context()).Info() {
		hosts = append(hosts, ci.Cluster.Leader)
	}
	if len(hosts) == 0 {
		t.Fatal("no cancel watch consumer")
	}
	// Prefer a node that does not lead the events stream, so that the end
	// events are not also delayed by a failover.
	victim := c.nats.node(t, hosts[0])
	events := c.nats.streamInfo(t, nc, bus.EventsStream).Cluster.Leader
	for _, h := range hosts {
		if h != events {
			victim = c.nats.node(t, h)
		}
	}
	c.nats.nodes[victim].Shutdown()
	t.Logf("stopped NATS node n%d, carrying cancel watches of %v", victim+1, hosts)
	for i, f := range fl {
		// Cancel on the other gateway from the one streaming the turn.
		cl := trtest.Dial(t, c.gw[(i+1)%len(c.gw)].WSURL(), nil)
		sent := time.Now()
		cl.Send(map[string]any{"type": "cancel", "turn_id": f.tr.ID, "id": "c"})
		fs := cl.Until(wait, func(fr trtest.Frame) bool { return fr.Str("id") == "c" })
		took := time.Since(sent)
		if ack := fs[len(fs)-1]; ack.Type() != "ack" || ack.Str("status") != "cancelled" {
			t.Fatalf("cancel of %s answered %v", f.tr.ID, ack)
		}
		finish(t, f.c, f.tr)
		if f.tr.Status != "cancelled" {
			t.Fatalf("%s ended %s", f.tr.ID, f.tr.Status)
		}
		t.Logf("cancel of %s answered in %v", f.tr.ID, took.Round(time.Millisecond))
		if took > 2*time.Second {
			t.Fatalf("cancel of %s took %v after a NATS node stopped", f.tr.ID, took)
		}
	}
}

// TestJobConsumerLeaderStopped stops the NATS node leading the job consumer
// while both workers wait for jobs. Their waiting pull requests die with it:
// the node's goodbye makes them pull again at once, and should it never
// arrive, a missed heartbeat does within 2 s (bus.jobPullHeartbeat). Every
// worker must be pulling from the new leader within 10 s, and both then
// take turns.
func TestJobConsumerLeaderStopped(t *testing.T) {
	c := startCluster(t, clusterOptions{})
	nc := c.nats.connect(t)
	waitStreamsCurrent(t, c.nats, nc)
	waitWorkersPulling(t, c)
	leader := c.nats.node(t, jobConsumer(t, nc).CachedInfo().Cluster.Leader)
	c.nats.nodes[leader].Shutdown()
	stopped := time.Now()
	waitWorkersPulling(t, c)
	t.Logf("stopped NATS node n%d, leader of the job consumer; every worker pulled again after %v",
		leader+1, time.Since(stopped).Round(time.Millisecond))
	fl, running := spread(t, c, "consumer-leader", "speak [sim tokens=1200 rate=100]")
	t.Logf("turns running on the workers: %v", running)
	for _, f := range fl {
		finish(t, f.c, f.tr)
		if f.tr.Status != "complete" {
			t.Fatalf("%s ended %s", f.tr.ID, f.tr.Status)
		}
	}
}
