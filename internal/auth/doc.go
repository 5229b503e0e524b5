// Package auth turns the credentials of an HTTP or WebSocket request into the
// [Identity] of a user, by verifying JWTs (HS256, RS256, ES256) or, in dev
// mode, by accepting requests that carry no token at all.
//
// An [Authenticator] is built once from a [Config] by [New] and is safe for
// concurrent use. [Authenticator.Authenticate] serves the native protocol of
// PROTOCOL.md (Authorization: Bearer header or access_token query parameter);
// [Authenticator.AuthenticateCompat] serves the token query parameter of the
// compatibility protocol of COMPAT.md. [OriginAllowed] checks the Origin of a
// WebSocket upgrade, and [IsLoopback] tells whether a listen address is local,
// which is what decides the default of --dev.
//
// Dev mode only waives the need for a token: a token that is present is always
// verified, and a bad one fails even in dev mode. No error returned by this
// package contains the token it was given.
package auth
