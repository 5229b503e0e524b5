package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/store/sqlstore"
)

// DeleteConversation deletes conversation id and, by cascade, its messages,
// and keeps its turn ids in deleted_turns (see Send). It returns
// chat.ErrNotFound, or chat.ErrForbidden when owner differs.
func (s *DB) DeleteConversation(ctx context.Context, id, owner string) error {
	if err := s.deleteConversation(ctx, id, owner); err != nil {
		return fmt.Errorf("delete conversation: %w", err)
	}
	return nil
}

func (s *DB) deleteConversation(ctx context.Context, id, owner string) error {
	return dialect{s.pool}.InTx(ctx, func(ctx context.Context, tx sqlstore.Queryer) error {
		// The conversation's row lock first: a send under way holds it
		// (LockConversation), and once that send has committed, the
		// statements below, each reading what has committed when it
		// starts (READ COMMITTED), see its turn, whose id is then kept. A
		// single statement would read the messages as they were before
		// it waited for the lock, and forget that turn's id.
		var got string
		err := tx.QueryRow(ctx, `SELECT owner FROM conversations WHERE id = ? FOR UPDATE`, id).Scan(&got)
		switch {
		case errors.Is(err, pgx.ErrNoRows):
			return chat.ErrNotFound
		case err != nil:
			return err
		case got != owner:
			return chat.ErrForbidden
		}
		if _, err := tx.Exec(ctx, `INSERT INTO deleted_turns (turn_id, deleted_at)
			SELECT turn_id, ? FROM messages WHERE conversation_id = ? AND role = 'assistant'
			ON CONFLICT (turn_id) DO NOTHING`, time.Now().UnixMilli(), id); err != nil {
			return err
		}
		_, err = tx.Exec(ctx, `DELETE FROM conversations WHERE id = ?`, id)
		return err
	})
}
