package worker

import (
	"strconv"
	"sync"
	"time"
)

// HourlyBudget is a TokenBudget of a fixed number of model tokens per user
// per clock hour, kept in this worker's memory.
type HourlyBudget struct {
	limit int
	now   func() time.Time

	mu    sync.Mutex
	hour  int64          // guarded by mu
	spent map[string]int // guarded by mu
}

// NewHourlyBudget returns a budget of limit tokens per user per hour.
func NewHourlyBudget(limit int, now func() time.Time) *HourlyBudget {
	if now == nil {
		now = time.Now
	}
	return &HourlyBudget{limit: limit, now: now, spent: make(map[string]int)}
}

func (b *HourlyBudget) rollLocked() {
	if h := b.now().Unix() / 3600; h != b.hour {
		b.hour = h
		clear(b.spent)
	}
}

// Allow implements TokenBudget.
func (b *HourlyBudget) Allow(user string) (bool, string) { return b.take(user, 0) }

// Take implements TokenBudget.
func (b *HourlyBudget) Take(user string) (bool, string) { return b.take(user, 1) }

// take charges user n tokens, or none when the budget is already used up.
func (b *HourlyBudget) take(user string, n int) (bool, string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.rollLocked()
	if b.spent[user] >= b.limit {
		return false, b.refusal()
	}
	b.spent[user] += n
	return true, ""
}

func (b *HourlyBudget) refusal() string {
	return "your model token budget of " + strconv.Itoa(b.limit) + " tokens per hour is used up; try again later"
}

// Spend implements TokenBudget. The spend of an hour does not go below
// zero: tokens taken before the hour turned are given back to none.
func (b *HourlyBudget) Spend(user string, tokens int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.rollLocked()
	if n := b.spent[user] + tokens; n > 0 {
		b.spent[user] = n
	} else {
		delete(b.spent, user)
	}
}
