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
func (b *HourlyBudget) Allow(user string) (bool, string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.rollLocked()
	if b.spent[user] >= b.limit {
		return false, b.refusal()
	}
	return true, ""
}

// Take implements TokenBudget.
func (b *HourlyBudget) Take(user string, c *Charge) (bool, string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.rollLocked()
	if b.spent[user] >= b.limit {
		return false, b.refusal()
	}
	b.spent[user]++
	c.add(b.hour, 1)
	return true, ""
}

func (b *HourlyBudget) refusal() string {
	return "your model token budget of " + strconv.Itoa(b.limit) + " tokens per hour is used up; try again later"
}

// Settle implements TokenBudget. Tokens used past what c holds are charged
// to the current hour; tokens c holds past used are given back from the
// current hour only as far as c took them in it: what a turn took before
// the hour turned was charged to an hour that is over, and giving it back
// now would lower the spend of the user's other turns of this one.
func (b *HourlyBudget) Settle(user string, c *Charge, used int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.rollLocked()
	n := used - c.tokens
	if n < 0 {
		mine := 0 // what c took in this hour
		if c.period == b.hour {
			mine = c.inPeriod
		}
		n = max(n, -mine)
	}
	c.add(b.hour, n)
	if spent := b.spent[user] + n; spent > 0 {
		b.spent[user] = spent
	} else {
		delete(b.spent, user)
	}
}

// Charge is what a TokenBudget has charged one turn; the zero Charge is
// nothing. Only the budget that made it reads or changes it.
type Charge struct {
	tokens   int   // in all
	period   int64 // the budget's period (an hour) of the latest charge
	inPeriod int   // charged in that period
}

// Tokens is how many tokens c holds.
func (c *Charge) Tokens() int { return c.tokens }

// add charges n tokens (given back when negative) in period.
func (c *Charge) add(period int64, n int) {
	if c.period != period {
		c.period, c.inPeriod = period, 0
	}
	c.tokens += n
	c.inPeriod += n
}
