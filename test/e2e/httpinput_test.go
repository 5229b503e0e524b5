package e2e_test

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

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
