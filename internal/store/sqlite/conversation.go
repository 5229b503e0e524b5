package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/chat"
)

// DeleteConversation deletes conversation id and, by cascade, its messages,
// and keeps its turn ids in deleted_turns (see Send). It returns
// chat.ErrNotFound, or chat.ErrForbidden when owner differs. The owner check
// and the delete are one write, so no other writer comes between them.
func (s *DB) DeleteConversation(ctx context.Context, id, owner string) error {
	if err := s.deleteConversation(ctx, id, owner); err != nil {
		return fmt.Errorf("delete conversation: %w", err)
	}
	return nil
}

func (s *DB) deleteConversation(ctx context.Context, id, owner string) error {
	return s.d.w.do(ctx, func(ctx context.Context, q conn) error {
		var got string
		err := q.QueryRow(ctx, `SELECT owner FROM conversations WHERE id = ?`, id).Scan(&got)
		switch {
		case errors.Is(err, sql.ErrNoRows):
			return chat.ErrNotFound
		case err != nil:
			return err
		case got != owner:
			return chat.ErrForbidden
		}
		_, err = q.Exec(ctx, `INSERT INTO deleted_turns (turn_id, deleted_at)
			SELECT turn_id, ? FROM messages WHERE conversation_id = ? AND role = 'assistant'
			ON CONFLICT (turn_id) DO NOTHING`, time.Now().UnixMilli(), id)
		if err != nil {
			return err
		}
		_, err = q.Exec(ctx, `DELETE FROM conversations WHERE id = ?`, id)
		return err
	})
}
