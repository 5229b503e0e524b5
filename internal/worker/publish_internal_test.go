package worker

import (
	"slices"
	"testing"
)

func TestDropFront(t *testing.T) {
	s := []int{1, 2, 3, 4}
	s = dropFront(s, 0)
	if !slices.Equal(s, []int{1, 2, 3, 4}) {
		t.Fatalf("dropFront(s, 0) = %v", s)
	}
	s = dropFront(s, 3)
	if !slices.Equal(s, []int{4}) || cap(s) != 4 {
		t.Fatalf("dropFront(s, 3) = %v (cap %d), want [4] with cap 4", s, cap(s))
	}
	if full := s[:4]; full[1] != 0 || full[3] != 0 {
		t.Fatalf("dropped elements not cleared: %v", full)
	}
	if s = dropFront(s, 1); len(s) != 0 || cap(s) != 4 {
		t.Fatalf("dropFront to empty: len %d cap %d, want 0 and 4", len(s), cap(s))
	}
}

// TestQueueFromTheFrontKeepsItsArray pins why the publisher's queues use
// dropFront: a delta appended and then taken from the front, over and over
// (a turn's acknowledged deltas), reuses the queue's backing array rather
// than creeping along it and growing a new one every few deltas.
func TestQueueFromTheFrontKeepsItsArray(t *testing.T) {
	q := make([]sent, 0, 4)
	first := &q[:1][0]
	for i := range 100 {
		q = append(q, sent{end: i})
		if &q[0] != first {
			t.Fatalf("delta %d: the queue no longer starts at its array's front", i)
		}
		q = dropFront(q, 1)
	}
}
