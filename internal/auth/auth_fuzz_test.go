package auth

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// FuzzAuthenticate checks the token parsing of every request: it never
// panics; a refusal is ErrNoToken, ErrInvalidUserID or ErrUserMismatch, or
// wraps ErrInvalidToken with one of this package's fixed reasons, quoting
// nothing of what the client sent; an identity it returns has a usable user
// id; and a token signed with the secret for a usable sub, unexpired, is
// accepted, with or without its Bearer prefix, as that sub.
func FuzzAuthenticate(f *testing.F) {
	f.Add("Bearer x.y.z", "", "alice", int64(3600))
	f.Add("", "eyJhbGciOiJub25lIn0.e30.", "a@b.c", int64(-3600))
	f.Add("bEaReR   ", "dev-token", "", int64(0))
	f.Add("Basic dXNlcjpwYXNz", "tok", "x y", int64(1)<<62)
	a, err := New(Config{HS256Secret: testSecret, Now: nowFunc})
	if err != nil {
		f.Fatal(err)
	}
	dev, err := New(Config{Dev: true, Now: nowFunc})
	if err != nil {
		f.Fatal(err)
	}
	reasons := []string{"longer than 8 KiB", "sub claim missing", "sub claim does not match ^[A-Za-z0-9_.:@-]{1,128}$",
		"Authorization header is not a Bearer token", "empty Bearer token", "dev token outside dev mode", "rejected"}
	for _, r := range jwtReasons {
		reasons = append(reasons, r.reason)
	}
	checkErr := func(t *testing.T, what string, err error) {
		t.Helper()
		if err == ErrNoToken || err == ErrInvalidUserID || err == ErrUserMismatch {
			return
		}
		var te *tokenError
		if !errors.As(err, &te) || !errors.Is(err, ErrInvalidToken) {
			t.Fatalf("%s: error %T %v", what, err, err)
		}
		for _, r := range reasons {
			if te.reason == r {
				return
			}
		}
		t.Fatalf("%s: reason %q is not a fixed one", what, te.reason)
	}
	checkID := func(t *testing.T, what string, id Identity) {
		t.Helper()
		if !validUserID(id.UserID) {
			t.Fatalf("%s: identity %q", what, id.UserID)
		}
	}
	f.Fuzz(func(t *testing.T, header, token, sub string, exp int64) {
		r := httptest.NewRequest(http.MethodGet, "/v1/ws?access_token="+url.QueryEscape(token), nil)
		if header != "" {
			r.Header["Authorization"] = []string{header}
		}
		for _, au := range []*Authenticator{a, dev} {
			if id, err := au.Authenticate(r); err != nil {
				checkErr(t, "Authenticate", err)
			} else {
				checkID(t, "Authenticate", id)
			}
			if id, err := au.AuthenticateCompat(sub, token); err != nil {
				checkErr(t, "AuthenticateCompat", err)
			} else {
				checkID(t, "AuthenticateCompat", id)
				if id.UserID != sub {
					t.Fatalf("AuthenticateCompat(%q) is %q", sub, id.UserID)
				}
			}
		}

		c := jwt.MapClaims{"sub": sub, "iat": testNow.Unix()}
		if exp != 0 {
			c["exp"] = exp
		}
		signed, err := jwt.NewWithClaims(jwt.SigningMethodHS256, c).SignedString(testSecret)
		if err != nil {
			t.Fatal(err)
		}
		want := validUserID(sub) && (exp == 0 || time.Unix(exp, 0).Add(DefaultLeeway).After(testNow))
		for _, tok := range []string{signed, "Bearer " + signed, "bearer  " + signed + " "} {
			id, err := a.AuthenticateCompat(sub, tok)
			if want && (err != nil || id.UserID != sub) {
				t.Fatalf("token for %q, exp %d: %q, %v", sub, exp, id.UserID, err)
			}
			if !want && err == nil {
				t.Fatalf("token for %q, exp %d accepted", sub, exp)
			}
			if err != nil {
				checkErr(t, "signed token", err)
			}
			if strings.Contains(tok, "  ") {
				continue
			}
			r.Header["Authorization"] = []string{"Bearer " + signed}
			if id, err := a.Authenticate(r); want != (err == nil) || want && id.UserID != sub {
				t.Fatalf("header with token for %q, exp %d: %q, %v", sub, exp, id.UserID, err)
			}
		}
	})
}
