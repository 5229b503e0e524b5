package e2e_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// TestStoppedWorkerHandsBackUnstartedJobs: a worker stopped (SIGTERM) while
// it holds a job it has not started (here held by a long --start-grace)
// hands it back at once, so another worker produces the turn, rather than
// leaving it queued until --ack-wait (a minute here) passes.
func TestStoppedWorkerHandsBackUnstartedJobs(t *testing.T) {
	t.Parallel()
	_, natsURL, storeURL := trtest.ScaleOutDeps(t)
	common := []string{"--nats-url", natsURL, "--store-url", storeURL, "--ack-wait", "1m"}
	held := trtest.Start(t, append([]string{"worker", "--start-grace", "1m"}, common...)...)
	g := trtest.Start(t, append([]string{"gateway", "--addr", "127.0.0.1:0"}, common...)...)
	g.WaitReady(t)

	const conv = "handed-back"
	c := trtest.Dial(t, g.WSURL(), nil)
	c.Join(conv, nil)
	c.Send(map[string]any{"type": "send", "conversation_id": conv, "text": "[sim tokens=20 rate=0] hi", "id": "s"})
	acks := c.Until(wait, func(f trtest.Frame) bool { return f.Type() == "ack" || f.Type() == "error" })
	if f := acks[len(acks)-1]; f.Type() != "ack" {
		t.Fatalf("send: %v", f)
	}
	tr := &trtest.Turn{ID: acks[len(acks)-1].Str("turn_id")}
	for _, f := range acks {
		tr.Apply(f)
	}

	waitJobsTaken(t, natsURL, 1) // the worker holds the job

	trtest.Start(t, append([]string{"worker"}, common...)...)
	if err := held.Stop(); err != nil {
		t.Fatalf("worker exit after SIGTERM: %v\n%s", err, held.Stderr())
	}
	finish(t, c, tr)
	if tr.Status != "complete" || tr.Seq != 20 {
		t.Fatalf("turn ended %s at seq %d, want complete at 20", tr.Status, tr.Seq)
	}
}

// waitJobsTaken waits until the workers on natsURL hold n jobs and none
// waits in the queue.
func waitJobsTaken(t *testing.T, natsURL string, n int) {
	t.Helper()
	js := trtest.JetStream(t, natsURL)
	cons, err := js.Consumer(trtest.Ctx(t, wait), bus.JobsStream, bus.JobsConsumer)
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(wait); ; {
		info, err := cons.Info(trtest.Ctx(t, wait))
		if err != nil {
			t.Fatal(err)
		}
		if info.NumAckPending == n && info.NumPending == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the workers did not take %d jobs: %+v", n, info)
		}
		time.Sleep(10 * time.Millisecond) // polling
	}
}

// TestStoppedWorkerHandsBackBufferedJobs: a worker busy to its
// --worker-concurrency holds one job waiting for a free slot and, fetched
// ahead, more in its pull buffer. Stopped (SIGTERM), it hands them all
// back at once, so another worker produces those turns, rather than
// leaving the buffered ones queued until --ack-wait (a minute here)
// passes.
func TestStoppedWorkerHandsBackBufferedJobs(t *testing.T) {
	t.Parallel()
	_, natsURL, storeURL := trtest.ScaleOutDeps(t)
	common := []string{"--nats-url", natsURL, "--store-url", storeURL, "--ack-wait", "1m"}
	const slots = 4
	busy := trtest.Start(t, append([]string{"worker", "--worker-concurrency", fmt.Sprint(slots)}, common...)...)
	g := trtest.Start(t, append([]string{"gateway", "--addr", "127.0.0.1:0", "--limit-turns", "0"}, common...)...)
	g.WaitReady(t)

	c := trtest.Dial(t, g.WSURL(), nil)
	var running, queued []*trtest.Turn
	for i := range slots {
		conv := fmt.Sprintf("buffered-%d", i)
		c.Join(conv, nil)
		running = append(running, startTurn(t, c, conv, "[sim tokens=100000 rate=50] a busy one", 1))
	}
	for i := slots; i < slots+3; i++ {
		conv := fmt.Sprintf("buffered-%d", i)
		c.Join(conv, nil)
		c.Send(map[string]any{"type": "send", "conversation_id": conv, "text": "[sim tokens=20 rate=0] hi", "id": conv})
		acks := c.Until(wait, func(f trtest.Frame) bool { return f.Str("id") == conv })
		if f := acks[len(acks)-1]; f.Type() != "ack" {
			t.Fatalf("send: %v", f)
		}
		queued = append(queued, &trtest.Turn{ID: acks[len(acks)-1].Str("turn_id")})
	}
	// The busy worker holds all four: two running, one waiting for a
	// slot, one in its pull buffer.
	waitJobsTaken(t, natsURL, slots+3)

	if err := busy.Stop(); err != nil {
		t.Fatalf("worker exit after SIGTERM: %v\n%s", err, busy.Stderr())
	}
	trtest.Start(t, append([]string{"worker"}, common...)...)
	all := append(queued, running...)
	c.Until(wait, func(f trtest.Frame) bool {
		ended := true
		for _, tr := range all {
			tr.Apply(f)
			ended = ended && tr.Ends > 0
		}
		return ended
	})
	for _, tr := range queued {
		if tr.Status != "complete" || tr.Seq != 20 || len(tr.Errors) > 0 {
			t.Fatalf("turn %s ended %s at seq %d (%v), want complete at 20", tr.ID, tr.Status, tr.Seq, tr.Errors)
		}
	}
	for _, tr := range running {
		if tr.Status != "interrupted" {
			t.Fatalf("running turn %s ended %s, want interrupted", tr.ID, tr.Status)
		}
	}
}
