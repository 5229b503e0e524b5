package e2e_test

import (
	"fmt"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// balancer picks a gateway round robin among those in rotation, as a load
// balancer whose health check is /readyz does.
type balancer struct {
	mu   sync.Mutex
	urls []string
	out  []bool // taken out of rotation by a failed health check
	next int
}

func (b *balancer) pick() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	for range b.urls {
		i := b.next % len(b.urls)
		b.next++
		if !b.out[i] {
			return b.urls[i]
		}
	}
	return b.urls[0] // none in rotation: the client retries
}

func (b *balancer) rotate(i int, in bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.out[i] = !in
}

// TestRollingRestart restarts a scaled-out deployment (two gateways, two
// workers, one NATS and store) one process at a time with SIGTERM, under
// soakRestarts' load. A stopped gateway is taken out of rotation once its
// /readyz answers 503, which it does at once, and closes its sockets with
// 1001 after its drain; its clients resume on the other. A stopped worker
// ends its running turns interrupted, text saved, within its
// --shutdown-timeout; its queued jobs go to the other worker. No turn is
// left unfinished, doubled or gapped at any client.
func TestRollingRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("restart soak skipped in -short mode")
	}
	_, natsURL, storeURL := trtest.ScaleOutDeps(t)
	common := []string{"--nats-url", natsURL, "--store-url", storeURL}
	var mu sync.Mutex
	var procs []*trtest.Proc // every process started, for the logs
	start := func(args ...string) *trtest.Proc {
		p := trtest.Start(t, args...)
		mu.Lock()
		procs = append(procs, p)
		mu.Unlock()
		return p
	}
	wk := make([]*trtest.Proc, 2)
	for i := range wk {
		wk[i] = start(append([]string{"worker", "--shutdown-timeout", "5s"}, common...)...)
	}
	gw := make([]*trtest.Proc, 2)
	lb := &balancer{out: make([]bool, len(gw))}
	for i := range gw {
		gw[i] = start(append([]string{"gateway", "--addr", "127.0.0.1:0", "--shutdown-drain", "500ms",
			"--limit-sends", "0", "--limit-connections", "0", "--limit-turns", "0"}, common...)...)
		gw[i].WaitReady(t)
		lb.urls = append(lb.urls, gw[i].URL)
	}
	restartGateway := func(t *testing.T, i int) {
		g := gw[i]
		g.Signal(syscall.SIGTERM)
		// The balancer's health check.
		for {
			code, failing, err := readyz(g.URL)
			if err != nil {
				t.Fatalf("gateway %d: /readyz after SIGTERM: %v before any 503", i, err)
			}
			if code == http.StatusServiceUnavailable && failing == "shutdown" {
				break
			}
			time.Sleep(5 * time.Millisecond) // polling
		}
		lb.rotate(i, false)
		<-g.Done()
		if err := g.ExitErr(); err != nil {
			t.Fatalf("gateway %d: exit after SIGTERM: %v\n%s", i, err, g.Stderr())
		}
		q := g.Restart(t) // on its address
		mu.Lock()
		procs = append(procs, q)
		mu.Unlock()
		gw[i] = q
		lb.rotate(i, true)
	}
	restartWorker := func(t *testing.T, i int) {
		w := wk[i]
		stopped := time.Now()
		if err := w.Stop(); err != nil {
			t.Fatalf("worker %d: exit after SIGTERM: %v\n%s", i, err, w.Stderr())
		}
		if strings.Contains(w.Stderr(), "leaving them to recovery") {
			t.Fatalf("worker %d: turns still ending at its --shutdown-timeout\n%s", i, w.Stderr())
		}
		t.Logf("worker %d stopped in %v", i, time.Since(stopped).Round(time.Millisecond))
		wk[i] = start(w.Args...)
	}
	soakRestarts(t, restartRig{
		pick:     lb.pick,
		restarts: 8, // each process twice: gateway 0, worker 0, gateway 1, worker 1, …
		restart: func(t *testing.T, k int, rng *rand.Rand) {
			time.Sleep(time.Duration(200+rng.IntN(800)) * time.Millisecond) // a random point of the load
			if i := k / 2 % 2; k%2 == 0 {
				restartGateway(t, i)
			} else {
				restartWorker(t, i)
			}
		},
		logs: func() string {
			mu.Lock()
			defer mu.Unlock()
			var b strings.Builder
			for _, p := range procs {
				fmt.Fprintf(&b, "== %v\n%s", p.Args[0], p.Stderr())
			}
			return b.String()
		},
	})
}
