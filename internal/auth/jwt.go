package auth

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// DefaultLeeway is the clock skew tolerated on exp, nbf and iat when
// [Config.Leeway] is zero.
const DefaultLeeway = 30 * time.Second

// maxTokenLen bounds the work an unauthenticated client can make us do; real
// tokens are a few hundred bytes.
const maxTokenLen = 8 << 10

// minRSABits is the smallest RSA key accepted, as RFC 7518 section 3.3 requires
// for RS256.
const minRSABits = 2048

// maxUserIDLen is the longest accepted sub claim.
const maxUserIDLen = 128

var (
	// ErrNoToken is returned when a request carries no token and dev mode is
	// off. It maps to 401 unauthorized (close code 4001).
	ErrNoToken = errors.New("auth: no token")
	// ErrInvalidToken is returned for a token that is malformed, badly signed,
	// signed with an algorithm that is not configured, expired, not yet valid,
	// issued for another issuer or audience, or whose sub is missing or
	// unusable. The jwt cause is wrapped, so errors.Is also matches the
	// sentinels of github.com/golang-jwt/jwt/v5 such as jwt.ErrTokenExpired,
	// but the message is a fixed reason that quotes nothing from the token.
	// It maps to 401 unauthorized (close code 4001).
	ErrInvalidToken = errors.New("auth: invalid token")
	// ErrUserMismatch is returned by [Authenticator.AuthenticateCompat] when a
	// valid token names another user than the one the client claims to be.
	// It maps to 403 forbidden.
	ErrUserMismatch = errors.New("auth: token subject does not match user_id")
	// ErrInvalidUserID is returned by [Authenticator.AuthenticateCompat] in dev
	// mode when the user_id the client claims cannot be used as an identity
	// (see [Identity]).
	ErrInvalidUserID = errors.New("auth: invalid user_id")
)

// Identity is the authenticated user.
type Identity struct {
	// UserID is the JWT sub claim, or "dev" (or the claimed compat user_id)
	// in dev mode. It always matches ^[A-Za-z0-9_.:@-]{1,128}$, so it is safe
	// to embed in ids, bus subjects and logs.
	UserID string
	// Expires is when the token stops being accepted (its exp plus the
	// leeway); zero when there is no token or it has no exp. A connection
	// opened with the token is closed then.
	Expires time.Time
}

// DevUserID is the user of requests accepted without a token in dev mode.
const DevUserID = "dev"

// Config configures an [Authenticator]. The zero value is invalid: set Dev,
// HS256Secret or PublicKeyPEM.
type Config struct {
	// Dev accepts requests without a token (see [Authenticator.Authenticate]).
	Dev bool
	// HS256Secret enables HS256 tokens signed with this secret. RFC 7518
	// asks for at least 32 bytes; shorter secrets are accepted but weak.
	HS256Secret []byte
	// PublicKeyPEM enables RS256 (for an RSA key of at least 2048 bits) or
	// ES256 (for an EC P-256 key). The first PEM block is used and must be a
	// PKIX "PUBLIC KEY", a PKCS #1 "RSA PUBLIC KEY" or a "CERTIFICATE".
	// It may be set together with HS256Secret; both families are then accepted.
	PublicKeyPEM []byte
	// Issuer, when set, must equal the iss claim.
	Issuer string
	// Audience, when set, must be one of the aud claim's values.
	Audience string
	// Leeway is the clock skew tolerated on exp, nbf and iat. Zero means
	// [DefaultLeeway]; a negative value means none.
	Leeway time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// Authenticator verifies tokens. It is immutable after [New] and safe for
// concurrent use.
type Authenticator struct {
	dev    bool
	secret []byte           // nil unless HS256 is enabled
	rsaKey *rsa.PublicKey   // nil unless RS256 is enabled
	ecKey  *ecdsa.PublicKey // nil unless ES256 is enabled
	parser *jwt.Parser
	leeway time.Duration
}

// New returns an Authenticator for cfg. It fails when PublicKeyPEM cannot be
// parsed or holds an unsupported key (not RSA or EC P-256, or RSA below 2048
// bits), and when cfg enables neither dev mode nor any key, since such an
// Authenticator could never accept anyone.
func New(cfg Config) (*Authenticator, error) {
	a := &Authenticator{dev: cfg.Dev}
	// Non-nil on purpose: the parser accepts every method for a nil list but
	// none for an empty one, which is what dev mode without keys needs.
	methods := []string{}
	if len(cfg.HS256Secret) > 0 {
		a.secret = append([]byte(nil), cfg.HS256Secret...)
		methods = append(methods, jwt.SigningMethodHS256.Alg())
	}
	if len(cfg.PublicKeyPEM) > 0 {
		key, err := parsePublicKey(cfg.PublicKeyPEM)
		if err != nil {
			return nil, fmt.Errorf("auth: parse public key: %w", err)
		}
		switch k := key.(type) {
		case *rsa.PublicKey:
			if k.N.BitLen() < minRSABits {
				return nil, fmt.Errorf("auth: parse public key: RSA key has %d bits, want at least %d", k.N.BitLen(), minRSABits)
			}
			a.rsaKey = k
			methods = append(methods, jwt.SigningMethodRS256.Alg())
		case *ecdsa.PublicKey:
			if k.Curve != elliptic.P256() {
				return nil, fmt.Errorf("auth: parse public key: EC curve %s is not supported, want P-256 (ES256)", k.Curve.Params().Name)
			}
			a.ecKey = k
			methods = append(methods, jwt.SigningMethodES256.Alg())
		default:
			return nil, fmt.Errorf("auth: parse public key: unsupported key type %T, want RSA or EC P-256", key)
		}
	}
	if len(methods) == 0 && !cfg.Dev {
		return nil, errors.New("auth: no JWT secret or public key configured and dev mode is off")
	}

	leeway := cfg.Leeway
	switch {
	case leeway == 0:
		leeway = DefaultLeeway
	case leeway < 0:
		leeway = 0
	}
	now := cfg.Now
	if now == nil {
		now = time.Now
	}
	opts := []jwt.ParserOption{
		jwt.WithValidMethods(methods),
		jwt.WithLeeway(leeway),
		jwt.WithTimeFunc(now),
		jwt.WithIssuedAt(),
	}
	if cfg.Issuer != "" {
		opts = append(opts, jwt.WithIssuer(cfg.Issuer))
	}
	if cfg.Audience != "" {
		opts = append(opts, jwt.WithAudience(cfg.Audience))
	}
	a.parser = jwt.NewParser(opts...)
	a.leeway = leeway
	return a, nil
}

// parsePublicKey returns the public key of the first PEM block of data.
func parsePublicKey(data []byte) (any, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("no PEM block found")
	}
	switch block.Type {
	case "PUBLIC KEY":
		return x509.ParsePKIXPublicKey(block.Bytes)
	case "RSA PUBLIC KEY":
		return x509.ParsePKCS1PublicKey(block.Bytes)
	case "CERTIFICATE":
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, err
		}
		return cert.PublicKey, nil
	default:
		// Never echo the block: a private key pasted here by mistake must not
		// end up in an error message.
		return nil, fmt.Errorf("PEM block type %q is not a public key or certificate", block.Type)
	}
}

// Verify checks token (without any "Bearer " prefix) and returns the identity
// named by its sub claim.
//
// The signature must use a configured algorithm: HS256 when a secret is set,
// RS256 for an RSA public key, ES256 for an EC P-256 public key; "none" is
// never accepted. exp is optional, but when present the token must not have
// expired more than the leeway ago; nbf and iat, when present, must not lie
// more than the leeway in the future. iss and aud are required and checked
// only when [Config.Issuer] and [Config.Audience] are set. sub is required and
// must match ^[A-Za-z0-9_.:@-]{1,128}$.
//
// An empty token fails with [ErrNoToken]; every other failure wraps
// [ErrInvalidToken] and the jwt cause, with a message that quotes nothing
// from the token. Verify is safe for concurrent use.
func (a *Authenticator) Verify(token string) (Identity, error) {
	if token == "" {
		return Identity{}, ErrNoToken
	}
	if len(token) > maxTokenLen {
		return Identity{}, &tokenError{reason: "longer than 8 KiB"}
	}
	var claims jwt.RegisteredClaims
	if _, err := a.parser.ParseWithClaims(token, &claims, a.key); err != nil {
		return Identity{}, &tokenError{reason: jwtReason(err), cause: err}
	}
	if claims.Subject == "" {
		return Identity{}, &tokenError{reason: "sub claim missing"}
	}
	if !validUserID(claims.Subject) {
		return Identity{}, &tokenError{reason: "sub claim does not match ^[A-Za-z0-9_.:@-]{1,128}$"}
	}
	id := Identity{UserID: claims.Subject}
	if claims.ExpiresAt != nil {
		id.Expires = claims.ExpiresAt.Add(a.leeway)
	}
	return id, nil
}

// key is the jwt.Keyfunc. The parser has already checked the algorithm
// against the configured list; the type checks here keep a key of one family
// from ever verifying a signature of another (the RS256-key-as-HMAC-secret
// confusion).
func (a *Authenticator) key(t *jwt.Token) (any, error) {
	switch t.Method.(type) {
	case *jwt.SigningMethodHMAC:
		if a.secret != nil && t.Method == jwt.SigningMethodHS256 {
			return a.secret, nil
		}
	case *jwt.SigningMethodRSA:
		if a.rsaKey != nil && t.Method == jwt.SigningMethodRS256 {
			return a.rsaKey, nil
		}
	case *jwt.SigningMethodECDSA:
		if a.ecKey != nil && t.Method == jwt.SigningMethodES256 {
			return a.ecKey, nil
		}
	}
	return nil, fmt.Errorf("signing method %s not configured", t.Method.Alg())
}

// tokenError is an [ErrInvalidToken] with its jwt cause. Its message is a
// fixed reason rather than the cause's text, because jwt errors may quote
// decoded parts of the token (a claim's value, for instance), and this
// message ends up in logs and replies.
type tokenError struct {
	reason string
	cause  error // nil when the token was rejected by this package
}

func (e *tokenError) Error() string { return ErrInvalidToken.Error() + ": " + e.reason }

func (e *tokenError) Unwrap() []error {
	if e.cause == nil {
		return []error{ErrInvalidToken}
	}
	return []error{ErrInvalidToken, e.cause}
}

// jwtReasons names the jwt sentinels, most specific first (an expired token
// also matches jwt.ErrTokenInvalidClaims).
var jwtReasons = []struct {
	err    error
	reason string
}{
	{jwt.ErrTokenMalformed, "malformed"},
	{jwt.ErrTokenUnverifiable, "unverifiable"},
	{jwt.ErrTokenSignatureInvalid, "bad signature or algorithm not accepted"},
	{jwt.ErrTokenExpired, "expired"},
	{jwt.ErrTokenNotValidYet, "not valid yet (nbf)"},
	{jwt.ErrTokenUsedBeforeIssued, "issued in the future (iat)"},
	{jwt.ErrTokenInvalidIssuer, "wrong issuer"},
	{jwt.ErrTokenInvalidAudience, "wrong audience"},
	{jwt.ErrTokenRequiredClaimMissing, "required claim missing (iss or aud)"},
	{jwt.ErrTokenInvalidClaims, "invalid claims"},
}

func jwtReason(err error) string {
	for _, r := range jwtReasons {
		if errors.Is(err, r.err) {
			return r.reason
		}
	}
	return "rejected"
}

// validUserID reports whether s matches ^[A-Za-z0-9_.:@-]{1,128}$.
func validUserID(s string) bool {
	if len(s) == 0 || len(s) > maxUserIDLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case c == '_', c == '.', c == ':', c == '@', c == '-':
		default:
			return false
		}
	}
	return true
}
