package auth

import (
	"net/http"
	"strings"
)

// DevToken is the token the original React page sends; the compat path
// accepts it in dev mode only.
const DevToken = "dev-token"

// Authenticate returns the identity of r, a native-protocol request.
//
// The token comes from the "Authorization: Bearer <token>" header or, when
// the header is absent, from the access_token query parameter (browsers cannot
// set headers on WebSocket upgrades); an empty access_token counts as absent.
// An Authorization header with another scheme is rejected rather than ignored.
//
// Without a token, Authenticate returns Identity{UserID: "dev"} in dev mode and
// [ErrNoToken] otherwise. A token that is present is verified by
// [Authenticator.Verify] even in dev mode, so a bad token fails with
// [ErrInvalidToken] there too. It is safe for concurrent use.
func (a *Authenticator) Authenticate(r *http.Request) (Identity, error) {
	token, err := requestToken(r)
	if err != nil {
		return Identity{}, err
	}
	if token == "" {
		if a.dev {
			return Identity{UserID: DevUserID}, nil
		}
		return Identity{}, ErrNoToken
	}
	return a.Verify(token)
}

// requestToken extracts the token of r; "" means none was sent.
func requestToken(r *http.Request) (string, error) {
	if h := r.Header.Get("Authorization"); h != "" {
		token, ok := cutBearer(h)
		if !ok {
			return "", &tokenError{reason: "Authorization header is not a Bearer token"}
		}
		if token == "" {
			return "", &tokenError{reason: "empty Bearer token"}
		}
		return token, nil
	}
	return r.URL.Query().Get("access_token"), nil
}

// cutBearer strips the "Bearer " prefix of s; the scheme is case-insensitive
// (RFC 7235 section 2.1).
func cutBearer(s string) (string, bool) {
	const prefix = "bearer "
	if len(s) < len(prefix) || !strings.EqualFold(s[:len(prefix)], prefix) {
		return "", false
	}
	return strings.TrimSpace(s[len(prefix):]), true
}

// StripBearer returns token without a "Bearer " prefix, which the
// COMPAT.md paths allow in their token parameter (dev-token included).
func StripBearer(token string) string {
	if t, ok := cutBearer(token); ok {
		return t
	}
	return token
}

// AuthenticateCompat returns the identity for the user_id and token query
// parameters of the COMPAT.md WebSocket path.
//
// An optional "Bearer " prefix is stripped first. In dev mode a token that
// is "" or [DevToken] is accepted as userID itself, which must then match
// ^[A-Za-z0-9_.:@-]{1,128}$ (else [ErrInvalidUserID]). Otherwise the token
// is verified
// with [Authenticator.Verify] (any configured algorithm, HS256 being what the
// original system issued); its sub must equal userID, else [ErrUserMismatch].
// Outside dev mode an empty token fails with [ErrNoToken] and [DevToken] with
// [ErrInvalidToken]. It is safe for concurrent use.
func (a *Authenticator) AuthenticateCompat(userID, token string) (Identity, error) {
	token = StripBearer(token)
	if token == "" || token == DevToken {
		if !a.dev {
			if token == "" {
				return Identity{}, ErrNoToken
			}
			return Identity{}, &tokenError{reason: "dev token outside dev mode"}
		}
		if !validUserID(userID) {
			return Identity{}, ErrInvalidUserID
		}
		return Identity{UserID: userID}, nil
	}
	id, err := a.Verify(token)
	if err != nil {
		return Identity{}, err
	}
	if id.UserID != userID {
		return Identity{}, ErrUserMismatch
	}
	return id, nil
}
