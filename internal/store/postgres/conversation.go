package postgres

import (
	"context"
	"fmt"

	"github.com/tokenrelay/tokenrelay/internal/chat"
)

// DeleteConversation deletes conversation id and, by cascade, its messages.
// It returns chat.ErrNotFound, or chat.ErrForbidden when owner differs. One
// statement deletes and checks the owner; only when it deletes nothing does a
// second one look for the reason.
func (s *DB) DeleteConversation(ctx context.Context, id, owner string) error {
	if err := s.deleteConversation(ctx, id, owner); err != nil {
		return fmt.Errorf("delete conversation: %w", err)
	}
	return nil
}

func (s *DB) deleteConversation(ctx context.Context, id, owner string) error {
	tag, err := s.pool.Exec(ctx, `DELETE FROM conversations WHERE id = $1 AND owner = $2`, id, owner)
	if err != nil {
		return err
	}
	if tag.RowsAffected() == 1 {
		return nil
	}
	var exists bool
	if err := s.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM conversations WHERE id = $1)`, id).Scan(&exists); err != nil {
		return err
	}
	if exists {
		return chat.ErrForbidden
	}
	return chat.ErrNotFound
}
