package e2e_test

import (
	"math/rand/v2"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// TestRollingRestart restarts a scaled-out deployment (two gateways, two
// workers, one NATS and store) one process at a time with SIGTERM, under
// trtest.SoakRestarts' load. A stopped gateway is taken out of rotation
// once its /readyz answers 503, which it does at once, and closes its
// sockets with 1001 after its drain; its clients resume on the other. A
// stopped worker ends its running turns interrupted, text saved, within its
// --shutdown-timeout; its queued jobs go to the other worker. No turn is
// left unfinished, doubled or gapped at any client.
func TestRollingRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("restart soak skipped in -short mode")
	}
	_, natsURL, storeURL := trtest.ScaleOutDeps(t)
	common := []string{"--nats-url", natsURL, "--store-url", storeURL}
	var procs trtest.Procs // every process started, for the logs
	wk := make([]*trtest.Proc, 2)
	for i := range wk {
		wk[i] = procs.Add(trtest.Start(t, append([]string{"worker", "--shutdown-timeout", "5s"}, common...)...))
	}
	gw := make([]*trtest.Proc, 2)
	var urls []string
	for i := range gw {
		gw[i] = procs.Add(trtest.Start(t, append([]string{"gateway", "--addr", "127.0.0.1:0", "--shutdown-drain", "500ms",
			"--limit-sends", "0", "--limit-connections", "0", "--limit-turns", "0"}, common...)...))
		gw[i].WaitReady(t)
		urls = append(urls, gw[i].URL)
	}
	lb := trtest.NewBalancer(urls...)
	trtest.SoakRestarts(t, trtest.SoakRig{
		Pick:     lb.Pick,
		Restarts: 8, // each process twice: gateway 0, worker 0, gateway 1, worker 1, …
		Restart: func(t *testing.T, k int, rng *rand.Rand) {
			time.Sleep(time.Duration(200+rng.IntN(800)) * time.Millisecond) // a random point of the load
			if i := k / 2 % 2; k%2 == 0 {
				gw[i] = procs.Add(lb.Restart(t, i, gw[i]))
			} else {
				wk[i] = procs.RestartWorker(t, i, wk[i])
			}
		},
		Logs: procs.Logs,
	})
}
