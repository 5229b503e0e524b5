// Package security_test checks tokenrelay's security rules end to end
// against the real binary: JWT authentication, the dev-mode rule, per-user
// ownership, the Origin check and every limit of PROTOCOL.md, with their
// metrics (docs/security.md describes them).
package security_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/golang-jwt/jwt/v5"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// secret is the HS256 secret of the servers started with serveJWT.
const secret = "security-suite-hs256-secret-0123456789"

const wait = 20 * time.Second

// sign returns a token for claims signed with method and key.
func sign(t testing.TB, method jwt.SigningMethod, key any, claims jwt.MapClaims) string {
	t.Helper()
	s, err := jwt.NewWithClaims(method, claims).SignedString(key)
	if err != nil {
		t.Fatalf("sign token: %v", err)
	}
	return s
}

// claimsFor are valid claims for user: issued now, expiring in an hour.
func claimsFor(user string) jwt.MapClaims {
	now := time.Now()
	return jwt.MapClaims{"sub": user, "iat": now.Unix(), "exp": now.Add(time.Hour).Unix()}
}

// tokenFor is a valid HS256 token for user under secret.
func tokenFor(t testing.TB, user string) string {
	t.Helper()
	return sign(t, jwt.SigningMethodHS256, []byte(secret), claimsFor(user))
}

// serveJWT starts `tokenrelay serve` that requires HS256 tokens signed with
// secret (no dev mode).
func serveJWT(t testing.TB, args ...string) *trtest.Proc {
	t.Helper()
	return trtest.Serve(t, append([]string{"--jwt-secret", secret}, args...)...)
}

// closeCode dials wsURL with opts and returns the close code the server ends
// the connection with within d, or -1 if it stays open that long. A refused
// handshake fails the test.
func closeCode(t testing.TB, wsURL string, opts *trtest.DialOptions, d time.Duration) websocket.StatusCode {
	t.Helper()
	c := trtest.Dial(t, wsURL, opts)
	select {
	case <-c.Done():
		return c.CloseStatus()
	case <-time.After(d):
		_ = c.Conn.CloseNow()
		return -1
	}
}

// errorBody is the body of an HTTP error answer.
type errorBody struct {
	Error struct {
		Code         string `json:"code"`
		Message      string `json:"message"`
		RetryAfterMS int64  `json:"retry_after_ms"`
	} `json:"error"`
}

// do performs an HTTP request with an optional bearer token and raw body and
// returns the status, the headers and the body.
func do(t testing.TB, method, url, token string, body string, header http.Header) (int, http.Header, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	resp, err := http.DefaultClient.Do(req.WithContext(ctx))
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: read body: %v", method, url, err)
	}
	return resp.StatusCode, resp.Header, b
}

// httpErr performs a request and decodes its error body.
func httpErr(t testing.TB, method, url, token, body string) (int, errorBody) {
	t.Helper()
	code, _, b := do(t, method, url, token, body, nil)
	var e errorBody
	_ = json.Unmarshal(b, &e)
	return code, e
}

// waitMetric polls until metric name{labels} reaches at least want.
func waitMetric(t testing.TB, base, name, labels string, want float64) {
	t.Helper()
	trtest.WaitMetric(t, base, name, labels, wait, func(v float64) bool { return v >= want })
}

// reply waits for the ack or error answering the frame with id, skipping
// other frames.
func reply(t testing.TB, c *trtest.Client, id string) trtest.Frame {
	t.Helper()
	fs := c.Until(wait, func(f trtest.Frame) bool {
		return f.Str("id") == id && (f.Type() == "ack" || f.Type() == "error" || f.Type() == "joined" || f.Type() == "pong")
	})
	return fs[len(fs)-1]
}

// wantError checks that f is an error frame with code.
func wantError(t testing.TB, f trtest.Frame, code string) {
	t.Helper()
	if f.Type() != "error" || f.Str("code") != code {
		t.Fatalf("got %v, want an error %s", f, code)
	}
}

// startTurn sends text on c (joined to conv) and waits for the turn's start
// and its first delta.
func startTurn(t testing.TB, c *trtest.Client, conv, text string) *trtest.Turn {
	t.Helper()
	id := "start-" + conv
	c.Send(map[string]any{"type": "send", "conversation_id": conv, "text": text, "id": id})
	var tr *trtest.Turn
	c.Until(wait, func(f trtest.Frame) bool {
		if f.Type() == "error" && f.Str("id") == id {
			t.Fatalf("send in %s: %v", conv, f)
		}
		if f.Type() == "turn.start" && f.Str("conversation_id") == conv && tr == nil {
			tr = &trtest.Turn{ID: f.Str("turn_id")}
		}
		if tr != nil {
			tr.Apply(f)
		}
		return tr != nil && tr.Seq >= 1
	})
	return tr
}

// finish reads c's frames until tr ends.
func finish(t testing.TB, c *trtest.Client, tr *trtest.Turn) []trtest.Frame {
	t.Helper()
	fs := c.Until(wait, func(f trtest.Frame) bool {
		tr.Apply(f)
		return tr.Ends > 0
	})
	if len(tr.Errors) > 0 {
		t.Fatalf("delivery rule violations: %v", tr.Errors)
	}
	return fs
}

// rsaKey and ecKey make fresh key pairs and return the private key and the
// PEM of the public key.
func rsaKey(t testing.TB) (*rsa.PrivateKey, string) {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	return k, publicPEM(t, &k.PublicKey)
}

func ecKey(t testing.TB) (*ecdsa.PrivateKey, string) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k, publicPEM(t, &k.PublicKey)
}

func publicPEM(t testing.TB, pub any) string {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
}
