package auth

import (
	"errors"
	"net/http/httptest"
	"net/url"
	"testing"

	"github.com/golang-jwt/jwt/v5"
)

func TestAuthenticate(t *testing.T) {
	prod := mustNew(t, Config{HS256Secret: testSecret})
	dev := mustNew(t, Config{Dev: true, HS256Secret: testSecret})
	alice := sign(t, jwt.SigningMethodHS256, testSecret, claims("alice"))
	bob := sign(t, jwt.SigningMethodHS256, testSecret, claims("bob"))
	bad := sign(t, jwt.SigningMethodHS256, []byte("wrong secret"), claims("alice"))

	tests := []struct {
		name    string
		a       *Authenticator
		header  string // Authorization
		query   string // access_token; "-" means an empty parameter
		want    string
		wantErr error
	}{
		{name: "header", a: prod, header: "Bearer " + alice, want: "alice"},
		{name: "header lowercase scheme", a: prod, header: "bearer " + alice, want: "alice"},
		{name: "query", a: prod, query: alice, want: "alice"},
		{name: "header wins over query", a: prod, header: "Bearer " + alice, query: bob, want: "alice"},
		{name: "bad header, good query", a: prod, header: "Bearer " + bad, query: alice, wantErr: ErrInvalidToken},
		{name: "no token", a: prod, wantErr: ErrNoToken},
		{name: "empty query", a: prod, query: "-", wantErr: ErrNoToken},
		{name: "bad header", a: prod, header: "Bearer " + bad, wantErr: ErrInvalidToken},
		{name: "bad query", a: prod, query: bad, wantErr: ErrInvalidToken},
		{name: "basic scheme", a: prod, header: "Basic YWxpY2U6cHc=", wantErr: ErrInvalidToken},
		{name: "empty bearer", a: prod, header: "Bearer ", wantErr: ErrInvalidToken},
		{name: "raw token without scheme", a: prod, header: alice, wantErr: ErrInvalidToken},
		{name: "dev, no token", a: dev, want: DevUserID},
		{name: "dev, empty query", a: dev, query: "-", want: DevUserID},
		{name: "dev, valid token", a: dev, header: "Bearer " + alice, want: "alice"},
		{name: "dev, bad header", a: dev, header: "Bearer " + bad, wantErr: ErrInvalidToken},
		{name: "dev, bad query", a: dev, query: "garbage", wantErr: ErrInvalidToken},
		{name: "dev, dev-token is not a JWT", a: dev, query: DevToken, wantErr: ErrInvalidToken},
		{name: "dev, basic scheme", a: dev, header: "Basic YWxpY2U6cHc=", wantErr: ErrInvalidToken},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			target := "/v1/ws"
			switch tt.query {
			case "":
			case "-":
				target += "?access_token="
			default:
				target += "?access_token=" + url.QueryEscape(tt.query)
			}
			r := httptest.NewRequest("GET", target, nil)
			if tt.header != "" {
				r.Header.Set("Authorization", tt.header)
			}
			got, err := tt.a.Authenticate(r)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("Authenticate = %+v, %v; want %v", got, err, tt.wantErr)
				}
				assertNoTokenInError(t, err, tt.header+tt.query)
				return
			}
			if err != nil {
				t.Fatalf("Authenticate: %v", err)
			}
			if got.UserID != tt.want {
				t.Errorf("UserID = %q, want %q", got.UserID, tt.want)
			}
		})
	}
}

func TestAuthenticateCompat(t *testing.T) {
	prod := mustNew(t, Config{HS256Secret: testSecret})
	dev := mustNew(t, Config{Dev: true, HS256Secret: testSecret})
	demo := sign(t, jwt.SigningMethodHS256, testSecret, claims("demo_user"))
	bad := sign(t, jwt.SigningMethodHS256, []byte("wrong secret"), claims("demo_user"))

	tests := []struct {
		name    string
		a       *Authenticator
		userID  string
		token   string
		want    string
		wantErr error
	}{
		{name: "dev, dev-token", a: dev, userID: "demo_user", token: DevToken, want: "demo_user"},
		{name: "dev, no token", a: dev, userID: "default_user", token: "", want: "default_user"},
		{name: "dev, Bearer dev-token", a: dev, userID: "demo_user", token: "Bearer " + DevToken, want: "demo_user"},
		{name: "Bearer dev-token outside dev", a: prod, userID: "demo_user", token: "Bearer " + DevToken, wantErr: ErrInvalidToken},
		{name: "dev, dev-token, unsafe user_id", a: dev, userID: "a b\n", token: DevToken, wantErr: ErrInvalidUserID},
		{name: "dev, dev-token, empty user_id", a: dev, userID: "", token: DevToken, wantErr: ErrInvalidUserID},
		{name: "dev, valid JWT", a: dev, userID: "demo_user", token: demo, want: "demo_user"},
		{name: "dev, bad JWT", a: dev, userID: "demo_user", token: bad, wantErr: ErrInvalidToken},
		{name: "dev, JWT of another user", a: dev, userID: "mallory", token: demo, wantErr: ErrUserMismatch},
		{name: "dev-token outside dev", a: prod, userID: "demo_user", token: DevToken, wantErr: ErrInvalidToken},
		{name: "no token outside dev", a: prod, userID: "demo_user", token: "", wantErr: ErrNoToken},
		{name: "JWT", a: prod, userID: "demo_user", token: demo, want: "demo_user"},
		{name: "Bearer prefix", a: prod, userID: "demo_user", token: "Bearer " + demo, want: "demo_user"},
		{name: "sub mismatch", a: prod, userID: "mallory", token: demo, wantErr: ErrUserMismatch},
		{name: "Bearer prefix, sub mismatch", a: prod, userID: "mallory", token: "Bearer " + demo, wantErr: ErrUserMismatch},
		{name: "bad JWT", a: prod, userID: "demo_user", token: bad, wantErr: ErrInvalidToken},
		{name: "Bearer only", a: prod, userID: "demo_user", token: "Bearer ", wantErr: ErrNoToken},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.a.AuthenticateCompat(tt.userID, tt.token)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("AuthenticateCompat = %+v, %v; want %v", got, err, tt.wantErr)
				}
				assertNoTokenInError(t, err, tt.token)
				return
			}
			if err != nil {
				t.Fatalf("AuthenticateCompat: %v", err)
			}
			if got.UserID != tt.want {
				t.Errorf("UserID = %q, want %q", got.UserID, tt.want)
			}
		})
	}
}
