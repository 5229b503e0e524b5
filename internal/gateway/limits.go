package gateway

import (
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/tokenrelay/tokenrelay/internal/protocol"
)

// Limits are the per-user and per-connection limits of PROTOCOL.md; 0
// means unlimited.
type Limits struct {
	FrameBytes     int // inbound WebSocket frame (close 1009)
	TextBytes      int // text of one message (too_large)
	SendsPerMinute int // sends per minute per user, burst SendBurst
	SendBurst      int
	Connections    int // open connections per user (close 4009)
	Joins          int // conversations joined per connection
	Turns          int // turns running at once per user
	OutboundBytes  int // queued outbound bytes per connection (close 4008)
	BadFrames      int // bad frames per connection before close 1008
	Requests       int // HTTP requests in flight per user, SSE streams included (429)
	// NewConversations is how many conversations a user's joins (and
	// compatibility sockets) may create per minute, burst the same
	// (rate_limited). A send that creates one counts under SendsPerMinute.
	NewConversations int
}

// DefaultLimits are PROTOCOL.md's defaults.
func DefaultLimits() Limits {
	return Limits{FrameBytes: 65536, TextBytes: 32768, SendsPerMinute: 30, SendBurst: 10, Connections: 20,
		Joins: 16, Turns: 4, OutboundBytes: 1 << 20, BadFrames: 20, Requests: 32, NewConversations: 60}
}

// userLimits tracks per-user state: send rate, open connections and HTTP
// requests in flight.
type userLimits struct {
	l   Limits
	now func() time.Time

	mu    sync.Mutex
	users map[string]*userState // guarded by mu
	swept time.Time             // the last sweep; guarded by mu
}

// limitsSweepEvery is how often the users with nothing to remember (no
// connection, a full send budget) are forgotten: a user who only calls the
// HTTP API, or sends and leaves, would otherwise be kept for good.
const limitsSweepEvery = time.Minute

type userState struct {
	sends    *rate.Limiter
	claims   *rate.Limiter // conversations created by joins
	conns    int
	requests int // HTTP requests in flight
}

func newUserLimits(l Limits) *userLimits {
	return &userLimits{l: l, now: time.Now, users: make(map[string]*userState)}
}

// sweepLocked forgets, at most every limitsSweepEvery, the users whose
// state is the same as a new user's.
func (u *userLimits) sweepLocked(now time.Time) {
	if now.Sub(u.swept) < limitsSweepEvery {
		return
	}
	u.swept = now
	for user, st := range u.users {
		if st.idle(now) {
			delete(u.users, user)
		}
	}
}

// idle says whether st holds nothing a new user's state would not.
func (st *userState) idle(now time.Time) bool {
	return st.conns <= 0 && st.requests <= 0 && full(st.sends, now) && full(st.claims, now)
}

// full says whether l (nil when its limit is off) has its whole burst.
func full(l *rate.Limiter, now time.Time) bool {
	return l == nil || l.TokensAt(now) >= float64(l.Burst())
}

func (u *userLimits) stateLocked(user string) *userState {
	st := u.users[user]
	if st == nil {
		st = &userState{}
		st.sends = perMinute(u.l.SendsPerMinute, u.l.SendBurst)
		st.claims = perMinute(u.l.NewConversations, u.l.NewConversations)
		u.users[user] = st
	}
	return st
}

// perMinute is a limiter of n events a minute with the given burst (at
// least 1), or nil when n is 0 (unlimited).
func perMinute(n, burst int) *rate.Limiter {
	if n <= 0 {
		return nil
	}
	return rate.NewLimiter(rate.Limit(float64(n)/60), max(burst, 1))
}

// allowSend takes one send from user's budget, or says how long to wait.
// When it allows the send, refund gives the send back to the budget (a
// send that stored nothing new: a retry).
func (u *userLimits) allowSend(user string) (wait time.Duration, ok bool, refund func()) {
	return u.allow(user, u.l.SendsPerMinute, func(st *userState) *rate.Limiter { return st.sends })
}

// allowClaim takes one new conversation from user's budget, or says how
// long to wait. When it allows it, refund gives it back (nothing created).
func (u *userLimits) allowClaim(user string) (wait time.Duration, ok bool, refund func()) {
	return u.allow(user, u.l.NewConversations, func(st *userState) *rate.Limiter { return st.claims })
}

// allow takes one event from the budget of user's that pick names, whose
// limit is limit (0: unlimited, and nothing is kept for it), or says how
// long to wait; refund gives it back.
func (u *userLimits) allow(user string, limit int, pick func(*userState) *rate.Limiter) (wait time.Duration, ok bool, refund func()) {
	if limit <= 0 {
		return 0, true, func() {}
	}
	now := u.now()
	u.mu.Lock()
	defer u.mu.Unlock()
	u.sweepLocked(now)
	r := pick(u.stateLocked(user)).ReserveN(now, 1)
	if d := r.DelayFrom(now); d > 0 {
		r.CancelAt(now)
		return d, false, nil
	}
	// Cancel restores nothing once the reservation's time has passed, and
	// an allowed send's time is now: the refund cancels as of then. (The
	// limiter then counts the moments since as refilling the bucket again,
	// a send's store time of tokens at most.)
	return 0, true, func() { r.CancelAt(now) }
}

// openConn counts a new connection of user, refusing it past the limit;
// closeConn ends it.
func (u *userLimits) openConn(user string) bool {
	return u.take(user, u.l.Connections, func(st *userState) *int { return &st.conns })
}

func (u *userLimits) closeConn(user string) {
	u.give(user, func(st *userState) *int { return &st.conns })
}

// beginRequest counts an HTTP request of user in flight, refusing it past
// the limit; endRequest ends it. Each request holds its answer in memory
// while it is written (a history may be megabytes), so without a bound one
// user's concurrent requests could take the server's memory.
func (u *userLimits) beginRequest(user string) bool {
	return u.take(user, u.l.Requests, func(st *userState) *int { return &st.requests })
}

func (u *userLimits) endRequest(user string) {
	u.give(user, func(st *userState) *int { return &st.requests })
}

// take adds one to user's count that count picks, refusing past limit (0:
// unlimited); give takes it back, forgetting a user left with nothing.
func (u *userLimits) take(user string, limit int, count func(*userState) *int) bool {
	now := u.now()
	u.mu.Lock()
	defer u.mu.Unlock()
	u.sweepLocked(now)
	n := count(u.stateLocked(user))
	if limit > 0 && *n >= limit {
		return false
	}
	*n++
	return true
}

func (u *userLimits) give(user string, count func(*userState) *int) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if st := u.users[user]; st != nil {
		*count(st)--
		if st.idle(u.now()) {
			delete(u.users, user)
		}
	}
}

// tooManyRequests is the error of a request refused by beginRequest.
func (s *Server) tooManyRequests() *protocol.Error {
	s.m.limitHits.WithLabelValues("requests").Inc()
	return &protocol.Error{Code: protocol.CodeRateLimited, RetryAfterMS: time.Second.Milliseconds(),
		Message: "too many requests in flight (limit " + itoa(s.cfg.Limits.Requests) + "); wait for one to end"}
}
