package gateway

import (
	"context"
	"testing"
	"time"
)

// The announce and enqueue of a stored turn keep the request's deadline,
// but at least the floor from now: a store that found a send stored after
// the deadline cut off its COMMIT (store.Send) answers after it, a slow one
// just before it, and the turn must still be announced and enqueued rather
// than ended for a broker that was never down.
func TestUncancelledAfterTheDeadline(t *testing.T) {
	parent, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	ctx, stop := uncancelled(parent, time.Minute)
	defer stop()
	if d, _ := ctx.Deadline(); d.After(time.Now().Add(time.Hour)) || d.Before(time.Now().Add(59*time.Minute)) {
		t.Fatalf("deadline %v, want the request's, an hour from now", d)
	}
	passed, cancel2 := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel2()
	ctx, stop = uncancelled(passed, time.Minute)
	defer stop()
	if ctx.Err() != nil {
		t.Fatalf("a passed deadline left the stored turn no time: %v", ctx.Err())
	}
	soon, cancel3 := context.WithTimeout(context.Background(), time.Millisecond)
	defer cancel3()
	ctx, stop = uncancelled(soon, time.Minute)
	defer stop()
	if d, _ := ctx.Deadline(); d.Before(time.Now().Add(50 * time.Second)) {
		t.Fatalf("a deadline a millisecond away left the stored turn until %v, want a minute", d)
	}
}
