package e2e_test

import (
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// TestRestartsUnderLoad runs trtest.SoakRestarts while serve is stopped at random
// points, by SIGKILL and SIGTERM in turn, and started again on the same
// data dir and port. No turn of a stopped server is left running once the
// new one is ready.
func TestRestartsUnderLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("restart soak skipped in -short mode")
	}
	p := trtest.Serve(t, "--limit-sends", "0", "--limit-connections", "0", "--limit-turns", "0")
	var mu sync.Mutex
	srv := func() *trtest.Proc { mu.Lock(); defer mu.Unlock(); return p }
	trtest.SoakRestarts(t, trtest.SoakRig{
		Pick:     func() string { return srv().URL }, // the same after every restart
		Restarts: 8,
		Logs:     func() string { return srv().Stderr() },
		Restart: func(t *testing.T, k int, rng *rand.Rand) {
			time.Sleep(time.Duration(100+rng.IntN(1500)) * time.Millisecond) // a random point of the load
			old := srv()
			stoppedAt := time.Now()
			if k%2 == 0 {
				old.Kill()
			} else if err := old.Stop(); err != nil {
				t.Fatalf("restart %d: exit after SIGTERM: %v\n%s", k, err, old.Stderr())
			}
			q := old.Restart(t)
			mu.Lock()
			p = q
			mu.Unlock()
			// The previous run's turns were ended at its stop or at this start.
			for ci := range trtest.SoakConvs {
				ms, err := trtest.StoredMessages(q.URL, fmt.Sprintf("restart-%d", ci))
				if err != nil {
					t.Fatal(err)
				}
				for _, m := range ms {
					created, _ := time.Parse(time.RFC3339Nano, m.CreatedAt)
					if m.Running() && created.Before(stoppedAt) {
						t.Fatalf("restart %d: turn %s of the stopped server is still %s", k, m.MessageID, m.Status)
					}
				}
			}
		},
	})
}
