// Package provider defines how a worker asks a model for a streamed reply;
// its subpackages implement it (sim: the deterministic simulator, openai: any
// OpenAI-compatible Chat Completions server).
package provider

import (
	"context"
	"errors"

	"github.com/tokenrelay/tokenrelay/internal/chat"
)

// Provider streams a model's reply.
type Provider interface {
	// Stream asks the model for a reply to req and calls emit with each piece
	// of text in order, from the calling goroutine. It returns when the reply
	// is complete, when emit returns an error (which Stream returns), or when
	// ctx is done: then it closes any upstream request at once and returns
	// ctx's error. Upstream failures are returned as *Error, with the
	// Result's usage when the server reported it all the same. Stream is
	// safe for concurrent use.
	Stream(ctx context.Context, req Request, emit func(text string) error) (Result, error)
}

// Pinger is implemented by providers that can check cheaply that the model
// server answers; /readyz calls it when present.
type Pinger interface {
	Ping(ctx context.Context) error
}

// Message is one message of the conversation sent upstream.
type Message struct {
	Role    string // "system", "user" or "assistant"
	Content string
}

// Request is what a turn asks of the model.
type Request struct {
	TurnID string
	Model  string // empty: the provider's default
	// Messages is the conversation context, oldest first; the last one is
	// the user message being answered.
	Messages []Message
}

// Prompt returns the content of the last user message of r.
func (r Request) Prompt() string {
	for i := len(r.Messages) - 1; i >= 0; i-- {
		if r.Messages[i].Role == string(chat.RoleUser) {
			return r.Messages[i].Content
		}
	}
	return ""
}

// Result is what a finished stream reports besides its text.
type Result struct {
	Usage *chat.Usage
}

// Error is an upstream failure. Message is safe to show to the person who
// asked (it never contains credentials); Err is the internal cause.
type Error struct {
	Message string
	Err     error
}

func (e *Error) Error() string {
	if e.Err != nil {
		return e.Message + ": " + e.Err.Error()
	}
	return e.Message
}

func (e *Error) Unwrap() error { return e.Err }

// ErrUnavailable is wrapped by errors that mean the model cannot be reached.
var ErrUnavailable = errors.New("model provider unavailable")

// ErrUnreachable is wrapped, besides ErrUnavailable, by a Pinger's errors
// that mean the model server cannot be reached at all: the connection
// failed (refused, no such host). Workers refuse new turns while their
// model server is unreachable; a server that answers, even with an error,
// or that is only slow to, may still serve chats.
var ErrUnreachable = errors.New("model server unreachable")
