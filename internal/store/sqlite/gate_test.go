package sqlite

import (
	"context"
	"errors"
	"testing"
)

// A writer waiting at the gate gives up when its context ends, and the
// gate opens again once its holder leaves.
func TestWriteGateGivesUp(t *testing.T) {
	g := newWriteGate()
	if err := g.enter(t.Context()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := g.enter(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("enter with the gate held and the context done: %v, want context.Canceled", err)
	}
	g.leave()
	if err := g.enter(t.Context()); err != nil {
		t.Fatalf("enter after leave: %v", err)
	}
}
