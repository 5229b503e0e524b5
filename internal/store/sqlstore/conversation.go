package sqlstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/chat"
)

// ConversationColumns are the columns scanConversation reads, from
// conversations c; the last one is the id of its active turn, or NULL.
const ConversationColumns = `c.id, c.owner, c.title, c.created_at, c.updated_at,
	(SELECT m.id FROM messages m WHERE m.conversation_id = c.id AND ` + ActiveTurn + `
	 ORDER BY m.position DESC LIMIT 1)`

func scanConversation(r Scanner) (chat.Conversation, error) {
	var (
		c                chat.Conversation
		created, updated int64
		active           sql.NullString
	)
	if err := r.Scan(&c.ID, &c.Owner, &c.Title, &created, &updated, &active); err != nil {
		return chat.Conversation{}, err
	}
	c.CreatedAt = fromMillis(created)
	c.UpdatedAt = fromMillis(updated)
	c.ActiveTurnID = active.String
	return c, nil
}

// ClaimConversation returns conversation id, creating it untitled and owned by
// owner when it does not exist, or chat.ErrForbidden when another user owns
// it.
func (s *DB) ClaimConversation(ctx context.Context, id, owner string, now time.Time) (chat.Conversation, error) {
	c, err := s.claimConversation(ctx, id, owner, now)
	if err != nil {
		return chat.Conversation{}, fmt.Errorf("claim conversation: %w", err)
	}
	return c, nil
}

func (s *DB) claimConversation(ctx context.Context, id, owner string, now time.Time) (chat.Conversation, error) {
	if id == "" || owner == "" {
		return chat.Conversation{}, errors.New("empty conversation id or owner")
	}
	c, err := s.conversation(ctx, id)
	if errors.Is(err, chat.ErrNotFound) {
		// When another writer creates it meanwhile, the insert does nothing
		// and the read below names the owner that won.
		_, err = s.write.Exec(ctx, `INSERT INTO conversations (id, owner, title, created_at, updated_at)
			VALUES (?, ?, '', ?, ?) ON CONFLICT (id) DO NOTHING`, id, owner, millis(now), millis(now))
		if err != nil {
			return chat.Conversation{}, err
		}
		c, err = s.conversation(ctx, id)
	}
	if err != nil {
		return chat.Conversation{}, err
	}
	if c.Owner != owner {
		return chat.Conversation{}, chat.ErrForbidden
	}
	return c, nil
}

// Conversation returns conversation id with ActiveTurnID set, or
// chat.ErrNotFound.
func (s *DB) Conversation(ctx context.Context, id string) (chat.Conversation, error) {
	c, err := s.conversation(ctx, id)
	if err != nil {
		return chat.Conversation{}, fmt.Errorf("conversation: %w", err)
	}
	return c, nil
}

func (s *DB) conversation(ctx context.Context, id string) (chat.Conversation, error) {
	c, err := scanConversation(s.read.QueryRow(ctx,
		`SELECT `+ConversationColumns+` FROM conversations c WHERE c.id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return chat.Conversation{}, chat.ErrNotFound
	}
	return c, err
}

// Conversations lists owner's conversations that hold at least one message,
// most recently updated first (those updated in the same millisecond by
// their ids' bytes, descending), at most limit of them (all when limit <= 0).
func (s *DB) Conversations(ctx context.Context, owner string, limit int) ([]chat.Conversation, error) {
	cs, err := queryAll(ctx, s.read, scanConversation, `SELECT `+ConversationColumns+` FROM conversations c
		WHERE c.owner = ? AND EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id)
		ORDER BY c.updated_at DESC, c.id `+s.d.Bytewise()+` DESC LIMIT ?`, owner, s.limit(limit))
	if err != nil {
		return nil, fmt.Errorf("conversations: %w", err)
	}
	return cs, nil
}

// limit is the argument of LIMIT ? that returns at most n rows, or all when
// n <= 0.
func (s *DB) limit(n int) any {
	if n <= 0 {
		return s.d.NoLimit()
	}
	return n
}

// queryAll runs query on q and scans every row it returns with scan.
func queryAll[T any](ctx context.Context, q Queryer, scan func(Scanner) (T, error), query string, args ...any) ([]T, error) {
	rows, err := q.Query(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []T
	for rows.Next() {
		v, err := scan(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	return out, nil
}

// ForgetDeletedTurns implements [store.Store].
func (s *DB) ForgetDeletedTurns(ctx context.Context, before time.Time) (int64, error) {
	n, err := s.write.Exec(ctx, `DELETE FROM deleted_turns WHERE deleted_at < ?`, before.UnixMilli())
	if err != nil {
		return 0, fmt.Errorf("forget deleted turns: %w", err)
	}
	return n, nil
}
