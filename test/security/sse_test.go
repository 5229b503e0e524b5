package security_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// openSSE opens the SSE stream of turn with token and returns the response
// (its body unread) and a function that closes it.
func openSSE(t *testing.T, p *trtest.Proc, turn, token string) (*http.Response, func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, err := http.NewRequestWithContext(ctx, "GET", p.URL+"/v1/turns/"+turn+"/events", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	closed := func() { cancel(); resp.Body.Close() }
	t.Cleanup(closed)
	return resp, closed
}

// longTurn starts, for the user of token, a turn in conv that runs for
// minutes, and returns its id.
func longTurn(t *testing.T, p *trtest.Proc, token, conv string) string {
	t.Helper()
	c := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: token})
	c.Join(conv, nil)
	return startTurn(t, c, conv, "[sim tokens=100000 rate=20] a long one").ID
}

// An SSE stream is a connection: it counts against --limit-connections
// with the user's WebSockets, and the one past the limit is refused with
// 429 rate_limited until another is closed.
func TestSSECountsAgainstTheConnectionLimit(t *testing.T) {
	t.Parallel()
	p := serveJWT(t, "--limit-connections", "2")
	tok := tokenFor(t, "alice")
	turn := longTurn(t, p, tok, "streams")

	first, closeFirst := openSSE(t, p, turn, tok)
	if first.StatusCode != http.StatusOK {
		t.Fatalf("the second connection: %d, want 200", first.StatusCode)
	}
	code, e := httpErr(t, "GET", p.URL+"/v1/turns/"+turn+"/events", tok, "")
	if code != http.StatusTooManyRequests || e.Error.Code != "rate_limited" || e.Error.RetryAfterMS <= 0 {
		t.Fatalf("the third connection: %d %+v, want 429 rate_limited with retry_after_ms", code, e)
	}
	// Bob's streams are his own.
	bob := tokenFor(t, "bob")
	if resp, _ := openSSE(t, p, longTurn(t, p, bob, "bob-streams"), bob); resp.StatusCode != http.StatusOK {
		t.Fatalf("bob's stream: %d, want 200", resp.StatusCode)
	}
	// Closing the first frees its place, once the server has seen it go.
	closeFirst()
	deadline := time.Now().Add(wait)
	for {
		resp, closeIt := openSSE(t, p, turn, tok)
		if resp.StatusCode == http.StatusOK {
			break
		}
		closeIt()
		if time.Now().After(deadline) {
			t.Fatalf("a stream after one was closed: %d", resp.StatusCode)
		}
	}
}

// An SSE stream does not outlive its token, as a socket does not: it ends
// when the token's exp (plus the 30 s leeway) passes, long before the turn
// does. The token here expired 28 s ago.
func TestTokenExpiresOnOpenSSEStream(t *testing.T) {
	t.Parallel()
	p := serveJWT(t)
	tok := tokenFor(t, "alice")
	turn := longTurn(t, p, tok, "expiring-sse")
	now := time.Now()
	claims := jwt.MapClaims{"sub": "alice", "iat": now.Add(-time.Hour).Unix(), "exp": now.Add(-28 * time.Second).Unix()}
	resp, _ := openSSE(t, p, turn, sign(t, jwt.SigningMethodHS256, []byte(secret), claims))
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("stream: %d, want 200", resp.StatusCode)
	}
	ended := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(resp.Body)
		last := ""
		for sc.Scan() {
			if len(sc.Text()) > 0 {
				last = sc.Text()
			}
		}
		ended <- last
	}()
	select {
	case last := <-ended:
		var d struct{ Status string }
		if len(last) > 6 && json.Unmarshal([]byte(last[6:]), &d) == nil && d.Status != "" {
			t.Fatalf("the stream ended with the turn (%s), not with its token", last)
		}
	case <-time.After(wait):
		t.Fatal("the stream outlived its token")
	}
	waitMetric(t, p.URL, "tokenrelay_auth_failures_total", `reason="expired"`, 1)
}

// --limit-requests bounds a user's HTTP requests in flight, SSE streams
// included, on the native and the compat paths: each holds its answer in
// memory while it is written. Other users are not affected, and a request
// ended frees its place.
func TestRequestsInFlightAreLimited(t *testing.T) {
	t.Parallel()
	p := serveJWT(t, "--limit-requests", "2")
	tok := tokenFor(t, "alice")
	turn := longTurn(t, p, tok, "inflight")
	var closers []func()
	for range 2 {
		resp, closeIt := openSSE(t, p, turn, tok)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("a stream within the limit: %d", resp.StatusCode)
		}
		closers = append(closers, closeIt)
	}
	code, e := httpErr(t, "GET", p.URL+"/v1/conversations", tok, "")
	if code != http.StatusTooManyRequests || e.Error.Code != "rate_limited" || e.Error.RetryAfterMS <= 0 {
		t.Fatalf("a third request: %d %+v, want 429 rate_limited with retry_after_ms", code, e)
	}
	if code, _, body := do(t, "GET", p.URL+"/api/history/inflight", tok, "", nil); code != http.StatusTooManyRequests {
		t.Fatalf("a third request on the compat path: %d %s", code, body)
	}
	if code, _, body := do(t, "GET", p.URL+"/v1/conversations", tokenFor(t, "bob"), "", nil); code != http.StatusOK {
		t.Fatalf("bob's request: %d %s", code, body)
	}
	closers[0]()
	deadline := time.Now().Add(wait)
	for {
		code, _, body := do(t, "GET", p.URL+"/v1/conversations", tok, "", nil)
		if code == http.StatusOK {
			break
		}
		if code != http.StatusTooManyRequests || time.Now().After(deadline) {
			t.Fatalf("a request after a stream ended: %d %s", code, body)
		}
	}
}

// An SSE stream whose token expires while a write to its client is blocked
// ends for its token, not as a slow consumer: the expiry cuts the write
// short (a deadline of now), which must not be counted as one that timed
// out on a client that stopped reading.
func TestTokenExpiringOnABlockedSSEWriteIsNoSlowConsumer(t *testing.T) {
	t.Parallel()
	p := serveJWT(t, "--write-timeout", "10m")
	tok := tokenFor(t, "alice")
	c := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: tok})
	c.Join("expiring-blocked", nil)
	turn := startTurn(t, c, "expiring-blocked", "[sim tokens=5000000 rate=0] flood").ID
	// It expires in about 3 s (the 30 s leeway included): long after the
	// stream's writes have filled the socket's buffers and blocked.
	now := time.Now()
	expiring := sign(t, jwt.SigningMethodHS256, []byte(secret),
		jwt.MapClaims{"sub": "alice", "iat": now.Add(-time.Hour).Unix(), "exp": now.Add(-27 * time.Second).Unix()})
	conn, err := net.Dial("tcp", strings.TrimPrefix(p.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	// A small receive buffer, and then no reads past the headers.
	if tc, ok := conn.(*net.TCPConn); ok {
		_ = tc.SetReadBuffer(4096)
	}
	fmt.Fprintf(conn, "GET /v1/turns/%s/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n", turn, expiring)
	status, err := bufio.NewReaderSize(conn, 16).ReadString('\n')
	if err != nil || !strings.Contains(status, " 200 ") {
		t.Fatalf("SSE request: %q %v", status, err)
	}
	trtest.WaitMetric(t, p.URL, "tokenrelay_sse_streams", "", wait, func(v float64) bool { return v == 1 })
	trtest.WaitMetric(t, p.URL, "tokenrelay_sse_streams", "", wait, func(v float64) bool { return v == 0 })
	waitMetric(t, p.URL, "tokenrelay_auth_failures_total", `reason="expired"`, 1)
	for _, m := range []string{slowCloses, "tokenrelay_write_errors_total"} {
		if n := trtest.Metric(t, p.URL, m, ""); n != 0 {
			t.Errorf("%s = %v after a stream ended for its token, want 0", m, n)
		}
	}
}
