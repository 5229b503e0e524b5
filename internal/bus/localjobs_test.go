package bus_test

import (
	"context"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/bus"
)

// Under a Local a job goes from EnqueueJob to ConsumeJobs in the process,
// in order, carrying its turn, and the job stream never holds it.
func TestLocalJobsSkipTheStream(t *testing.T) {
	_, worker, gateway := localPair(t)
	jobs := consume(t, worker)
	for _, id := range []string{"t1", "t2", "t3"} {
		if err := gateway.EnqueueJob(t.Context(), bus.Job{TurnID: id, ConversationID: "c", Owner: "u"}); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range []string{"t1", "t2", "t3"} {
		jm := nextJob(t, jobs)
		if jm.TurnID != id || jm.Redelivered {
			t.Fatalf("job %+v, want %s on its first delivery", jm, id)
		}
		if _, fresh := jm.QueuedTurn(); !fresh {
			t.Fatalf("job %s does not carry its turn", id)
		}
		if err := jm.Ack(); err != nil {
			t.Fatal(err)
		}
	}
	msgs, last := streamState(t, gateway, bus.JobsStream)
	if msgs != 0 || last != 0 {
		t.Fatalf("the job stream stored %d jobs (last seq %d); want none", msgs, last)
	}
}

// A local job that its worker neither acks nor keeps in progress is given
// out again after the ack wait, marked redelivered, as the stream's
// consumer would; one kept in progress is not, however long it runs.
func TestLocalJobRedeliveredUnlessKept(t *testing.T) {
	_, worker, gateway := localPair(t)
	jobs := consume(t, worker)
	for _, id := range []string{"kept", "dropped"} {
		if err := gateway.EnqueueJob(t.Context(), bus.Job{TurnID: id, ConversationID: "c"}); err != nil {
			t.Fatal(err)
		}
	}
	kept := nextJob(t, jobs)
	if kept.TurnID != "kept" {
		t.Fatalf("first job %s, want kept", kept.TurnID)
	}
	stop := make(chan struct{})
	keeping := make(chan struct{})
	go func() {
		defer close(keeping)
		tick := time.NewTicker(worker.AckWait() / 4)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				_ = kept.InProgress()
			}
		}
	}()
	// "dropped" is given out three times, an ack wait apart: by the
	// third, "kept" has run for two ack waits.
	for i := range 3 {
		jm := nextJob(t, jobs)
		if jm.TurnID != "dropped" || jm.Redelivered != (i > 0) {
			t.Fatalf("delivery %d: job %s (redelivered %v), want dropped (redelivered %v)", i+1, jm.TurnID, jm.Redelivered, i > 0)
		}
		if _, fresh := jm.QueuedTurn(); fresh {
			t.Fatal("a job without its turn must be read from the store")
		}
	}
	close(stop)
	<-keeping
	if err := kept.Ack(); err != nil {
		t.Fatal(err)
	}
	if err := gateway.EnqueueJob(t.Context(), bus.Job{TurnID: "last", ConversationID: "c"}); err != nil {
		t.Fatal(err)
	}
	// The queue is in order: a redelivery of "kept" would come first.
	if jm := nextJob(t, jobs); jm.TurnID != "last" {
		t.Fatalf("job %s given out after it was kept in progress and acked; want last", jm.TurnID)
	}
}

// consume runs b's ConsumeJobs until the test ends and passes its jobs on.
func consume(t *testing.T, b *bus.Bus) <-chan *bus.JobMsg {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	jobs := make(chan *bus.JobMsg, 16)
	done := make(chan error, 1)
	go func() { done <- b.ConsumeJobs(ctx, 16, func(jm *bus.JobMsg) { jobs <- jm }) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("consume jobs: %v", err)
		}
	})
	return jobs
}

func nextJob(t *testing.T, jobs <-chan *bus.JobMsg) *bus.JobMsg {
	t.Helper()
	select {
	case jm := <-jobs:
		return jm
	case <-time.After(10 * time.Second):
		t.Fatal("no job given out")
		return nil
	}
}
