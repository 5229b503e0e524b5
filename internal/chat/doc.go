// Package chat holds tokenrelay's domain types: conversations, messages,
// turns and the events a turn produces, the identifier rules and the domain
// errors. It imports nothing else of tokenrelay.
//
// A turn moves through this state machine, and ends exactly once:
//
//	queued ──▶ streaming ──▶ complete | cancelled | error | interrupted
//	   └──────────────────▶ cancelled | error | interrupted
//
// The stored content of a turn's assistant message always equals the
// concatenation of the deltas the turn published, whatever its terminal status.
package chat
