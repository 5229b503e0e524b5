package protocol

import (
	"context"
	"errors"
	"net/http"

	"github.com/tokenrelay/tokenrelay/internal/chat"
)

// Code is an error code of PROTOCOL.md.
type Code string

// The error codes.
const (
	CodeBadRequest   Code = "bad_request"
	CodeUnauthorized Code = "unauthorized"
	CodeForbidden    Code = "forbidden"
	CodeNotFound     Code = "not_found"
	CodeTurnActive   Code = "turn_active"
	CodeTooLarge     Code = "too_large"
	CodeRateLimited  Code = "rate_limited"
	CodeUnavailable  Code = "unavailable"
	CodeInternal     Code = "internal"
)

// HTTPStatus is the status an HTTP answer with code c carries.
func (c Code) HTTPStatus() int {
	switch c {
	case CodeBadRequest:
		return http.StatusBadRequest
	case CodeUnauthorized:
		return http.StatusUnauthorized
	case CodeForbidden:
		return http.StatusForbidden
	case CodeNotFound:
		return http.StatusNotFound
	case CodeTurnActive:
		return http.StatusConflict
	case CodeTooLarge:
		return http.StatusRequestEntityTooLarge
	case CodeRateLimited:
		return http.StatusTooManyRequests
	case CodeUnavailable:
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

// Error is an error with a code and a message fit to show the client; the
// internal cause, if any, stays in Err and is never sent.
type Error struct {
	Code         Code
	Message      string
	TurnID       string // turn_active: the running turn
	RetryAfterMS int64  // rate_limited
	Err          error
}

func (e *Error) Error() string {
	if e.Err != nil {
		return string(e.Code) + ": " + e.Message + ": " + e.Err.Error()
	}
	return string(e.Code) + ": " + e.Message
}

func (e *Error) Unwrap() error { return e.Err }

// Errorf is a shorthand for an *Error without a cause.
func Errorf(code Code, msg string) *Error { return &Error{Code: code, Message: msg} }

// AsError maps any error to the *Error sent to the client: *Error as is,
// domain errors to their codes, anything else to internal (with a generic
// message: internal causes are not shown).
func AsError(err error) *Error {
	var pe *Error
	if errors.As(err, &pe) {
		return pe
	}
	var ta *chat.TurnActiveError
	switch {
	case errors.As(err, &ta):
		return &Error{Code: CodeTurnActive, Message: "a turn of this conversation is still running", TurnID: ta.TurnID, Err: err}
	case errors.Is(err, chat.ErrNotFound):
		return &Error{Code: CodeNotFound, Message: "not found", Err: err}
	case errors.Is(err, chat.ErrForbidden):
		return &Error{Code: CodeForbidden, Message: "this belongs to another user", Err: err}
	case errors.Is(err, chat.ErrMessageIDOfTurn):
		return &Error{Code: CodeBadRequest, Message: "message_id is the id of an assistant message in this conversation", Err: err}
	case errors.Is(err, chat.ErrSameIDs):
		return &Error{Code: CodeBadRequest, Message: "turn_id must differ from message_id", Err: err}
	case errors.Is(err, chat.ErrTurnIDOfMessage):
		return &Error{Code: CodeBadRequest, Message: "turn_id is the id of a message in this conversation", Err: err}
	case errors.Is(err, chat.ErrConflict):
		return &Error{Code: CodeBadRequest, Message: "turn_id is already used by another turn", Err: err}
	case errors.Is(err, chat.ErrTooManyTurns):
		return &Error{Code: CodeRateLimited, Message: "too many turns running at once", RetryAfterMS: 1000, Err: err}
	case errors.Is(err, chat.ErrUnavailable):
		return &Error{Code: CodeUnavailable, Message: "the history store is unavailable; try again shortly", Err: err}
	case errors.Is(err, context.DeadlineExceeded):
		return &Error{Code: CodeUnavailable, Message: "the service did not answer in time", Err: err}
	}
	return &Error{Code: CodeInternal, Message: "internal error", Err: err}
}

// Frame returns the error frame for e answering request id.
func (e *Error) Frame(id string) ErrorFrame {
	return ErrorFrame{Type: "error", ID: id, Code: e.Code, Message: e.Message, TurnID: e.TurnID, RetryAfterMS: e.RetryAfterMS}
}
