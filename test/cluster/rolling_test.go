package cluster_test

import (
	"math/rand/v2"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// TestClusterRollingRestart restarts every part of a scaled-out deployment
// in turn under trtest.SoakRestarts' load: each gateway (SIGTERM, out of
// rotation at its /readyz 503, drained), each worker (SIGTERM) and each
// node of the three-node NATS cluster (stopped, started again on its
// address and store, and caught up before the next restart, so that the R3
// streams keep a quorum). No turn is left unfinished, doubled or gapped at
// any client, and every message is stored once with one reply.
func TestClusterRollingRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("restart soak skipped in -short mode")
	}
	c := startCluster(t, clusterOptions{
		gatewayArgs: []string{"--shutdown-drain", "300ms"},
		workerArgs:  []string{"--shutdown-timeout", "5s"},
	})
	nc := c.nats.connect(t)
	waitStreamsCurrent(t, c.nats, nc)
	var procs trtest.Procs // every process started, for the logs
	for _, p := range append(append([]*trtest.Proc(nil), c.gw...), c.wk...) {
		procs.Add(p)
	}
	var urls []string
	for _, g := range c.gw {
		urls = append(urls, g.URL)
	}
	lb := trtest.NewBalancer(urls...)
	restartNATS := func(t *testing.T, i int) {
		c.nats.nodes[i].Shutdown()
		c.nats.restart(t, i)
		waitStreamsCurrent(t, c.nats, nc)
	}
	trtest.SoakRestarts(t, trtest.SoakRig{
		Pick: lb.Pick,
		// Gateway 0, worker 0, NATS node 1, gateway 1, worker 1, NATS
		// node 2, gateway 0, worker 0, NATS node 3.
		Restarts: 9,
		Restart: func(t *testing.T, k int, rng *rand.Rand) {
			time.Sleep(time.Duration(200+rng.IntN(800)) * time.Millisecond) // a random point of the load
			switch i := k / 3; k % 3 {
			case 0:
				c.gw[i%2] = procs.Add(lb.Restart(t, i%2, c.gw[i%2]))
			case 1:
				c.wk[i%2] = procs.RestartWorker(t, i%2, c.wk[i%2])
			case 2:
				restartNATS(t, i%3)
			}
			t.Logf("restart %d done", k)
		},
		Logs: procs.Logs,
	})
}
