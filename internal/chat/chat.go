package chat

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

// Role says who wrote a message.
type Role string

// The two roles a message can have.
const (
	RoleUser      Role = "user"
	RoleAssistant Role = "assistant"
)

// TurnStatus is where a turn is in its lifecycle.
type TurnStatus string

// The statuses of a turn. User messages are always StatusComplete.
const (
	StatusQueued      TurnStatus = "queued"
	StatusStreaming   TurnStatus = "streaming"
	StatusComplete    TurnStatus = "complete"
	StatusCancelled   TurnStatus = "cancelled"
	StatusError       TurnStatus = "error"
	StatusInterrupted TurnStatus = "interrupted"
)

// Terminal reports whether s is one of the statuses a turn ends with.
func (s TurnStatus) Terminal() bool {
	switch s {
	case StatusComplete, StatusCancelled, StatusError, StatusInterrupted:
		return true
	}
	return false
}

// Valid reports whether s is a known status.
func (s TurnStatus) Valid() bool {
	return s == StatusQueued || s == StatusStreaming || s.Terminal()
}

// MaxIDLen is the longest identifier accepted.
const MaxIDLen = 128

// StorableText returns s with every U+0000 replaced by U+FFFD: PostgreSQL's
// text cannot hold it, and the stores must keep what clients were given
// (a turn's content is the concatenation of its deltas) alike. It returns
// s itself when s holds none.
func StorableText(s string) string {
	if strings.IndexByte(s, 0) < 0 {
		return s
	}
	return strings.ReplaceAll(s, "\x00", "\uFFFD")
}

// ValidID reports whether s may be used as a conversation, message or turn id:
// it must match ^[A-Za-z0-9_.:-]{1,128}$ (PROTOCOL.md "Identifiers").
func ValidID(s string) bool {
	if len(s) == 0 || len(s) > MaxIDLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9',
			c == '_', c == '.', c == ':', c == '-':
		default:
			return false
		}
	}
	return true
}

// Usage counts the model tokens a turn used, when the provider reports them.
type Usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
}

// Conversation is a thread of messages owned by one user.
type Conversation struct {
	ID        string
	Owner     string
	Title     string
	CreatedAt time.Time
	UpdatedAt time.Time
	// ActiveTurnID names the turn still queued or streaming, if any.
	ActiveTurnID string
}

// Message is one stored message. For an assistant message, ID equals TurnID
// and Status is the turn's status; a user message is always complete.
type Message struct {
	ID             string
	ConversationID string
	Role           Role
	Content        string
	Status         TurnStatus
	TurnID         string // the turn it started (user) or is (assistant)
	ReplyTo        string // assistant only: the user message it answers
	Model          string
	Error          string // assistant only: the human-readable error of a failed turn
	Seq            int64  // assistant only: the last delta's seq
	Usage          *Usage
	CreatedAt      time.Time
	FinishedAt     time.Time
}

// Turn is an assistant reply being (or having been) generated, with what the
// worker needs to produce it.
type Turn struct {
	ID             string
	ConversationID string
	Owner          string
	ReplyTo        string
	Model          string
	Status         TurnStatus
	Content        string
	Seq            int64
	Error          string
	Usage          *Usage
	CreatedAt      time.Time
	FinishedAt     time.Time
}

// Domain errors. Callers compare with errors.Is.
var (
	ErrNotFound  = errors.New("not found")
	ErrForbidden = errors.New("forbidden")
	ErrConflict  = errors.New("conflict")
	// The conflicts of a send's ids; each is an ErrConflict.
	ErrTurnIDTaken     = fmt.Errorf("%w: the turn id is already used by another turn", ErrConflict)
	ErrTurnIDOfMessage = fmt.Errorf("%w: the turn id is the id of a message of the conversation", ErrConflict)
	ErrMessageIDOfTurn = fmt.Errorf("%w: the message id is the id of an assistant message of the conversation", ErrConflict)
	ErrSameIDs         = fmt.Errorf("%w: the turn id equals the message id", ErrConflict)
	ErrTooManyTurns    = errors.New("too many turns running")
	// ErrUnavailable marks a store that could not be reached (its server
	// down or restarting): worth trying again, unlike a failure of the
	// request itself.
	ErrUnavailable = errors.New("the store is unavailable")
)

// TurnActiveError is returned when a conversation already has a turn that is
// queued or streaming.
type TurnActiveError struct {
	TurnID string
}

func (e *TurnActiveError) Error() string {
	return fmt.Sprintf("turn %s is still running", e.TurnID)
}
