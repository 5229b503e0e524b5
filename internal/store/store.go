// Package store defines the contract of tokenrelay's history store
// (conversations and messages) that the SQLite and PostgreSQL
// implementations share, with the migrations both apply.
package store

import (
	"context"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/chat"
)

// Store keeps conversations and their messages. Implementations are safe for
// concurrent use by many goroutines and processes (several gateways and
// workers may share one PostgreSQL database). Every method honours ctx.
//
// Errors: chat.ErrNotFound, chat.ErrForbidden, chat.ErrConflict,
// chat.ErrTooManyTurns and *chat.TurnActiveError as documented per method;
// anything else is an internal failure.
type Store interface {
	// ClaimConversation returns conversation id, creating it owned by owner
	// when it does not exist. It returns chat.ErrForbidden when another user
	// owns it.
	ClaimConversation(ctx context.Context, id, owner string, now time.Time) (chat.Conversation, error)

	// Conversation returns conversation id with ActiveTurnID set, or
	// chat.ErrNotFound.
	Conversation(ctx context.Context, id string) (chat.Conversation, error)

	// Conversations lists owner's conversations that hold at least one
	// message, most recently updated first, at most limit of them.
	Conversations(ctx context.Context, owner string, limit int) ([]chat.Conversation, error)

	// DeleteConversation deletes conversation id and all its messages. It
	// returns chat.ErrNotFound or chat.ErrForbidden (owner differs). The ids
	// of its turns stay taken (Send returns chat.ErrConflict for them)
	// until ForgetDeletedTurns lets them go.
	DeleteConversation(ctx context.Context, id, owner string) error

	// ForgetDeletedTurns lets sends take again the ids of turns deleted
	// before before, and returns how many it let go. The caller chooses
	// before past what the bus keeps of those turns.
	ForgetDeletedTurns(ctx context.Context, before time.Time) (int64, error)

	// Send stores a user message and its queued turn in one transaction.
	// When a message with req.MessageID already exists in the conversation it
	// stores nothing and returns the existing message and turn with
	// Duplicate set. Otherwise it returns chat.ErrForbidden (conversation of
	// another user), *chat.TurnActiveError (a turn of the conversation is
	// queued or streaming), chat.ErrConflict (one of the errors that wrap
	// it: req.MessageID is the id of an assistant message of the
	// conversation, req.TurnID equals req.MessageID, is already used by
	// another turn or is the id of a message of the conversation) or
	// chat.ErrTooManyTurns (req.MaxActiveTurns > 0 and the
	// owner already has that many turns queued or streaming). The
	// conversation is created when missing, titled after the first message.
	Send(ctx context.Context, req SendRequest) (SendResult, error)

	// Messages returns up to limit messages (all when limit <= 0) of
	// conversation id in the order they were stored, oldest first: the
	// newest ones, or when before is not empty the newest ones stored
	// before message before (chat.ErrNotFound if before is unknown). A
	// user message is stored before its reply; ids and times play no part
	// in the order.
	Messages(ctx context.Context, conversationID string, limit int, before string) ([]chat.Message, error)

	// MessageHeads is Messages(ctx, conversationID, limit, "") with every
	// message's Content left empty: for a reader that needs only the ids
	// and statuses, at a cost that does not grow with the answers' length.
	MessageHeads(ctx context.Context, conversationID string, limit int) ([]chat.Message, error)

	// Message returns one message of a conversation or chat.ErrNotFound.
	Message(ctx context.Context, conversationID, messageID string) (chat.Message, error)

	// Turn returns turn id (the assistant message) with the owner of its
	// conversation, or chat.ErrNotFound.
	Turn(ctx context.Context, id string) (chat.Turn, error)

	// TurnHead is Turn with Content left empty.
	TurnHead(ctx context.Context, id string) (chat.Turn, error)

	// ActiveTurn returns the conversation's turn that is queued or streaming,
	// or chat.ErrNotFound when there is none.
	ActiveTurn(ctx context.Context, conversationID string) (chat.Turn, error)

	// StartTurn moves turn id from queued to streaming. It reports false, and
	// changes nothing, when the turn is not queued (it was cancelled, or
	// another worker already started it), and chat.ErrNotFound when the turn
	// does not exist.
	StartTurn(ctx context.Context, id string, now time.Time) (bool, error)

	// FinishTurn ends a turn exactly once: when the turn is in one of from
	// (queued and streaming when from is empty) it stores r and returns
	// (r.Status, true); otherwise it changes nothing and returns the status
	// the turn already has and false. This conditional update is what makes
	// a cancel racing a natural end produce one terminal status everywhere.
	// The same r again, once it is the end stored (a call whose answer was
	// lost after it committed, repeated), returns (r.Status, true).
	FinishTurn(ctx context.Context, r TurnResult, from ...chat.TurnStatus) (chat.TurnStatus, bool, error)

	// UnfinishedTurns returns every turn still queued or streaming.
	UnfinishedTurns(ctx context.Context) ([]chat.Turn, error)

	// Ping checks that the store answers.
	Ping(ctx context.Context) error

	// Close releases the store's resources.
	Close() error
}

// SendRequest is a user message to store with the turn that answers it.
type SendRequest struct {
	ConversationID string
	Owner          string
	MessageID      string
	TurnID         string
	Text           string
	Model          string
	Now            time.Time
	// MaxActiveTurns limits the owner's turns queued or streaming at once
	// across all conversations; 0 means no limit.
	MaxActiveTurns int
}

// SendResult is what Send stored, or found when the message was a retry.
type SendResult struct {
	Message   chat.Message // the user message
	Turn      chat.Turn    // the turn answering it
	Duplicate bool         // the message existed already; nothing was stored
}

// TurnResult is the end of a turn.
type TurnResult struct {
	TurnID  string
	Status  chat.TurnStatus // a terminal status
	Content string
	Seq     int64
	Error   string
	Usage   *chat.Usage
	Now     time.Time
}
