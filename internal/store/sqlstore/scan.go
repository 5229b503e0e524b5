package sqlstore

import (
	"database/sql"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/tokenrelay/tokenrelay/internal/chat"
)

// ActiveTurn selects the assistant messages whose turn is queued or
// streaming. It repeats the predicate of the messages_active partial index
// word for word: SQLite uses that index only when it does, and PostgreSQL is
// glad of it.
const ActiveTurn = `m.role = 'assistant' AND m.status IN ('queued', 'streaming')`

// MessageColumns are the columns scanMessage reads, from messages m.
const MessageColumns = `m.conversation_id, m.id, m.role, m.content, m.status, m.turn_id, m.reply_to,
	m.model, m.error, m.seq, m.prompt_tokens, m.completion_tokens, m.created_at, m.finished_at`

// TurnColumns are the columns scanTurn reads, from messages m joined with
// conversations c.
const TurnColumns = MessageColumns + `, c.owner`

// HeadColumns and TurnHeadColumns are MessageColumns and TurnColumns with
// an empty string in the content's place.
var (
	HeadColumns     = strings.Replace(MessageColumns, "m.content", "''", 1)
	TurnHeadColumns = strings.Replace(TurnColumns, "m.content", "''", 1)
)

func scanMessage(r Scanner, extra ...any) (chat.Message, error) {
	var (
		m                  chat.Message
		prompt, completion sql.NullInt64
		created            int64
		finished           sql.NullInt64
	)
	dest := append([]any{&m.ConversationID, &m.ID, &m.Role, &m.Content, &m.Status, &m.TurnID, &m.ReplyTo,
		&m.Model, &m.Error, &m.Seq, &prompt, &completion, &created, &finished}, extra...)
	if err := r.Scan(dest...); err != nil {
		return chat.Message{}, err
	}
	if prompt.Valid || completion.Valid {
		m.Usage = &chat.Usage{PromptTokens: int(prompt.Int64), CompletionTokens: int(completion.Int64)}
	}
	m.CreatedAt = fromMillis(created)
	if finished.Valid {
		m.FinishedAt = fromMillis(finished.Int64)
	}
	return m, nil
}

func scanTurn(r Scanner) (chat.Turn, error) {
	var owner string
	m, err := scanMessage(r, &owner)
	if err != nil {
		return chat.Turn{}, err
	}
	return turnOf(m, owner), nil
}

// turnOf is the turn that assistant message m is.
func turnOf(m chat.Message, owner string) chat.Turn {
	return chat.Turn{
		ID:             m.ID,
		ConversationID: m.ConversationID,
		Owner:          owner,
		ReplyTo:        m.ReplyTo,
		Model:          m.Model,
		Status:         m.Status,
		Content:        m.Content,
		Seq:            m.Seq,
		Error:          m.Error,
		Usage:          m.Usage,
		CreatedAt:      m.CreatedAt,
		FinishedAt:     m.FinishedAt,
	}
}

// millis is how times are stored: unix milliseconds.
func millis(t time.Time) int64 { return t.UnixMilli() }

// nullMillis stores the zero time as NULL.
func nullMillis(t time.Time) sql.NullInt64 {
	if t.IsZero() {
		return sql.NullInt64{}
	}
	return sql.NullInt64{Int64: t.UnixMilli(), Valid: true}
}

func fromMillis(ms int64) time.Time { return time.UnixMilli(ms).UTC() }

// maxTitleRunes bounds a conversation title made from its first message.
const maxTitleRunes = 80

// titleFor makes a conversation title from the text of its first message:
// whitespace collapsed, and when too long cut at a word boundary (or
// mid-word when a word is very long) with an ellipsis, never inside a
// UTF-8 sequence.
func titleFor(text string) string {
	t := strings.Join(strings.Fields(text), " ")
	if utf8.RuneCountInString(t) <= maxTitleRunes {
		return t
	}
	r := []rune(t)[:maxTitleRunes-1]
	if i := lastSpace(r); i >= maxTitleRunes/2 {
		r = r[:i]
	}
	return strings.TrimRight(string(r), " ") + "…"
}

func lastSpace(r []rune) int {
	for i := len(r) - 1; i >= 0; i-- {
		if r[i] == ' ' {
			return i
		}
	}
	return -1
}
