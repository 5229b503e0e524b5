package sqlite

import (
	"context"
	"errors"
	"runtime"
	"slices"
	"testing"

	"github.com/tokenrelay/tokenrelay/internal/store/sqlstore"
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

// A write with priority (a turn's end) passes the writes waiting without
// it; writes of the same kind keep their order.
func TestWriteGatePriority(t *testing.T) {
	g := newWriteGate()
	if err := g.enter(t.Context()); err != nil {
		t.Fatal(err)
	}
	order := make(chan string, 4)
	waiting := func(n int) {
		t.Helper()
		for {
			g.mu.Lock()
			k := len(g.priority) + len(g.others)
			g.mu.Unlock()
			if k == n {
				return
			}
			runtime.Gosched()
		}
	}
	for i, w := range []struct {
		name     string
		priority bool
	}{{"send 1", false}, {"end 1", true}, {"send 2", false}, {"end 2", true}} {
		ctx := t.Context()
		if w.priority {
			ctx = sqlstore.WithPriority(ctx)
		}
		go func() {
			if err := g.enter(ctx); err != nil {
				t.Error(err)
				return
			}
			order <- w.name
			g.leave()
		}()
		waiting(i + 1)
	}
	g.leave()
	var got []string
	for range 4 {
		got = append(got, <-order)
	}
	if want := []string{"end 1", "end 2", "send 1", "send 2"}; !slices.Equal(got, want) {
		t.Fatalf("let in %v, want %v", got, want)
	}
	if err := g.enter(t.Context()); err != nil {
		t.Fatal(err)
	}
	g.leave()
}
