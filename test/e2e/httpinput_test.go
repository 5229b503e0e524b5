package e2e_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// post sends body as it is to POST url and returns the answer's status and
// its error, if any.
func post(t *testing.T, url, body string) (int, string, string) {
	t.Helper()
	resp, err := http.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var e struct {
		Error struct{ Code, Message string }
	}
	_ = json.NewDecoder(resp.Body).Decode(&e)
	return resp.StatusCode, e.Error.Code, e.Error.Message
}

// TestPostedBodyIsNotCappedWhenTheTextIsNot: with --limit-text-bytes 0 (no
// limit) a POST takes a text of any size, as the limit's 0 says, rather
// than refusing a body past a size of its own; with a limit, a body too
// large to hold a text within it is refused with a message that names the
// limit.
func TestPostedBodyIsNotCappedWhenTheTextIsNot(t *testing.T) {
	p := trtest.Serve(t, "--limit-text-bytes", "0", "--sim-rate", "0", "--sim-tokens", "2")
	text := strings.Repeat("t", 3<<20)
	var posted struct {
		Message struct {
			Content string `json:"content"`
		} `json:"message"`
	}
	if code := trtest.Do(t, "POST", p.URL+"/v1/conversations/huge/messages", "", map[string]any{"text": text}, &posted); code != http.StatusAccepted || posted.Message.Content != text {
		t.Fatalf("POST of a 3 MiB text with --limit-text-bytes 0: %d, %d bytes stored", code, len(posted.Message.Content))
	}

	q := trtest.Serve(t, "--limit-text-bytes", "100")
	body := `{"text":"` + strings.Repeat(`\u0041`, 1000) + `"}`
	code, errCode, msg := post(t, q.URL+"/v1/conversations/over/messages", body)
	if code != http.StatusRequestEntityTooLarge || errCode != "too_large" || !strings.Contains(msg, "--limit-text-bytes") || !strings.Contains(msg, "100") {
		t.Fatalf("a 6 kB body with --limit-text-bytes 100: %d %s %q, want 413 too_large naming the limit", code, errCode, msg)
	}
}

// TestBadBodySaysWhatIsWrong: a POST body that is not the JSON object of a
// send is refused with 400 bad_request saying where it went wrong (the
// field of the wrong type, or where the JSON breaks), as a bad send frame
// is, and stores nothing.
func TestBadBodySaysWhatIsWrong(t *testing.T) {
	p := trtest.Serve(t)
	url := p.URL + "/v1/conversations/bad-body/messages"
	for _, tt := range []struct{ body, want string }{
		{`{"text":5}`, "field text has the wrong type"},
		{`{"text":"hi","message_id":7}`, "field message_id has the wrong type"},
		{`{"text":"hi","model":["m"]}`, "field model has the wrong type"},
		{`["hi"]`, "must be a JSON object"},
		{`"hi"`, "must be a JSON object"},
		{`{"text":"hi"`, "ends before its object does"},
		{`{"text":"hi",}`, "syntax error at offset"},
		{``, "the request body is empty"},
		{`{"text":"hi"} {}`, "one JSON object"},
	} {
		code, errCode, msg := post(t, url, tt.body)
		if code != http.StatusBadRequest || errCode != "bad_request" || !strings.Contains(msg, tt.want) {
			t.Errorf("POST %s: %d %s %q, want 400 bad_request with %q", tt.body, code, errCode, msg, tt.want)
		}
	}
	if code := trtest.Get(t, url, nil); code != http.StatusNotFound {
		t.Fatalf("history after bad bodies only: %d, want 404 (nothing stored)", code)
	}
}

// TestUnauthorizedNamesTheScheme: a 401 says how to authenticate, in the
// WWW-Authenticate header HTTP requires of it, on every API path that
// needs a token, the SSE stream's included.
func TestUnauthorizedNamesTheScheme(t *testing.T) {
	const secret = "s3cret-for-401"
	p := trtest.Serve(t, "--jwt-secret", secret)
	expired, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{"sub": "alice", "exp": time.Now().Add(-time.Hour).Unix()}).SignedString([]byte(secret))
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct{ method, path, token string }{
		{"GET", "/v1/conversations", ""},
		{"GET", "/v1/conversations/c/messages", "not-a-jwt"},
		{"POST", "/v1/conversations/c/messages", ""},
		{"DELETE", "/v1/conversations/c", expired},
		{"POST", "/v1/turns/t/cancel", ""},
		{"GET", "/v1/turns/t/events", expired},
	} {
		req, _ := http.NewRequest(tt.method, p.URL+tt.path, strings.NewReader(`{"text":"hi"}`))
		if tt.token != "" {
			req.Header.Set("Authorization", "Bearer "+tt.token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if got := resp.Header.Get("WWW-Authenticate"); resp.StatusCode != http.StatusUnauthorized || !strings.HasPrefix(got, "Bearer") {
			t.Errorf("%s %s: %d, WWW-Authenticate %q; want 401 with a Bearer challenge", tt.method, tt.path, resp.StatusCode, got)
		}
	}
}

// TestZeroTimeoutsAreTheDefaults: --read-timeout 0 and --idle-timeout 0
// mean their defaults for every HTTP connection, as they do for a
// request's body and a WebSocket's pings: a client that never finishes
// its headers, or keeps an idle connection, is closed rather than held
// for good.
func TestZeroTimeoutsAreTheDefaults(t *testing.T) {
	t.Parallel() // it waits out the default read timeout
	p := trtest.Serve(t, "--read-timeout", "0", "--idle-timeout", "0", "--ping-interval", "1s")
	addr := strings.TrimPrefix(p.URL, "http://")
	closed := func(what string, conn net.Conn) {
		t.Helper()
		_ = conn.SetReadDeadline(time.Now().Add(wait))
		if _, err := io.Copy(io.Discard, conn); err != nil {
			t.Fatalf("%s: not closed (%v)", what, err)
		}
	}
	// Headers never finished: closed after the default read timeout.
	half, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer half.Close()
	fmt.Fprintf(half, "GET /healthz HTTP/1.1\r\nHost: %s\r\n", addr)
	// Idle after one answer: closed after the idle timeout (2 pings).
	idle, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	fmt.Fprintf(idle, "GET /healthz HTTP/1.1\r\nHost: %s\r\n\r\n", addr)
	closed("a connection idle after its answer", idle)
	closed("a request whose headers never end", half)
}
