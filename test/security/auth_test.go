package security_test

import (
	"context"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/golang-jwt/jwt/v5"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// accepted reports whether a WebSocket with opts is accepted (a ping is
// answered) and, if not, checks it is closed with 4001.
func accepted(t *testing.T, p *trtest.Proc, wsURL string, opts *trtest.DialOptions) bool {
	t.Helper()
	c := trtest.Dial(t, wsURL, opts)
	defer c.Conn.CloseNow()
	// The server may have closed already: a failed write is an answer too.
	_ = c.Conn.Write(trtest.Ctx(t, wait), websocket.MessageText, []byte(`{"type":"ping","id":"p"}`))
	f, err := c.Next(wait)
	if err == nil && f.Type() == "pong" {
		return true
	}
	if code := c.CloseStatus(); code != 4001 {
		t.Fatalf("rejected connection closed with %d (%v, %v), want 4001", code, f, err)
	}
	return false
}

// TestJWT checks HS256 tokens over WebSocket (close 4001) and HTTP (401):
// valid, expired, wrongly signed, alg=none, bad claims, clock skew, the
// access_token query parameter; counts the failures in
// tokenrelay_auth_failures_total; and greps the server's log for every
// token it was shown.
func TestJWT(t *testing.T) {
	t.Parallel()
	p := serveJWT(t, "--log-level", "debug", "--sim-rate", "0", "--sim-tokens", "5")
	now := time.Now()
	claims := func(m jwt.MapClaims) jwt.MapClaims {
		c := claimsFor("alice")
		for k, v := range m {
			if v == nil {
				delete(c, k)
			} else {
				c[k] = v
			}
		}
		return c
	}
	hs := func(m jwt.MapClaims) string { return sign(t, jwt.SigningMethodHS256, []byte(secret), claims(m)) }
	none := sign(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, claims(nil))
	// "none" with an empty signature, and with the real signature glued on.
	valid := hs(nil)
	noneWithSig := strings.Join(append(strings.Split(none, ".")[:2], strings.Split(valid, ".")[2]), ".")
	tests := []struct {
		name  string
		token string
		ok    bool
	}{
		{"valid", valid, true},
		{"no exp", hs(jwt.MapClaims{"exp": nil}), true},
		{"expired within the skew", hs(jwt.MapClaims{"exp": now.Add(-10 * time.Second).Unix()}), true},
		{"nbf within the skew", hs(jwt.MapClaims{"nbf": now.Add(10 * time.Second).Unix()}), true},
		{"no token", "", false},
		{"expired", hs(jwt.MapClaims{"exp": now.Add(-2 * time.Minute).Unix()}), false},
		{"not yet valid", hs(jwt.MapClaims{"nbf": now.Add(2 * time.Minute).Unix()}), false},
		{"issued in the future", hs(jwt.MapClaims{"iat": now.Add(2 * time.Minute).Unix()}), false},
		{"wrong secret", sign(t, jwt.SigningMethodHS256, []byte("another-secret-of-enough-length-000"), claims(nil)), false},
		{"HS512", sign(t, jwt.SigningMethodHS512, []byte(secret), claims(nil)), false},
		{"alg none", none, false},
		{"alg none with a signature", noneWithSig, false},
		{"tampered payload", tamper(t, valid, "mallory"), false},
		{"no sub", hs(jwt.MapClaims{"sub": nil}), false},
		{"sub with a slash", hs(jwt.MapClaims{"sub": "a/b"}), false},
		{"garbage", "not.a.jwt", false},
		{"oversized", hs(jwt.MapClaims{"pad": strings.Repeat("x", 9000)}), false},
	}
	failures := 0
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var opts *trtest.DialOptions
			if tt.token != "" {
				opts = &trtest.DialOptions{Token: tt.token}
			}
			if got := accepted(t, p, p.WSURL(), opts); got != tt.ok {
				t.Fatalf("WS accepted = %v, want %v", got, tt.ok)
			}
			code, e := httpErr(t, "GET", p.URL+"/v1/conversations", tt.token, "")
			if tt.ok && code != 200 || !tt.ok && (code != 401 || e.Error.Code != "unauthorized") {
				t.Fatalf("HTTP %d %+v, want ok=%v", code, e, tt.ok)
			}
			// SSE is behind the same check.
			if !tt.ok {
				if code, _ := httpErr(t, "GET", p.URL+"/v1/turns/some-turn/events", tt.token, ""); code != 401 {
					t.Fatalf("SSE %d, want 401", code)
				}
			}
		})
		if !tt.ok {
			failures += 3
		}
	}

	t.Run("access_token query parameter", func(t *testing.T) {
		tok := hs(nil)
		if !accepted(t, p, p.WSURL()+"?access_token="+url.QueryEscape(tok), nil) {
			t.Fatal("WS with ?access_token= was refused")
		}
		if code, _ := httpErr(t, "GET", p.URL+"/v1/conversations?access_token="+url.QueryEscape(tok), "", ""); code != 200 {
			t.Fatalf("HTTP with ?access_token=: %d", code)
		}
		bad := hs(jwt.MapClaims{"exp": now.Add(-time.Hour).Unix()})
		if accepted(t, p, p.WSURL()+"?access_token="+url.QueryEscape(bad), nil) {
			t.Fatal("expired ?access_token= accepted")
		}
		failures++
		// A header that is not Bearer is not silently replaced by the query.
		h := map[string][]string{"Authorization": {"Basic YWxpY2U6cHc="}}
		if accepted(t, p, p.WSURL()+"?access_token="+url.QueryEscape(tok), &trtest.DialOptions{Header: h}) {
			t.Fatal("Basic header with a valid ?access_token= accepted")
		}
		failures++
	})

	t.Run("identity is the sub claim", func(t *testing.T) {
		tok := tokenFor(t, "carol")
		c := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: tok})
		c.Join("carol-conv", nil)
		c.Send(map[string]any{"type": "send", "conversation_id": "carol-conv", "text": "secret-prompt-7f3a", "id": "s"})
		tr := &trtest.Turn{}
		c.Until(wait, func(f trtest.Frame) bool {
			if f.Type() == "turn.start" {
				tr.ID = f.Str("turn_id")
			}
			tr.Apply(f)
			return tr.Ends > 0
		})
		var list struct {
			Conversations []struct {
				ID string `json:"conversation_id"`
			} `json:"conversations"`
		}
		trtest.Do(t, "GET", p.URL+"/v1/conversations", tok, nil, &list)
		if len(list.Conversations) != 1 || list.Conversations[0].ID != "carol-conv" {
			t.Fatalf("carol's conversations: %+v", list)
		}
		trtest.Do(t, "GET", p.URL+"/v1/conversations", tokenFor(t, "dave"), nil, &list)
		if len(list.Conversations) != 0 {
			t.Fatalf("dave sees %+v", list)
		}
	})

	if got := trtest.Metric(t, p.URL, "tokenrelay_auth_failures_total", `reason="token"`); got != float64(failures) {
		t.Errorf("tokenrelay_auth_failures_total{reason=\"token\"} = %v, want %d", got, failures)
	}
	// Nothing the server logged quotes a token or a signature, nor the
	// message text.
	logs := p.Stderr()
	for _, tt := range tests {
		if tt.token == "" {
			continue
		}
		parts := strings.Split(tt.token, ".")
		for _, part := range parts {
			if len(part) > 16 && strings.Contains(logs, part) {
				t.Errorf("the server log holds part of the %q token", tt.name)
			}
		}
	}
	if strings.Contains(logs, "secret-prompt-7f3a") {
		t.Errorf("the server log holds message text")
	}
	if strings.Contains(logs, secret) {
		t.Errorf("the server log holds the JWT secret")
	}
}

// tamper replaces the sub of a signed token, keeping the signature.
func tamper(t *testing.T, token, sub string) string {
	t.Helper()
	parts := strings.Split(token, ".")
	claims := claimsFor(sub)
	forged := sign(t, jwt.SigningMethodHS256, []byte("x"), claims)
	return parts[0] + "." + strings.Split(forged, ".")[1] + "." + parts[2]
}

// TestIssuerAndAudience checks --jwt-issuer and --jwt-audience.
func TestIssuerAndAudience(t *testing.T) {
	t.Parallel()
	p := serveJWT(t, "--jwt-issuer", "https://idp.example", "--jwt-audience", "tokenrelay")
	tok := func(iss, aud any) string {
		c := claimsFor("alice")
		if iss != nil {
			c["iss"] = iss
		}
		if aud != nil {
			c["aud"] = aud
		}
		return sign(t, jwt.SigningMethodHS256, []byte(secret), c)
	}
	tests := []struct {
		name  string
		token string
		ok    bool
	}{
		{"right iss and aud", tok("https://idp.example", "tokenrelay"), true},
		{"aud list", tok("https://idp.example", []string{"other", "tokenrelay"}), true},
		{"wrong iss", tok("https://evil.example", "tokenrelay"), false},
		{"wrong aud", tok("https://idp.example", "other"), false},
		{"no iss", tok(nil, "tokenrelay"), false},
		{"no aud", tok("https://idp.example", nil), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := accepted(t, p, p.WSURL(), &trtest.DialOptions{Token: tt.token}); got != tt.ok {
				t.Fatalf("WS accepted = %v, want %v", got, tt.ok)
			}
			code, _ := httpErr(t, "GET", p.URL+"/v1/conversations", tt.token, "")
			if tt.ok != (code == 200) || !tt.ok && code != 401 {
				t.Fatalf("HTTP %d, want ok=%v", code, tt.ok)
			}
		})
	}
}

// TestPublicKeys checks RS256 and ES256 with --jwt-public-key (a file, or
// the PEM itself), and that no other algorithm or key is accepted — in
// particular not HS256 signed with the public key as the secret.
func TestPublicKeys(t *testing.T) {
	t.Parallel()
	rk, rpem := rsaKey(t)
	ek, epem := ecKey(t)
	otherRSA, _ := rsaKey(t)
	otherEC, _ := ecKey(t)
	file := filepath.Join(t.TempDir(), "rsa.pem")
	if err := os.WriteFile(file, []byte(rpem), 0o600); err != nil {
		t.Fatal(err)
	}
	c := claimsFor("alice")
	tests := []struct {
		name   string
		keyArg string
		tokens map[string]string // name → token
		ok     map[string]bool
	}{
		{
			name: "RS256 from a file", keyArg: file,
			tokens: map[string]string{
				"RS256":                  sign(t, jwt.SigningMethodRS256, rk, c),
				"RS256 other key":        sign(t, jwt.SigningMethodRS256, otherRSA, c),
				"RS512":                  sign(t, jwt.SigningMethodRS512, rk, c),
				"PS256":                  sign(t, jwt.SigningMethodPS256, rk, c),
				"HS256 with the PEM":     sign(t, jwt.SigningMethodHS256, []byte(rpem), c),
				"HS256 with the secret":  sign(t, jwt.SigningMethodHS256, []byte(secret), c),
				"none":                   sign(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, c),
				"ES256 (another family)": sign(t, jwt.SigningMethodES256, ek, c),
			},
			ok: map[string]bool{"RS256": true},
		},
		{
			name: "ES256 inline PEM", keyArg: epem,
			tokens: map[string]string{
				"ES256":              sign(t, jwt.SigningMethodES256, ek, c),
				"ES256 other key":    sign(t, jwt.SigningMethodES256, otherEC, c),
				"HS256 with the PEM": sign(t, jwt.SigningMethodHS256, []byte(epem), c),
				"RS256":              sign(t, jwt.SigningMethodRS256, rk, c),
				"none":               sign(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, c),
			},
			ok: map[string]bool{"ES256": true},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			p := trtest.Serve(t, "--jwt-public-key", tt.keyArg)
			for name, tok := range tt.tokens {
				if got := accepted(t, p, p.WSURL(), &trtest.DialOptions{Token: tok}); got != tt.ok[name] {
					t.Errorf("%s: WS accepted = %v, want %v", name, got, tt.ok[name])
				}
				code, _ := httpErr(t, "GET", p.URL+"/v1/conversations", tok, "")
				if tt.ok[name] != (code == 200) {
					t.Errorf("%s: HTTP %d", name, code)
				}
			}
			// No dev mode once a key is set, even on loopback.
			if accepted(t, p, p.WSURL(), nil) {
				t.Error("a connection without a token was accepted")
			}
		})
	}
}

// TestDevModeRule checks the dev-mode rule of PROTOCOL.md: on by default
// on loopback without a key; off as soon as a key is set; on a non-loopback
// address without a key serve refuses to start unless --dev is given, and
// then warns. In dev mode a token that is present is still verified.
func TestDevModeRule(t *testing.T) {
	t.Parallel()
	t.Run("loopback without a key is dev", func(t *testing.T) {
		t.Parallel()
		p := trtest.Serve(t)
		c := trtest.Dial(t, p.WSURL(), nil)
		c.Join("dev-conv", nil)
		var list struct {
			Conversations []any `json:"conversations"`
		}
		if code := trtest.Do(t, "GET", p.URL+"/v1/conversations", "", nil, &list); code != 200 {
			t.Fatalf("HTTP without a token in dev mode: %d", code)
		}
		// A token is still verified: alg=none cannot name another user.
		forged := sign(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, claimsFor("admin"))
		if accepted(t, p, p.WSURL(), &trtest.DialOptions{Token: forged}) {
			t.Fatal("dev mode accepted an alg=none token")
		}
		if code, _ := httpErr(t, "GET", p.URL+"/v1/conversations", forged, ""); code != 401 {
			t.Fatalf("dev mode HTTP with alg=none: %d", code)
		}
		if strings.Contains(p.Stderr(), "DEV MODE") {
			t.Fatal("loopback dev mode warned as if it were public")
		}
	})
	t.Run("dev mode answers loopback host names only", func(t *testing.T) {
		// A page whose name an attacker rebinds to 127.0.0.1 is its own
		// origin, so only the Host it sends tells it from the web page.
		t.Parallel()
		p := trtest.Serve(t)
		port := p.URL[strings.LastIndex(p.URL, ":")+1:]
		for host, want := range map[string]int{
			"attacker.example:" + port:    http.StatusForbidden,
			"127.0.0.1.nip.io:" + port:    http.StatusForbidden,
			"localhost.evil.test:" + port: http.StatusForbidden,
			"127.0.0.1:" + port:           http.StatusOK,
			"localhost:" + port:           http.StatusOK,
			"app.localhost:" + port:       http.StatusOK,
			"[::1]:" + port:               http.StatusOK,
			"0.0.0.0:" + port:             http.StatusOK,
		} {
			for _, path := range []string{"/v1/conversations", "/"} {
				req, err := http.NewRequest("GET", p.URL+path, nil)
				if err != nil {
					t.Fatal(err)
				}
				req.Host = host
				req.Header.Set("Origin", "http://"+host)
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Fatalf("GET %s with Host %s: %v", path, host, err)
				}
				resp.Body.Close()
				if resp.StatusCode != want {
					t.Errorf("GET %s with Host %s: %d, want %d", path, host, resp.StatusCode, want)
				}
			}
		}
		h := http.Header{"Origin": {"http://attacker.example:" + port}}
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		ws, resp, err := websocket.Dial(ctx, p.WSURL(), &websocket.DialOptions{HTTPHeader: h, Host: "attacker.example:" + port})
		if err == nil {
			ws.CloseNow()
			t.Fatal("a WebSocket for a rebound name was accepted")
		}
		if resp == nil || resp.StatusCode != http.StatusForbidden {
			t.Fatalf("WebSocket for a rebound name: %v, %v", resp, err)
		}
	})
	t.Run("loopback with a key is not dev", func(t *testing.T) {
		t.Parallel()
		p := serveJWT(t)
		if code := closeCode(t, p.WSURL(), nil, wait); code != 4001 {
			t.Fatalf("no token: close %d, want 4001", code)
		}
		if code, _ := httpErr(t, "GET", p.URL+"/v1/conversations", "", ""); code != 401 {
			t.Fatalf("no token over HTTP: %d", code)
		}
	})
	t.Run("public address with a key", func(t *testing.T) {
		t.Parallel()
		p := trtest.Serve(t, "--addr", "0.0.0.0:0", "--jwt-secret", secret)
		if code := closeCode(t, p.WSURL(), nil, wait); code != 4001 {
			t.Fatalf("no token: close %d, want 4001", code)
		}
		if !accepted(t, p, p.WSURL(), &trtest.DialOptions{Token: tokenFor(t, "alice")}) {
			t.Fatal("valid token refused")
		}
	})
	t.Run("public address with --dev warns", func(t *testing.T) {
		t.Parallel()
		p := trtest.Serve(t, "--addr", "0.0.0.0:0", "--dev")
		if !accepted(t, p, p.WSURL(), nil) {
			t.Fatal("explicit --dev refused a connection without a token")
		}
		if !strings.Contains(p.Stderr(), "DEV MODE ON A NON-LOOPBACK ADDRESS") {
			t.Fatalf("no loud warning:\n%s", p.Stderr())
		}
	})
	t.Run("--dev with a key warns of the compatible paths", func(t *testing.T) {
		t.Parallel()
		p := trtest.Serve(t, "--dev", "--jwt-secret", secret)
		if !strings.Contains(p.Stderr(), "WARNING: --dev with a JWT key") {
			t.Fatalf("no warning that tokenless compatible requests name any user:\n%s", p.Stderr())
		}
	})
	bin := trtest.Binary(t)
	refuse := []struct {
		name string
		args []string
		env  []string
		want string
	}{
		{"public address without a key", []string{"--addr", "0.0.0.0:0"}, nil, "without authentication"},
		{"empty host without a key", []string{"--addr", ":0"}, nil, "without authentication"},
		{"public address, --dev=false", []string{"--addr", "0.0.0.0:0", "--dev=false"}, nil, "no JWT secret or public key"},
		{"loopback, --dev=false, no key", []string{"--dev=false"}, nil, "no JWT secret or public key"},
		{"public address, dev off by env", []string{"--addr", "0.0.0.0:0"}, []string{"TOKENRELAY_DEV=false"}, "no JWT secret or public key"},
		{"unreadable public key", []string{"--jwt-public-key", "/nonexistent/key.pem"}, nil, "jwt-public-key"},
		{"private key as public key", []string{"--jwt-public-key", "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"}, nil, "not a public key"},
		// Neither is echoed: the check below looks for "MIIEvQIBADAN".
		{"private key after openssl's attributes", []string{"--jwt-public-key", "Bag Attributes\n    localKeyID: 01 00\n-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n"}, nil, "not a public key"},
		{"private key without its armour", nil, []string{"TOKENRELAY_JWT_PUBLIC_KEY=MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7"}, "neither a PEM key"},
	}
	for _, tt := range refuse {
		t.Run("refuses: "+tt.name, func(t *testing.T) {
			t.Parallel()
			args := append([]string{"serve", "--data-dir", t.TempDir()}, tt.args...)
			if !containsFlag(args, "--addr") {
				args = append(args, "--addr", "127.0.0.1:0")
			}
			cmd := exec.Command(bin, args...)
			cmd.Env = append(os.Environ(), tt.env...)
			out, err := runWithTimeout(cmd, wait)
			if err == nil {
				t.Fatalf("serve started:\n%s", out)
			}
			lines := strings.Split(strings.TrimSpace(out), "\n")
			last := lines[len(lines)-1]
			if !strings.HasPrefix(last, "tokenrelay:") || !strings.Contains(last, tt.want) {
				t.Fatalf("last line %q, want a one-line reason with %q", last, tt.want)
			}
			if strings.Contains(out, "MIIEvQIBADAN") {
				t.Fatalf("the key was echoed:\n%s", out)
			}
		})
	}
}

func containsFlag(args []string, name string) bool {
	for _, a := range args {
		if a == name || strings.HasPrefix(a, name+"=") {
			return true
		}
	}
	return false
}

// runWithTimeout runs cmd and returns its combined output; a process still
// running after d is killed and counts as started.
func runWithTimeout(cmd *exec.Cmd, d time.Duration) (string, error) {
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return "", err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return out.String(), err
	case <-time.After(d):
		_ = cmd.Process.Kill()
		<-done
		return out.String(), nil
	}
}

// A socket does not outlive its token: it is closed with 4001 when the
// token's exp (plus the 30 s leeway) passes, and a fresh token opens a new
// one. The token here expired 28 s ago, so it is still accepted and the
// socket closes about 2 s after it opens.
func TestTokenExpiresOnOpenSocket(t *testing.T) {
	t.Parallel()
	p := serveJWT(t)
	now := time.Now()
	claims := jwt.MapClaims{"sub": "alice", "iat": now.Add(-time.Hour).Unix(), "exp": now.Add(-28 * time.Second).Unix()}
	c := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: sign(t, jwt.SigningMethodHS256, []byte(secret), claims)})
	c.Join("expiring", nil)
	select {
	case <-c.Done():
	case <-time.After(wait):
		t.Fatal("the socket outlived its token")
	}
	if code := c.CloseStatus(); code != 4001 {
		t.Fatalf("closed with %d, want 4001", code)
	}
	waitMetric(t, p.URL, "tokenrelay_auth_failures_total", `reason="expired"`, 1)
	fresh := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: tokenFor(t, "alice")})
	fresh.Join("expiring", nil)
}
