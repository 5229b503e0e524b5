package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/chat"
)

// conversationColumns are the columns scanConversation reads, from
// conversations c; the last one is the id of its active turn, or NULL.
const conversationColumns = `c.id, c.owner, c.title, c.created_at, c.updated_at,
	(SELECT m.id FROM messages m WHERE m.conversation_id = c.id AND ` + activeTurn + `
	 ORDER BY m.position DESC LIMIT 1)`

func scanConversation(r scanner) (chat.Conversation, error) {
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
	c, err := s.conversation(ctx, s.read, id)
	if errors.Is(err, chat.ErrNotFound) {
		// INSERT OR IGNORE: another writer may have created it meanwhile, and
		// the read below then names the owner that won.
		_, err = s.write.ExecContext(ctx, `INSERT INTO conversations (id, owner, title, created_at, updated_at)
			VALUES (?, ?, '', ?, ?) ON CONFLICT (id) DO NOTHING`, id, owner, millis(now), millis(now))
		if err != nil {
			return chat.Conversation{}, err
		}
		c, err = s.conversation(ctx, s.read, id)
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
	c, err := s.conversation(ctx, s.read, id)
	if err != nil {
		return chat.Conversation{}, fmt.Errorf("conversation: %w", err)
	}
	return c, nil
}

type querier interface {
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

func (s *DB) conversation(ctx context.Context, q querier, id string) (chat.Conversation, error) {
	c, err := scanConversation(q.QueryRowContext(ctx,
		`SELECT `+conversationColumns+` FROM conversations c WHERE c.id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return chat.Conversation{}, chat.ErrNotFound
	}
	return c, err
}

// Conversations lists owner's conversations that hold at least one message,
// most recently updated first, at most limit of them (all when limit <= 0).
func (s *DB) Conversations(ctx context.Context, owner string, limit int) ([]chat.Conversation, error) {
	if limit <= 0 {
		limit = -1 // no limit in SQLite
	}
	rows, err := s.read.QueryContext(ctx, `SELECT `+conversationColumns+` FROM conversations c
		WHERE c.owner = ? AND EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id)
		ORDER BY c.updated_at DESC, c.id DESC LIMIT ?`, owner, limit)
	if err != nil {
		return nil, fmt.Errorf("conversations: %w", err)
	}
	defer rows.Close()
	var cs []chat.Conversation
	for rows.Next() {
		c, err := scanConversation(rows)
		if err != nil {
			return nil, fmt.Errorf("conversations: %w", err)
		}
		cs = append(cs, c)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("conversations: %w", err)
	}
	return cs, nil
}

// DeleteConversation deletes conversation id and, by cascade, its messages.
// It returns chat.ErrNotFound, or chat.ErrForbidden when owner differs.
func (s *DB) DeleteConversation(ctx context.Context, id, owner string) error {
	if err := s.deleteConversation(ctx, id, owner); err != nil {
		return fmt.Errorf("delete conversation: %w", err)
	}
	return nil
}

func (s *DB) deleteConversation(ctx context.Context, id, owner string) error {
	tx, err := s.write.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	var got string
	err = tx.QueryRowContext(ctx, `SELECT owner FROM conversations WHERE id = ?`, id).Scan(&got)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return chat.ErrNotFound
	case err != nil:
		return err
	case got != owner:
		return chat.ErrForbidden
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM conversations WHERE id = ?`, id); err != nil {
		return err
	}
	return tx.Commit()
}
