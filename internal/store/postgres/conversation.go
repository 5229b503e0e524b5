package postgres

import (
	"context"
	"fmt"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/chat"
)

// DeleteConversation deletes conversation id and, by cascade, its messages,
// and keeps its turn ids in deleted_turns (see Send). It returns
// chat.ErrNotFound, or chat.ErrForbidden when owner differs. One statement
// deletes, checks the owner and keeps the ids (its parts see the rows as
// they were before it); only when it deletes nothing does a second one look
// for the reason.
func (s *DB) DeleteConversation(ctx context.Context, id, owner string) error {
	if err := s.deleteConversation(ctx, id, owner); err != nil {
		return fmt.Errorf("delete conversation: %w", err)
	}
	return nil
}

func (s *DB) deleteConversation(ctx context.Context, id, owner string) error {
	var deleted bool
	err := s.pool.QueryRow(ctx, `WITH gone AS (
			DELETE FROM conversations WHERE id = $1 AND owner = $2 RETURNING id
		), kept AS (
			INSERT INTO deleted_turns (turn_id, deleted_at)
			SELECT m.turn_id, $3 FROM messages m JOIN gone ON m.conversation_id = gone.id
			WHERE m.role = 'assistant'
			ON CONFLICT (turn_id) DO NOTHING
		)
		SELECT EXISTS (SELECT 1 FROM gone)`, id, owner, time.Now().UnixMilli()).Scan(&deleted)
	if err != nil {
		return unreachable(err)
	}
	if deleted {
		return nil
	}
	var exists bool
	if err := s.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM conversations WHERE id = $1)`, id).Scan(&exists); err != nil {
		return unreachable(err)
	}
	if exists {
		return chat.ErrForbidden
	}
	return chat.ErrNotFound
}
