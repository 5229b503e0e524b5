package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"

	"github.com/tokenrelay/tokenrelay/internal/chat"
)

// DeleteConversation deletes conversation id and, by cascade, its messages.
// It returns chat.ErrNotFound, or chat.ErrForbidden when owner differs. The
// owner check and the delete share one IMMEDIATE transaction, so no other
// writer comes between them.
func (s *DB) DeleteConversation(ctx context.Context, id, owner string) error {
	if err := s.deleteConversation(ctx, id, owner); err != nil {
		return fmt.Errorf("delete conversation: %w", err)
	}
	return nil
}

func (s *DB) deleteConversation(ctx context.Context, id, owner string) error {
	if err := s.d.gate.enter(ctx); err != nil {
		return err
	}
	defer s.d.gate.leave()
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
