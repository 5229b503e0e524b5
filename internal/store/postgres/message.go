package postgres

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/store"
)

// ownerLockSpace is the first key of the transaction advisory lock that
// serializes one owner's sends while Send counts the owner's active turns;
// the second key is hashtext(owner).
const ownerLockSpace int32 = 0x7472 // "tr"

// Send stores a user message and its queued turn in one transaction, with the
// errors and the Duplicate retry that [store.Store] documents. Checks come in
// this order: chat.ErrForbidden (so a retry never shows another user's
// message), the duplicate retry, *chat.TurnActiveError, chat.ErrConflict,
// chat.ErrTooManyTurns. An empty req.MessageID or req.TurnID is filled with a
// new UUIDv7; ids that chat.ValidID rejects are an error. The conversation is
// created when missing; it takes its title from the first message sent to it
// while its title is empty, and its updated_at from every send.
//
// Concurrent sends to one conversation queue on its row lock (SELECT … FOR
// UPDATE), so that the second sees the first's turn; with MaxActiveTurns
// set, one owner's sends also queue on an advisory lock for the count.
func (s *DB) Send(ctx context.Context, req store.SendRequest) (store.SendResult, error) {
	res, err := s.send(ctx, req)
	if err != nil {
		return store.SendResult{}, fmt.Errorf("send: %w", err)
	}
	return res, nil
}

func (s *DB) send(ctx context.Context, req store.SendRequest) (store.SendResult, error) {
	if err := fillIDs(&req); err != nil {
		return store.SendResult{}, err
	}
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return store.SendResult{}, err
	}
	defer tx.Rollback(context.WithoutCancel(ctx))

	now := millis(req.Now)
	// Create the conversation if need be, so that there is a row to lock.
	_, err = tx.Exec(ctx, `INSERT INTO conversations (id, owner, title, created_at, updated_at)
		VALUES ($1, $2, '', $3, $3) ON CONFLICT (id) DO NOTHING`, req.ConversationID, req.Owner, now)
	if err != nil {
		return store.SendResult{}, err
	}
	var owner string
	err = tx.QueryRow(ctx, `SELECT owner FROM conversations WHERE id = $1 FOR UPDATE`, req.ConversationID).Scan(&owner)
	if err != nil {
		// ErrNoRows too: deleted between the two statements.
		return store.SendResult{}, err
	}
	if owner != req.Owner {
		return store.SendResult{}, chat.ErrForbidden
	}

	// Under READ COMMITTED every statement from here on sees the sends that
	// committed while this one waited for the lock.
	prev, err := scanMessage(tx.QueryRow(ctx, `SELECT `+messageColumns+` FROM messages m
		WHERE m.conversation_id = $1 AND m.id = $2`, req.ConversationID, req.MessageID))
	switch {
	case err == nil && prev.Role == chat.RoleUser:
		t, err := scanTurn(tx.QueryRow(ctx, `SELECT `+turnColumns+`
			FROM messages m JOIN conversations c ON c.id = m.conversation_id
			WHERE m.turn_id = $1 AND m.role = 'assistant'`, prev.TurnID))
		if err != nil {
			return store.SendResult{}, fmt.Errorf("turn of duplicate message: %w", err)
		}
		return store.SendResult{Message: prev, Turn: t, Duplicate: true}, nil
	case err == nil:
		return store.SendResult{}, chat.ErrConflict // the id of an assistant message
	case !errors.Is(err, pgx.ErrNoRows):
		return store.SendResult{}, err
	}

	var active string
	err = tx.QueryRow(ctx, `SELECT m.id FROM messages m WHERE m.conversation_id = $1 AND `+activeTurn+`
		ORDER BY m.position DESC LIMIT 1`, req.ConversationID).Scan(&active)
	switch {
	case err == nil:
		return store.SendResult{}, &chat.TurnActiveError{TurnID: active}
	case !errors.Is(err, pgx.ErrNoRows):
		return store.SendResult{}, err
	}

	// A turn id taken by a send still in flight elsewhere passes this check;
	// the unique index then fails the insert below, mapped to ErrConflict.
	var used bool
	err = tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM messages WHERE turn_id = $1 AND role = 'assistant')
		OR EXISTS (SELECT 1 FROM messages WHERE conversation_id = $2 AND id = $1)`,
		req.TurnID, req.ConversationID).Scan(&used)
	if err != nil {
		return store.SendResult{}, err
	}
	if used || req.TurnID == req.MessageID {
		return store.SendResult{}, chat.ErrConflict
	}

	if req.MaxActiveTurns > 0 {
		// Taken after the conversation row, as every Send does, so that two
		// sends cannot wait for each other.
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1, hashtext($2))`, ownerLockSpace, req.Owner); err != nil {
			return store.SendResult{}, err
		}
		var n int
		err = tx.QueryRow(ctx, `SELECT count(*) FROM messages m JOIN conversations c ON c.id = m.conversation_id
			WHERE c.owner = $1 AND `+activeTurn, req.Owner).Scan(&n)
		if err != nil {
			return store.SendResult{}, err
		}
		if n >= req.MaxActiveTurns {
			return store.SendResult{}, chat.ErrTooManyTurns
		}
	}

	msg, turn := newMessages(req)
	// The user message is inserted first so that its position sorts it
	// before the reply.
	for _, m := range []chat.Message{msg, turn} {
		_, err = tx.Exec(ctx, `INSERT INTO messages (conversation_id, id, role, content, status, turn_id,
			reply_to, model, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)`,
			m.ConversationID, m.ID, string(m.Role), m.Content, string(m.Status), m.TurnID, m.ReplyTo, m.Model, now)
		if isUniqueViolation(err) {
			return store.SendResult{}, chat.ErrConflict
		}
		if err != nil {
			return store.SendResult{}, err
		}
	}
	_, err = tx.Exec(ctx, `UPDATE conversations SET updated_at = $1,
		title = CASE WHEN title = '' THEN $2 ELSE title END WHERE id = $3`,
		now, titleFor(req.Text), req.ConversationID)
	if err != nil {
		return store.SendResult{}, err
	}
	if err := tx.Commit(ctx); err != nil {
		return store.SendResult{}, err
	}
	return store.SendResult{Message: msg, Turn: turnOf(turn, req.Owner)}, nil
}

// fillIDs gives req new UUIDv7 ids where it has none and checks the rest.
func fillIDs(req *store.SendRequest) error {
	for _, id := range []*string{&req.MessageID, &req.TurnID} {
		if *id != "" {
			continue
		}
		u, err := uuid.NewV7()
		if err != nil {
			return fmt.Errorf("new id: %w", err)
		}
		*id = u.String()
	}
	for _, id := range []string{req.ConversationID, req.MessageID, req.TurnID} {
		if !chat.ValidID(id) {
			return fmt.Errorf("invalid id %q", id)
		}
	}
	if req.Owner == "" {
		return errors.New("empty owner")
	}
	return nil
}

// newMessages are the user message and the queued assistant message that
// req stores, as Send returns them.
func newMessages(req store.SendRequest) (msg, turn chat.Message) {
	now := fromMillis(millis(req.Now)) // the precision stored
	msg = chat.Message{
		ID:             req.MessageID,
		ConversationID: req.ConversationID,
		Role:           chat.RoleUser,
		Content:        req.Text,
		Status:         chat.StatusComplete,
		TurnID:         req.TurnID,
		Model:          req.Model,
		CreatedAt:      now,
	}
	turn = chat.Message{
		ID:             req.TurnID,
		ConversationID: req.ConversationID,
		Role:           chat.RoleAssistant,
		Status:         chat.StatusQueued,
		TurnID:         req.TurnID,
		ReplyTo:        req.MessageID,
		Model:          req.Model,
		CreatedAt:      now,
	}
	return msg, turn
}

// Messages returns up to limit messages (all when limit <= 0) of conversation
// conversationID, oldest first: the newest ones, or when before is not empty
// the newest ones stored before message before (chat.ErrNotFound if the
// conversation has no message before). An unknown conversation has no
// messages.
func (s *DB) Messages(ctx context.Context, conversationID string, limit int, before string) ([]chat.Message, error) {
	ms, err := s.messages(ctx, conversationID, limit, before)
	if err != nil {
		return nil, fmt.Errorf("messages: %w", err)
	}
	return ms, nil
}

func (s *DB) messages(ctx context.Context, conversationID string, limit int, before string) ([]chat.Message, error) {
	var lim *int // NULL: no limit
	if limit > 0 {
		lim = &limit
	}
	pos := int64(math.MaxInt64)
	if before != "" {
		// Positions only grow, so reading before's position outside the
		// page's snapshot cannot change which messages precede it.
		err := s.pool.QueryRow(ctx, `SELECT position FROM messages WHERE conversation_id = $1 AND id = $2`,
			conversationID, before).Scan(&pos)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil, fmt.Errorf("before %q: %w", before, chat.ErrNotFound)
		}
		if err != nil {
			return nil, err
		}
	}
	rows, err := s.pool.Query(ctx, `SELECT `+messageColumns+` FROM messages m
		WHERE m.conversation_id = $1 AND m.position < $2 ORDER BY m.position DESC LIMIT $3`,
		conversationID, pos, lim)
	if err != nil {
		return nil, err
	}
	ms, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (chat.Message, error) {
		return scanMessage(r)
	})
	if err != nil {
		return nil, err
	}
	slices.Reverse(ms)
	return ms, nil
}

// Message returns message messageID of conversation conversationID, or
// chat.ErrNotFound.
func (s *DB) Message(ctx context.Context, conversationID, messageID string) (chat.Message, error) {
	m, err := scanMessage(s.pool.QueryRow(ctx, `SELECT `+messageColumns+` FROM messages m
		WHERE m.conversation_id = $1 AND m.id = $2`, conversationID, messageID))
	if errors.Is(err, pgx.ErrNoRows) {
		err = chat.ErrNotFound
	}
	if err != nil {
		return chat.Message{}, fmt.Errorf("message: %w", err)
	}
	return m, nil
}
