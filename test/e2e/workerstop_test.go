package e2e_test

import (
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

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

	// The worker holds the job.
	nc, err := nats.Connect(natsURL)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	cons, err := js.Consumer(trtest.Ctx(t, wait), bus.JobsStream, bus.JobsConsumer)
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(wait); ; {
		info, err := cons.Info(trtest.Ctx(t, wait))
		if err != nil {
			t.Fatal(err)
		}
		if info.NumAckPending == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the worker did not take the job: %+v", info)
		}
		time.Sleep(10 * time.Millisecond) // polling
	}

	trtest.Start(t, append([]string{"worker"}, common...)...)
	if err := held.Stop(); err != nil {
		t.Fatalf("worker exit after SIGTERM: %v\n%s", err, held.Stderr())
	}
	finish(t, c, tr)
	if tr.Status != "complete" || tr.Seq != 20 {
		t.Fatalf("turn ended %s at seq %d, want complete at 20", tr.Status, tr.Seq)
	}
}
