package sqlstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/store"
)

// Turn returns turn id (the assistant message) with the owner of its
// conversation, or chat.ErrNotFound.
func (s *DB) Turn(ctx context.Context, id string) (chat.Turn, error) {
	return s.turn(ctx, TurnColumns, id)
}

// TurnHead is Turn without reading the turn's content.
func (s *DB) TurnHead(ctx context.Context, id string) (chat.Turn, error) {
	return s.turn(ctx, TurnHeadColumns, id)
}

func (s *DB) turn(ctx context.Context, columns, id string) (chat.Turn, error) {
	t, err := scanTurn(s.read.QueryRow(ctx, `SELECT `+columns+`
		FROM messages m JOIN conversations c ON c.id = m.conversation_id
		WHERE m.turn_id = ? AND m.role = 'assistant'`, id))
	if errors.Is(err, sql.ErrNoRows) {
		err = chat.ErrNotFound
	}
	if err != nil {
		return chat.Turn{}, fmt.Errorf("turn: %w", err)
	}
	return t, nil
}

// ActiveTurn returns the conversation's turn that is queued or streaming, or
// chat.ErrNotFound when there is none.
func (s *DB) ActiveTurn(ctx context.Context, conversationID string) (chat.Turn, error) {
	t, err := scanTurn(s.read.QueryRow(ctx, `SELECT `+TurnColumns+`
		FROM messages m JOIN conversations c ON c.id = m.conversation_id
		WHERE m.conversation_id = ? AND `+ActiveTurn+` ORDER BY m.position DESC LIMIT 1`, conversationID))
	if errors.Is(err, sql.ErrNoRows) {
		err = chat.ErrNotFound
	}
	if err != nil {
		return chat.Turn{}, fmt.Errorf("active turn: %w", err)
	}
	return t, nil
}

// StartTurn moves turn id from queued to streaming. It reports false, and
// changes nothing, when the turn is not queued, and chat.ErrNotFound when the
// turn does not exist. The schema keeps no start time, so now is unused.
func (s *DB) StartTurn(ctx context.Context, id string, now time.Time) (bool, error) {
	ok, err := s.startTurn(ctx, id)
	if err != nil {
		return false, fmt.Errorf("start turn: %w", err)
	}
	return ok, nil
}

func (s *DB) startTurn(ctx context.Context, id string) (bool, error) {
	n, err := s.write.Exec(ctx, `UPDATE messages SET status = 'streaming'
		WHERE turn_id = ? AND role = 'assistant' AND status = 'queued'`, id)
	if err != nil || n == 1 {
		return n == 1, err
	}
	if _, err := s.turnStatus(ctx, id); err != nil {
		return false, err
	}
	return false, nil
}

// turnStatus returns turn id's status or chat.ErrNotFound. It reads through
// the writer so that it sees what the writer just did.
func (s *DB) turnStatus(ctx context.Context, id string) (chat.TurnStatus, error) {
	var st chat.TurnStatus
	err := s.write.QueryRow(ctx, `SELECT status FROM messages
		WHERE turn_id = ? AND role = 'assistant'`, id).Scan(&st)
	if errors.Is(err, sql.ErrNoRows) {
		return "", chat.ErrNotFound
	}
	return st, err
}

// FinishTurn ends a turn exactly once: when the turn is in one of from
// (queued and streaming when from is empty) it stores r and returns
// (r.Status, true); otherwise it changes nothing and returns the status the
// turn already has and false, or chat.ErrNotFound. r.Status must be terminal
// and from may name only queued and streaming. The same r again (a call
// whose answer was lost, repeated) returns (r.Status, true) once it is the
// end stored.
//
// The UPDATE's condition is checked under the row's write lock, so of two
// concurrent calls exactly one changes the turn.
func (s *DB) FinishTurn(ctx context.Context, r store.TurnResult, from ...chat.TurnStatus) (chat.TurnStatus, bool, error) {
	st, ok, err := s.finishTurn(ctx, r, from)
	if err != nil {
		return "", false, fmt.Errorf("finish turn: %w", err)
	}
	return st, ok, nil
}

func (s *DB) finishTurn(ctx context.Context, r store.TurnResult, from []chat.TurnStatus) (chat.TurnStatus, bool, error) {
	if err := checkFinish(r, from); err != nil {
		return "", false, err
	}
	// The turn's end goes live once this is stored: somebody may be
	// waiting on it (a Stop), and later sends and starts can wait.
	ctx = WithPriority(ctx)
	if len(from) == 0 {
		from = []chat.TurnStatus{chat.StatusQueued, chat.StatusStreaming}
	}
	var prompt, completion sql.NullInt64
	if r.Usage != nil {
		prompt = sql.NullInt64{Int64: int64(r.Usage.PromptTokens), Valid: true}
		completion = sql.NullInt64{Int64: int64(r.Usage.CompletionTokens), Valid: true}
	}
	args := []any{r.Status, r.Content, r.Seq, r.Error, prompt, completion, nullMillis(r.Now), r.TurnID}
	for _, st := range from {
		args = append(args, st)
	}
	n, err := s.write.Exec(ctx, `UPDATE messages SET status = ?, content = ?, seq = ?, error = ?,
		prompt_tokens = ?, completion_tokens = ?, finished_at = ?
		WHERE turn_id = ? AND role = 'assistant' AND status IN (?`+strings.Repeat(", ?", len(from)-1)+`)`, args...)
	if err != nil {
		return "", false, err
	}
	if n == 1 {
		return r.Status, true, nil
	}
	// The end stored may be this very one: a try whose answer was lost
	// (its deadline cut it off, its connection broke) after the UPDATE
	// committed, repeated. It won; told otherwise, its caller would take
	// its own end for another's. Another end differs in its time at least
	// (an end without one cannot be told apart, and is taken for another).
	if r.Now.IsZero() {
		st, err := s.turnStatus(ctx, r.TurnID)
		return st, false, err
	}
	var st chat.TurnStatus
	var same bool
	err = s.write.QueryRow(ctx, `SELECT status, (status = ? AND content = ? AND seq = ? AND error = ?
		AND finished_at IS NOT NULL AND finished_at = ?) FROM messages
		WHERE turn_id = ? AND role = 'assistant'`, r.Status, r.Content, r.Seq, r.Error, r.Now.UnixMilli(), r.TurnID).Scan(&st, &same)
	if errors.Is(err, sql.ErrNoRows) {
		return "", false, chat.ErrNotFound
	}
	if err != nil {
		return "", false, err
	}
	return st, same, nil
}

// checkFinish rejects a result that would not end the turn, or would end it a
// second time.
func checkFinish(r store.TurnResult, from []chat.TurnStatus) error {
	if !r.Status.Terminal() {
		return fmt.Errorf("status %q is not terminal", r.Status)
	}
	for _, st := range from {
		if st != chat.StatusQueued && st != chat.StatusStreaming {
			return fmt.Errorf("cannot finish from status %q", st)
		}
	}
	return nil
}

// UnfinishedTurns returns every turn still queued or streaming, oldest
// first.
func (s *DB) UnfinishedTurns(ctx context.Context) ([]chat.Turn, error) {
	ts, err := queryAll(ctx, s.read, scanTurn, `SELECT `+TurnColumns+`
		FROM messages m JOIN conversations c ON c.id = m.conversation_id
		WHERE `+ActiveTurn+` ORDER BY m.created_at, m.position`)
	if err != nil {
		return nil, fmt.Errorf("unfinished turns: %w", err)
	}
	return ts, nil
}
