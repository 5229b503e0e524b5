package gateway

import (
	"fmt"
	"testing"
	"time"
)

// TestUserLimitsForgetIdleUsers: users who only sent (over HTTP, or on a
// connection since closed) are forgotten once their send budget is full
// again; a user with an open connection or a spent budget is kept.
func TestUserLimitsForgetIdleUsers(t *testing.T) {
	now := time.Unix(1000, 0)
	u := newUserLimits(Limits{SendsPerMinute: 60, SendBurst: 2, Connections: 5})
	u.now = func() time.Time { return now }
	for i := range 1000 {
		if _, ok, _ := u.allowSend(fmt.Sprintf("http-%d", i)); !ok {
			t.Fatalf("first send of user %d refused", i)
		}
	}
	if !u.openConn("online") {
		t.Fatal("connection refused")
	}
	now = now.Add(limitsSweepEvery)
	// Spends its budget now: kept until it refills.
	for range 2 {
		u.allowSend("busy")
	}
	u.mu.Lock()
	n, online, busy := len(u.users), u.users["online"] != nil, u.users["busy"] != nil
	u.mu.Unlock()
	if n != 2 || !online || !busy {
		t.Fatalf("after a sweep %d users are kept (online %v, busy %v), want only the online and busy ones", n, online, busy)
	}
	// Limits off: nothing is kept for a send.
	off := newUserLimits(Limits{})
	off.allowSend("someone")
	if len(off.users) != 0 {
		t.Fatalf("with no send limit %d users are kept", len(off.users))
	}
}

// TestUserLimitsNewConversations: a burst of the limit, then one every
// minute / limit, for each user apart; a user whose budget is spent is
// kept until it refills.
func TestUserLimitsNewConversations(t *testing.T) {
	now := time.Unix(1000, 0)
	u := newUserLimits(Limits{NewConversations: 3})
	u.now = func() time.Time { return now }
	for i := range 3 {
		if _, ok, _ := u.allowClaim("alice"); !ok {
			t.Fatalf("new conversation %d refused", i+1)
		}
	}
	wait, ok, _ := u.allowClaim("alice")
	if ok || wait != 20*time.Second {
		t.Fatalf("the fourth: ok %v, wait %v; want refused, 20s", ok, wait)
	}
	if _, ok, _ := u.allowClaim("bob"); !ok {
		t.Fatal("another user refused")
	}
	now = now.Add(limitsSweepEvery / 4)
	if _, ok, _ := u.allowClaim("alice"); ok {
		t.Fatal("allowed before its time")
	}
	u.swept = time.Time{}
	u.sweepLocked(now)
	if u.users["alice"] == nil {
		t.Fatal("a user with a spent budget was forgotten")
	}
	now = now.Add(5 * time.Second)
	if _, ok, _ := u.allowClaim("alice"); !ok {
		t.Fatal("refused once a new conversation's time has passed")
	}
	off := newUserLimits(Limits{})
	if _, ok, _ := off.allowClaim("someone"); !ok || len(off.users) != 0 {
		t.Fatalf("with no limit: ok %v, %d users kept", ok, len(off.users))
	}
}
