package worker_test

import (
	"sync"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/worker"
)

// clock is a settable clock for a budget.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = t
}

// left counts the tokens user may still take from b, taking them.
func left(b *worker.HourlyBudget, user string) int {
	var c worker.Charge
	for ok, _ := b.Take(user, &c); ok; ok, _ = b.Take(user, &c) {
	}
	return c.Tokens()
}

// A turn that streamed across the top of the hour and was charged more
// as it streamed than the provider counted gives back what it took in the
// new hour at most: not what it took in the hour before, which would
// lower the spend of the user's other turns of the new hour.
func TestBudgetCorrectionStaysInItsHour(t *testing.T) {
	c := &clock{now: time.Date(2026, 12, 7, 10, 59, 50, 0, time.UTC)}
	b := worker.NewHourlyBudget(100, c.Now)
	var a, other worker.Charge
	for range 60 { // turn A, before the hour
		if ok, _ := b.Take("u", &a); !ok {
			t.Fatal("refused within the budget")
		}
	}
	c.set(c.now.Add(20 * time.Second))
	for range 50 { // turn B, after it
		if ok, _ := b.Take("u", &other); !ok {
			t.Fatal("refused within the new hour's budget")
		}
	}
	// Turn A ends: the provider counted 20 tokens of the 60 it was charged.
	b.Settle("u", &a, 20)
	// Turn B ends: the provider counted 30 of its 50, all of this hour.
	b.Settle("u", &other, 30)
	if n := left(b, "u"); n != 70 {
		t.Fatalf("%d tokens left in the new hour, want 70: turn B's 30 are spent", n)
	}
}
