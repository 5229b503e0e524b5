package gateway

import (
	"strings"
	"testing"
)

// The view's one-turn cache must always agree with its map: a turn
// replaced, forgotten or looked up under a copy of its id gives what the
// map holds.
func TestViewTurnCacheAgreesWithTheMap(t *testing.T) {
	v := &view{turns: make(map[string]*turnState)}
	a1, a2, b := &turnState{seq: 1}, &turnState{seq: 2}, &turnState{seq: 3}
	v.setTurnLocked("a", a1)
	if got := v.turnLocked("a"); got != a1 {
		t.Fatalf("turn a = %p, want %p", got, a1)
	}
	// The same id in other bytes, as another route's event carries it.
	if got := v.turnLocked(strings.Clone("a")); got != a1 {
		t.Fatalf("turn a by a copy of its id = %p, want %p", got, a1)
	}
	v.setTurnLocked("b", b)
	v.setTurnLocked("a", a2) // replaced (a join's ready)
	if got := v.turnLocked("a"); got != a2 {
		t.Fatalf("turn a after it was replaced = %p, want %p", got, a2)
	}
	if got := v.turnLocked("b"); got != b {
		t.Fatalf("turn b = %p, want %p", got, b)
	}
	v.dropTurnLocked("b")
	if got := v.turnLocked("b"); got != nil {
		t.Fatalf("turn b after it was forgotten = %p, want nil", got)
	}
	v.turnLocked("a")
	v.dropTurnLocked("a")
	if got := v.turnLocked("a"); got != nil {
		t.Fatalf("turn a after it was forgotten = %p, want nil", got)
	}
	if got := v.turnLocked("c"); got != nil {
		t.Fatalf("unknown turn c = %p, want nil", got)
	}
}
