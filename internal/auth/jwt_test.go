package auth

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// testNow is the injected clock of every time-dependent test.
var testNow = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

var testSecret = []byte("0123456789abcdef0123456789abcdef")

func nowFunc() time.Time { return testNow }

// claims returns valid claims for sub, issued at testNow and expiring an hour
// later; edit modifies them further.
func claims(sub string, edit ...func(jwt.MapClaims)) jwt.MapClaims {
	c := jwt.MapClaims{
		"sub": sub,
		"iat": testNow.Unix(),
		"exp": testNow.Add(time.Hour).Unix(),
	}
	for _, e := range edit {
		e(c)
	}
	return c
}

func sign(tb testing.TB, m jwt.SigningMethod, key any, c jwt.Claims) string {
	tb.Helper()
	s, err := jwt.NewWithClaims(m, c).SignedString(key)
	if err != nil {
		tb.Fatalf("sign: %v", err)
	}
	return s
}

// noneToken crafts an unsigned alg=none token by hand, as an attacker would.
func noneToken(tb testing.TB, sub string) string {
	tb.Helper()
	enc := base64.RawURLEncoding.EncodeToString
	payload := `{"sub":"` + sub + `","exp":` + big.NewInt(testNow.Add(time.Hour).Unix()).String() + `}`
	return enc([]byte(`{"alg":"none","typ":"JWT"}`)) + "." + enc([]byte(payload)) + "."
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func pkixPEM(tb testing.TB, pub crypto.PublicKey) []byte {
	tb.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		tb.Fatalf("marshal public key: %v", err)
	}
	return pemBlock("PUBLIC KEY", der)
}

func certPEM(tb testing.TB, priv crypto.Signer) []byte {
	tb.Helper()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "tokenrelay test"},
		NotBefore:    testNow.Add(-time.Hour),
		NotAfter:     testNow.Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, priv.Public(), priv)
	if err != nil {
		tb.Fatalf("create certificate: %v", err)
	}
	return pemBlock("CERTIFICATE", der)
}

func genRSA(tb testing.TB, bits int) *rsa.PrivateKey {
	tb.Helper()
	k, err := rsa.GenerateKey(rand.Reader, bits)
	if err != nil {
		tb.Fatalf("generate RSA key: %v", err)
	}
	return k
}

func genEC(tb testing.TB, c elliptic.Curve) *ecdsa.PrivateKey {
	tb.Helper()
	k, err := ecdsa.GenerateKey(c, rand.Reader)
	if err != nil {
		tb.Fatalf("generate EC key: %v", err)
	}
	return k
}

func mustNew(tb testing.TB, cfg Config) *Authenticator {
	tb.Helper()
	if cfg.Now == nil {
		cfg.Now = nowFunc
	}
	a, err := New(cfg)
	if err != nil {
		tb.Fatalf("New: %v", err)
	}
	return a
}

func TestNew(t *testing.T) {
	rsaKey := genRSA(t, 2048)
	ecKey := genEC(t, elliptic.P256())
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rsaPriv, err := x509.MarshalPKCS8PrivateKey(rsaKey)
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name    string
		cfg     Config
		wantErr bool
		wantAlg string // a method the Authenticator must accept
	}{
		{name: "dev only", cfg: Config{Dev: true}},
		{name: "secret", cfg: Config{HS256Secret: testSecret}, wantAlg: "HS256"},
		{name: "RSA PKIX", cfg: Config{PublicKeyPEM: pkixPEM(t, &rsaKey.PublicKey)}, wantAlg: "RS256"},
		{name: "RSA PKCS1", cfg: Config{PublicKeyPEM: pemBlock("RSA PUBLIC KEY", x509.MarshalPKCS1PublicKey(&rsaKey.PublicKey))}, wantAlg: "RS256"},
		{name: "RSA certificate", cfg: Config{PublicKeyPEM: certPEM(t, rsaKey)}, wantAlg: "RS256"},
		{name: "EC PKIX", cfg: Config{PublicKeyPEM: pkixPEM(t, &ecKey.PublicKey)}, wantAlg: "ES256"},
		{name: "EC certificate", cfg: Config{PublicKeyPEM: certPEM(t, ecKey)}, wantAlg: "ES256"},
		{name: "secret and key", cfg: Config{HS256Secret: testSecret, PublicKeyPEM: pkixPEM(t, &ecKey.PublicKey)}, wantAlg: "ES256"},
		{name: "nothing configured", cfg: Config{}, wantErr: true},
		{name: "not PEM", cfg: Config{PublicKeyPEM: []byte("not a key")}, wantErr: true},
		{name: "garbage DER", cfg: Config{PublicKeyPEM: pemBlock("PUBLIC KEY", []byte("garbage"))}, wantErr: true},
		{name: "private key", cfg: Config{PublicKeyPEM: pemBlock("PRIVATE KEY", rsaPriv)}, wantErr: true},
		{name: "RSA 1024", cfg: Config{PublicKeyPEM: pkixPEM(t, &genRSA(t, 1024).PublicKey)}, wantErr: true},
		{name: "EC P-384", cfg: Config{PublicKeyPEM: pkixPEM(t, &genEC(t, elliptic.P384()).PublicKey)}, wantErr: true},
		{name: "Ed25519", cfg: Config{PublicKeyPEM: pkixPEM(t, edKey.Public())}, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, err := New(tt.cfg)
			if tt.wantErr {
				if err == nil {
					t.Fatal("New: got nil error, want one")
				}
				return
			}
			if err != nil {
				t.Fatalf("New: %v", err)
			}
			if got := a.Dev(); got != tt.cfg.Dev {
				t.Errorf("Dev() = %v, want %v", got, tt.cfg.Dev)
			}
			if tt.wantAlg != "" {
				if _, err := a.key(&jwt.Token{Method: jwt.GetSigningMethod(tt.wantAlg)}); err != nil {
					t.Errorf("key(%s): %v", tt.wantAlg, err)
				}
			}
		})
	}
}

func TestVerify(t *testing.T) {
	rsaKey := genRSA(t, 2048)
	otherRSA := genRSA(t, 2048)
	ecKey := genEC(t, elliptic.P256())
	otherEC := genEC(t, elliptic.P256())
	rsaPEM := pkixPEM(t, &rsaKey.PublicKey)
	rsaDER, err := x509.MarshalPKIXPublicKey(&rsaKey.PublicKey)
	if err != nil {
		t.Fatal(err)
	}

	hs := mustNew(t, Config{HS256Secret: testSecret})
	rs := mustNew(t, Config{PublicKeyPEM: rsaPEM})
	es := mustNew(t, Config{PublicKeyPEM: pkixPEM(t, &ecKey.PublicKey)})
	both := mustNew(t, Config{HS256Secret: testSecret, PublicKeyPEM: rsaPEM})
	devOnly := mustNew(t, Config{Dev: true})
	issAud := mustNew(t, Config{HS256Secret: testSecret, Issuer: "https://idp.example.com", Audience: "tokenrelay"})
	noLeeway := mustNew(t, Config{HS256Secret: testSecret, Leeway: -1})
	wideLeeway := mustNew(t, Config{HS256Secret: testSecret, Leeway: 5 * time.Minute})

	hs256 := func(c jwt.Claims) string { return sign(t, jwt.SigningMethodHS256, testSecret, c) }
	at := func(key string, d time.Duration) func(jwt.MapClaims) {
		return func(c jwt.MapClaims) { c[key] = testNow.Add(d).Unix() }
	}
	set := func(key string, v any) func(jwt.MapClaims) {
		return func(c jwt.MapClaims) { c[key] = v }
	}
	del := func(key string) func(jwt.MapClaims) {
		return func(c jwt.MapClaims) { delete(c, key) }
	}

	tests := []struct {
		name    string
		a       *Authenticator
		token   string
		want    string // UserID when wantErr is nil
		wantErr error  // besides ErrInvalidToken, which every failure wraps
	}{
		{name: "HS256 valid", a: hs, token: hs256(claims("alice")), want: "alice"},
		{name: "HS256 without exp", a: hs, token: hs256(claims("alice", del("exp"), del("iat"))), want: "alice"},
		{name: "expired beyond leeway", a: hs, token: hs256(claims("alice", at("exp", -31*time.Second))), wantErr: jwt.ErrTokenExpired},
		{name: "expired within leeway", a: hs, token: hs256(claims("alice", at("exp", -20*time.Second))), want: "alice"},
		{name: "expired, no leeway", a: noLeeway, token: hs256(claims("alice", at("exp", -time.Second))), wantErr: jwt.ErrTokenExpired},
		{name: "expired within wide leeway", a: wideLeeway, token: hs256(claims("alice", at("exp", -4*time.Minute))), want: "alice"},
		{name: "nbf in future", a: hs, token: hs256(claims("alice", at("nbf", time.Minute))), wantErr: jwt.ErrTokenNotValidYet},
		{name: "nbf within leeway", a: hs, token: hs256(claims("alice", at("nbf", 20*time.Second))), want: "alice"},
		{name: "iat in future", a: hs, token: hs256(claims("alice", at("iat", time.Minute))), wantErr: jwt.ErrTokenUsedBeforeIssued},
		{name: "exp not a number", a: hs, token: hs256(claims("alice", set("exp", "tomorrow"))), wantErr: jwt.ErrTokenMalformed},
		{name: "wrong secret", a: hs, token: sign(t, jwt.SigningMethodHS256, []byte("another secret of 32 bytes......"), claims("alice")), wantErr: jwt.ErrTokenSignatureInvalid},
		{name: "HS512 not configured", a: hs, token: sign(t, jwt.SigningMethodHS512, testSecret, claims("alice")), wantErr: jwt.ErrTokenSignatureInvalid},
		{name: "alg none on HS256", a: hs, token: noneToken(t, "alice")},
		{name: "alg none on RS256", a: rs, token: noneToken(t, "alice")},
		{name: "alg none on dev only", a: devOnly, token: noneToken(t, "alice")},
		{name: "HS256 on dev only", a: devOnly, token: hs256(claims("alice"))},
		{name: "RS256 valid", a: rs, token: sign(t, jwt.SigningMethodRS256, rsaKey, claims("alice")), want: "alice"},
		{name: "ES256 valid", a: es, token: sign(t, jwt.SigningMethodES256, ecKey, claims("alice")), want: "alice"},
		{name: "RS256 other key", a: rs, token: sign(t, jwt.SigningMethodRS256, otherRSA, claims("alice")), wantErr: jwt.ErrTokenSignatureInvalid},
		{name: "ES256 other key", a: es, token: sign(t, jwt.SigningMethodES256, otherEC, claims("alice")), wantErr: jwt.ErrTokenSignatureInvalid},
		{name: "RS256 on ES256", a: es, token: sign(t, jwt.SigningMethodRS256, rsaKey, claims("alice")), wantErr: jwt.ErrTokenSignatureInvalid},
		{name: "ES256 on RS256", a: rs, token: sign(t, jwt.SigningMethodES256, ecKey, claims("alice")), wantErr: jwt.ErrTokenSignatureInvalid},
		{name: "PS256 on RS256", a: rs, token: sign(t, jwt.SigningMethodPS256, rsaKey, claims("alice")), wantErr: jwt.ErrTokenSignatureInvalid},
		{name: "HS256 on ES256", a: es, token: hs256(claims("alice")), wantErr: jwt.ErrTokenSignatureInvalid},
		{name: "key confusion PEM as HMAC secret", a: rs, token: sign(t, jwt.SigningMethodHS256, rsaPEM, claims("alice")), wantErr: jwt.ErrTokenSignatureInvalid},
		{name: "key confusion DER as HMAC secret", a: rs, token: sign(t, jwt.SigningMethodHS256, rsaDER, claims("alice")), wantErr: jwt.ErrTokenSignatureInvalid},
		{name: "key confusion with secret also set", a: both, token: sign(t, jwt.SigningMethodHS256, rsaPEM, claims("alice")), wantErr: jwt.ErrTokenSignatureInvalid},
		{name: "both: HS256", a: both, token: hs256(claims("alice")), want: "alice"},
		{name: "both: RS256", a: both, token: sign(t, jwt.SigningMethodRS256, rsaKey, claims("alice")), want: "alice"},
		{name: "iss and aud match", a: issAud, token: hs256(claims("alice", set("iss", "https://idp.example.com"), set("aud", []string{"other", "tokenrelay"}))), want: "alice"},
		{name: "iss mismatch", a: issAud, token: hs256(claims("alice", set("iss", "https://evil.example.com"), set("aud", "tokenrelay"))), wantErr: jwt.ErrTokenInvalidIssuer},
		{name: "iss missing", a: issAud, token: hs256(claims("alice", set("aud", "tokenrelay"))), wantErr: jwt.ErrTokenRequiredClaimMissing},
		{name: "aud mismatch", a: issAud, token: hs256(claims("alice", set("iss", "https://idp.example.com"), set("aud", "other"))), wantErr: jwt.ErrTokenInvalidAudience},
		{name: "aud missing", a: issAud, token: hs256(claims("alice", set("iss", "https://idp.example.com"))), wantErr: jwt.ErrTokenRequiredClaimMissing},
		{name: "iss and aud ignored when not configured", a: hs, token: hs256(claims("alice", set("iss", "x"), set("aud", "y"))), want: "alice"},
		{name: "sub missing", a: hs, token: hs256(claims("alice", del("sub")))},
		{name: "sub empty", a: hs, token: hs256(claims(""))},
		{name: "sub not a string", a: hs, token: hs256(claims("alice", set("sub", 42)))},
		{name: "sub 128 chars", a: hs, token: hs256(claims(strings.Repeat("a", 128))), want: strings.Repeat("a", 128)},
		{name: "sub 129 chars", a: hs, token: hs256(claims(strings.Repeat("a", 129)))},
		{name: "sub all allowed chars", a: hs, token: hs256(claims("A-z_0.9:user@example.com")), want: "A-z_0.9:user@example.com"},
		{name: "sub with newline", a: hs, token: hs256(claims("alice\nlevel=ERROR"))},
		{name: "sub with slash", a: hs, token: hs256(claims("../alice"))},
		{name: "sub with space", a: hs, token: hs256(claims("alice bob"))},
		{name: "malformed", a: hs, token: "not.a.jwt", wantErr: jwt.ErrTokenMalformed},
		{name: "too long", a: hs, token: hs256(claims("alice", set("pad", strings.Repeat("x", 9000))))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.a.Verify(tt.token)
			if tt.want != "" {
				if err != nil {
					t.Fatalf("Verify: %v", err)
				}
				if got.UserID != tt.want {
					t.Errorf("UserID = %q, want %q", got.UserID, tt.want)
				}
				return
			}
			if !errors.Is(err, ErrInvalidToken) {
				t.Fatalf("Verify = %+v, %v; want ErrInvalidToken", got, err)
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Errorf("Verify error = %v, want it to wrap %v", err, tt.wantErr)
			}
			if got != (Identity{}) {
				t.Errorf("Verify identity = %+v on error, want zero", got)
			}
			assertNoTokenInError(t, err, tt.token)
			if strings.Contains(err.Error(), "tomorrow") {
				t.Errorf("error %q quotes a claim value", err)
			}
		})
	}

	t.Run("empty", func(t *testing.T) {
		if _, err := hs.Verify(""); !errors.Is(err, ErrNoToken) {
			t.Errorf("Verify(\"\") error = %v, want ErrNoToken", err)
		}
	})
}

// assertNoTokenInError fails if err's message holds the token or any of its
// segments.
func assertNoTokenInError(tb testing.TB, err error, token string) {
	tb.Helper()
	msg := err.Error()
	for _, part := range append(strings.Split(token, "."), token) {
		if len(part) >= 8 && strings.Contains(msg, part) {
			tb.Errorf("error %q contains part of the token", msg)
		}
	}
}
