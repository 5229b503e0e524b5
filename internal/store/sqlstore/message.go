package sqlstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/google/uuid"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/store"
)

// Send stores a user message and its queued turn in one transaction, with the
// errors and the Duplicate retry that [store.Store] documents. Checks come in
// this order: chat.ErrForbidden (so a retry never shows another user's
// message), the duplicate retry, chat.ErrMessageIDOfTurn,
// *chat.TurnActiveError, chat.ErrSameIDs, chat.ErrTurnIDTaken,
// chat.ErrTurnIDOfMessage, chat.ErrTooManyTurns. An empty req.MessageID or req.TurnID is filled with a
// new UUIDv7; ids that chat.ValidID rejects are an error. The conversation is
// created when missing; it takes its title from the first message sent to it
// while its title is empty, and its updated_at from every send: req.Now, or
// the conversation's updated_at when req.Now is earlier (the messages are
// stamped with the same time).
//
// The dialect's InTx and LockConversation keep concurrent sends to one
// conversation from passing the checks together; with MaxActiveTurns set,
// its LockOwner does the same for one owner's sends.
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
	var res store.SendResult
	err := s.d.InTx(ctx, func(ctx context.Context, tx Queryer) (err error) {
		res, err = sendIn(ctx, s.d, tx, req)
		return err
	})
	if err != nil && s.d.MayHaveCommitted(err) {
		if res, ok := s.storedAfterAll(ctx, req); ok {
			return res, nil
		}
	}
	if err != nil {
		return store.SendResult{}, err
	}
	return res, nil
}

// commitCheckTimeout bounds storedAfterAll.
const commitCheckTimeout = 5 * time.Second

// errNotStoredBefore rolls back storedAfterAll's transaction.
var errNotStoredBefore = errors.New("the send was not stored")

// storedAfterAll answers a send whose COMMIT's answer was lost (the
// request's deadline cut it off, the connection broke) and which may have
// committed all the same. An error would tell the client that nothing was
// stored, and a turn stored then would stay queued with no job: the
// gateway announces and enqueues a turn only once Send answers, and the
// client's retry would find the pair a duplicate, which starts nothing.
// So the send is run again, within commitCheckTimeout of its own: its
// conversation's lock (or, for a new conversation, the unique key of the
// row the first run inserted) makes it wait until the first run's
// transaction has ended, and it then finds the pair stored, and answers it
// as this send's, or stores nothing (it is rolled back) and reports false.
func (s *DB) storedAfterAll(ctx context.Context, req store.SendRequest) (store.SendResult, bool) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), commitCheckTimeout)
	defer cancel()
	var res store.SendResult
	err := s.d.InTx(ctx, func(ctx context.Context, tx Queryer) error {
		r, err := sendIn(ctx, s.d, tx, req)
		if err != nil {
			return err
		}
		if !r.Duplicate || r.Turn.ID != req.TurnID {
			return errNotStoredBefore
		}
		res = r
		return nil
	})
	if err != nil && !s.d.MayHaveCommitted(err) { // a COMMIT of no write changes nothing
		return store.SendResult{}, false
	}
	res.Duplicate = false
	return res, true
}

// sendIn is Send's checks and writes, in its transaction.
func sendIn(ctx context.Context, d Dialect, tx Queryer, req store.SendRequest) (store.SendResult, error) {
	now := millis(req.Now)
	owner, updated, err := d.LockConversation(ctx, tx, req.ConversationID, req.Owner, now)
	if err != nil {
		return store.SendResult{}, err
	}
	if owner != req.Owner {
		return store.SendResult{}, chat.ErrForbidden
	}
	if updated > now {
		// The clock that stamps this send (another gateway's, or one set
		// back) is behind the one that stamped the conversation last: the
		// send takes that time, so that updated_at never goes back and
		// created_at never decreases along the history.
		now = updated
		req.Now = fromMillis(now)
	}

	// Whether the message id is taken, whether a turn is active and
	// whether the turn id is taken, in one statement; the checks then come
	// in the order Send documents.
	var prevRole, active sql.NullString
	var turnUsed, messageUsed bool
	err = tx.QueryRow(ctx, SendChecks,
		req.ConversationID, req.MessageID, req.ConversationID, req.TurnID, req.TurnID, req.ConversationID, req.TurnID,
	).Scan(&prevRole, &active, &turnUsed, &messageUsed)
	if err != nil {
		return store.SendResult{}, err
	}
	switch {
	case prevRole.Valid && chat.Role(prevRole.String) == chat.RoleUser:
		return duplicate(ctx, tx, req)
	case prevRole.Valid:
		return store.SendResult{}, chat.ErrMessageIDOfTurn
	case active.Valid:
		return store.SendResult{}, &chat.TurnActiveError{TurnID: active.String}
	case req.TurnID == req.MessageID:
		return store.SendResult{}, chat.ErrSameIDs
	case turnUsed:
		// Where a turn id taken by a send still in flight elsewhere passes
		// this check, the unique index fails the insert below, mapped to
		// the same error.
		return store.SendResult{}, chat.ErrTurnIDTaken
	case messageUsed:
		return store.SendResult{}, chat.ErrTurnIDOfMessage
	}

	if req.MaxActiveTurns > 0 {
		// Locked after the conversation, as every Send does, so that two
		// sends cannot wait for each other.
		if err := d.LockOwner(ctx, tx, req.Owner); err != nil {
			return store.SendResult{}, err
		}
		var n int
		err = tx.QueryRow(ctx, `SELECT count(*) FROM messages m JOIN conversations c ON c.id = m.conversation_id
			WHERE c.owner = ? AND `+ActiveTurn, req.Owner).Scan(&n)
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
			reply_to, model, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
			m.ConversationID, m.ID, m.Role, m.Content, m.Status, m.TurnID, m.ReplyTo, m.Model, now)
		if d.IsUniqueViolation(err) {
			// Only the turn's id can be taken meanwhile: sends to this
			// conversation wait for this one.
			return store.SendResult{}, chat.ErrTurnIDTaken
		}
		if err != nil {
			return store.SendResult{}, err
		}
	}
	_, err = tx.Exec(ctx, `UPDATE conversations SET updated_at = ?,
		title = CASE WHEN title = '' THEN ? ELSE title END WHERE id = ?`,
		now, titleFor(req.Text), req.ConversationID)
	if err != nil {
		return store.SendResult{}, err
	}
	return store.SendResult{Message: msg, Turn: turnOf(turn, req.Owner)}, nil
}

// SendChecks reads what Send checks before it stores, for conversation c,
// message id m and turn id t (arguments c, m, c, t, t, c, t): the role of
// the message already stored as m (NULL when none), the conversation's
// active turn (NULL when none), whether t is already a turn or was a turn
// of a deleted conversation, and whether t is a message of c.
const SendChecks = `SELECT
	(SELECT m.role FROM messages m WHERE m.conversation_id = ? AND m.id = ?),
	(SELECT m.id FROM messages m WHERE m.conversation_id = ? AND ` + ActiveTurn + `
		ORDER BY m.position DESC LIMIT 1),
	EXISTS (SELECT 1 FROM messages WHERE turn_id = ? AND role = 'assistant')
		OR EXISTS (SELECT 1 FROM deleted_turns WHERE turn_id = ?),
	EXISTS (SELECT 1 FROM messages WHERE conversation_id = ? AND id = ?)`

// duplicate answers a send whose message is already stored, as a user
// message: a retry, which gets the stored message and its turn.
func duplicate(ctx context.Context, tx Queryer, req store.SendRequest) (store.SendResult, error) {
	prev, err := scanMessage(tx.QueryRow(ctx, `SELECT `+MessageColumns+` FROM messages m
		WHERE m.conversation_id = ? AND m.id = ?`, req.ConversationID, req.MessageID))
	if err != nil {
		return store.SendResult{}, fmt.Errorf("duplicate message: %w", err)
	}
	t, err := scanTurn(tx.QueryRow(ctx, `SELECT `+TurnColumns+`
		FROM messages m JOIN conversations c ON c.id = m.conversation_id
		WHERE m.turn_id = ? AND m.role = 'assistant'`, prev.TurnID))
	if err != nil {
		return store.SendResult{}, fmt.Errorf("turn of duplicate message: %w", err)
	}
	return store.SendResult{Message: prev, Turn: t, Duplicate: true}, nil
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
	ms, err := s.messages(ctx, MessageColumns, conversationID, limit, before)
	if err != nil {
		return nil, fmt.Errorf("messages: %w", err)
	}
	return ms, nil
}

// MessageHeads is Messages of the newest messages without reading their
// content.
func (s *DB) MessageHeads(ctx context.Context, conversationID string, limit int) ([]chat.Message, error) {
	ms, err := s.messages(ctx, HeadColumns, conversationID, limit, "")
	if err != nil {
		return nil, fmt.Errorf("message heads: %w", err)
	}
	return ms, nil
}

func (s *DB) messages(ctx context.Context, columns, conversationID string, limit int, before string) ([]chat.Message, error) {
	scan := func(r Scanner) (chat.Message, error) { return scanMessage(r) }
	var ms []chat.Message
	var err error
	if before == "" {
		ms, err = queryAll(ctx, s.read, scan, `SELECT `+columns+` FROM messages m
			WHERE m.conversation_id = ? ORDER BY m.position DESC LIMIT ?`,
			conversationID, s.limit(limit))
	} else {
		// One statement reads before's position and the page, so both come
		// from one snapshot. A page is found only when before is.
		ms, err = queryAll(ctx, s.read, scan, `SELECT `+columns+` FROM messages m
			WHERE m.conversation_id = ? AND m.position <
				(SELECT b.position FROM messages b WHERE b.conversation_id = ? AND b.id = ?)
			ORDER BY m.position DESC LIMIT ?`,
			conversationID, conversationID, before, s.limit(limit))
		if err == nil && len(ms) == 0 {
			err = s.mustHave(ctx, conversationID, before)
		}
	}
	if err != nil {
		return nil, err
	}
	slices.Reverse(ms)
	return ms, nil
}

// mustHave returns chat.ErrNotFound unless conversationID has message id.
func (s *DB) mustHave(ctx context.Context, conversationID, id string) error {
	var found bool
	err := s.read.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM messages WHERE conversation_id = ? AND id = ?)`,
		conversationID, id).Scan(&found)
	if err == nil && !found {
		err = fmt.Errorf("before %q: %w", id, chat.ErrNotFound)
	}
	return err
}

// Message returns message messageID of conversation conversationID, or
// chat.ErrNotFound.
func (s *DB) Message(ctx context.Context, conversationID, messageID string) (chat.Message, error) {
	m, err := scanMessage(s.read.QueryRow(ctx, `SELECT `+MessageColumns+` FROM messages m
		WHERE m.conversation_id = ? AND m.id = ?`, conversationID, messageID))
	if errors.Is(err, sql.ErrNoRows) {
		err = chat.ErrNotFound
	}
	if err != nil {
		return chat.Message{}, fmt.Errorf("message: %w", err)
	}
	return m, nil
}
