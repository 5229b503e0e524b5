package postgres_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net/url"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/store"
	"github.com/tokenrelay/tokenrelay/internal/store/postgres"
	"github.com/tokenrelay/tokenrelay/internal/store/postgres/pgtest"
)

// fixture is a store in a schema of its own, opened with an application
// name of its own, and two plain connections to the same schema: other
// plays another process holding locks, watch looks at and terminates the
// store's connections.
type fixture struct {
	db           *postgres.DB
	other, watch *pgx.Conn
	appName      string
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	u, err := url.Parse(pgtest.SchemaURL(t))
	if err != nil {
		t.Fatal(err)
	}
	var b [6]byte
	rand.Read(b[:])
	f := &fixture{appName: "tokenrelay-test-" + hex.EncodeToString(b[:])}
	q := u.Query()
	q.Set("application_name", f.appName)
	u.RawQuery = q.Encode()
	if f.db, err = postgres.Open(t.Context(), u.String()); err != nil {
		t.Fatalf("open: %v", err)
	}
	t.Cleanup(func() { f.db.Close() })
	q.Set("application_name", f.appName+"-other")
	u.RawQuery = q.Encode()
	for _, c := range []**pgx.Conn{&f.other, &f.watch} {
		if *c, err = pgx.Connect(t.Context(), u.String()); err != nil {
			t.Fatalf("connect: %v", err)
		}
		t.Cleanup(func() { (*c).Close(context.Background()) })
	}
	return f
}

func (f *fixture) send(ctx context.Context, conv, turn string) (store.SendResult, error) {
	return f.db.Send(ctx, store.SendRequest{ConversationID: conv, Owner: "alice", MessageID: "m-" + turn,
		TurnID: turn, Text: "hello", Now: time.Now()})
}

// waitBackends waits until the number of the store's server backends
// matching where (an SQL condition on pg_stat_activity) satisfies ok.
func (f *fixture) waitBackends(t *testing.T, what, where string, ok func(n int) bool) {
	t.Helper()
	for {
		var n int
		err := f.watch.QueryRow(t.Context(), `SELECT count(*) FROM pg_stat_activity
			WHERE application_name = $1 AND `+where, f.appName).Scan(&n)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if ok(n) {
			return
		}
		select {
		case <-t.Context().Done():
			t.Fatalf("gave up waiting: %s", what)
		case <-time.After(5 * time.Millisecond): // polling the server's view
		}
	}
}

// waitLockWaiters waits until n of the store's connections wait for a lock.
func (f *fixture) waitLockWaiters(t *testing.T, n int) {
	t.Helper()
	f.waitBackends(t, "lock waiters", "wait_event_type = 'Lock'", func(w int) bool { return w >= n })
}

// lockConversation takes conversation id's row lock on the other
// connection, as a send or a delete under way holds it, until the returned
// transaction ends.
func (f *fixture) lockConversation(t *testing.T, id string) pgx.Tx {
	t.Helper()
	tx, err := f.other.Begin(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tx.Rollback(context.Background()) })
	if _, err := tx.Exec(t.Context(), `SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE`, id); err != nil {
		t.Fatal(err)
	}
	return tx
}

// A delete that waits for a send under way in the same conversation keeps
// that send's turn id too, so that the id cannot be sent again (it names
// the turn's events on the bus, whose Nats-Msg-Id would repeat).
func TestDeleteKeepsTheTurnOfASendItWaitedFor(t *testing.T) {
	f := newFixture(t)
	ctx := t.Context()
	if _, err := f.send(ctx, "c1", "t-first"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := f.db.FinishTurn(ctx, store.TurnResult{TurnID: "t-first", Status: chat.StatusComplete, Now: time.Now()}); err != nil {
		t.Fatal(err)
	}
	// The other connection holds the conversation's lock, as a send does.
	tx := f.lockConversation(t, "c1")
	sent := make(chan error, 1)
	go func() {
		_, err := f.send(ctx, "c1", "t-late")
		sent <- err
	}()
	f.waitLockWaiters(t, 1) // the send waits for the lock
	deleted := make(chan error, 1)
	go func() { deleted <- f.db.DeleteConversation(ctx, "c1", "alice") }()
	f.waitLockWaiters(t, 2) // and the delete behind it
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-sent; err != nil {
		t.Fatalf("send: %v", err)
	}
	if err := <-deleted; err != nil {
		t.Fatalf("delete: %v", err)
	}
	for _, turn := range []string{"t-first", "t-late"} {
		if _, err := f.db.TurnHead(ctx, turn); !errors.Is(err, chat.ErrNotFound) {
			t.Fatalf("turn %s after the delete: %v, want not found", turn, err)
		}
		if _, err := f.send(ctx, "c2", turn); !errors.Is(err, chat.ErrConflict) {
			t.Fatalf("send with the deleted turn id %s: %v, want %v", turn, err, chat.ErrConflict)
		}
	}
}

// A send whose conversation is deleted while it waits for the
// conversation's lock goes to the conversation created afresh, as a send
// made after the delete does, rather than failing.
func TestSendWhoseConversationIsDeletedWhileItWaits(t *testing.T) {
	f := newFixture(t)
	ctx := t.Context()
	if _, err := f.db.ClaimConversation(ctx, "c1", "alice", time.Now()); err != nil {
		t.Fatal(err)
	}
	tx := f.lockConversation(t, "c1")
	sent := make(chan error, 1)
	go func() {
		_, err := f.send(ctx, "c1", "t1")
		sent <- err
	}()
	f.waitLockWaiters(t, 1)
	if _, err := tx.Exec(ctx, `DELETE FROM conversations WHERE id = 'c1'`); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-sent; err != nil {
		t.Fatalf("send: %v", err)
	}
	msgs, err := f.db.Messages(ctx, "c1", 10, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(msgs) != 2 || msgs[1].TurnID != "t1" {
		t.Fatalf("messages of the conversation created afresh: %+v", msgs)
	}
}

// terminate ends every server backend of the store's pool, as a restart
// or a failover does, and waits until they are gone.
func (f *fixture) terminate(t *testing.T) {
	t.Helper()
	var n int
	err := f.watch.QueryRow(t.Context(), `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
		WHERE application_name = $1`, f.appName).Scan(&n)
	if err != nil {
		t.Fatalf("terminate: %v", err)
	}
	if n == 0 {
		t.Fatal("the store had no connection to terminate")
	}
	f.waitBackends(t, "terminated backends to go", "true", func(n int) bool { return n == 0 })
}

// The pooled connections' backends are terminated between calls: every
// kind of statement, each run before on the same connections, succeeds on
// a fresh connection instead of failing the turn it was for.
func TestStatementsOutliveTheirConnections(t *testing.T) {
	f := newFixture(t)
	ctx := t.Context()
	if _, err := f.send(ctx, "c1", "t1"); err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		name string
		run  func() error
	}{
		{"StartTurn (Exec)", func() error {
			ok, err := f.db.StartTurn(ctx, "t1", time.Now())
			if err == nil && !ok {
				err = errors.New("not started")
			}
			return err
		}},
		{"Messages (Query)", func() error {
			msgs, err := f.db.Messages(ctx, "c1", 10, "")
			if err == nil && len(msgs) != 2 {
				err = errors.New("not two messages")
			}
			return err
		}},
		{"TurnHead (QueryRow)", func() error {
			_, err := f.db.TurnHead(ctx, "t1")
			return err
		}},
		{"FinishTurn", func() error {
			_, won, err := f.db.FinishTurn(ctx, store.TurnResult{TurnID: "t1", Status: chat.StatusComplete, Content: "hi", Seq: 1, Now: time.Now()})
			if err == nil && !won {
				err = errors.New("not won")
			}
			return err
		}},
		{"Send (transaction)", func() error {
			_, err := f.send(ctx, "c1", "t2")
			return err
		}},
	}
	for _, s := range steps {
		// Once on live connections (pgx then has the statement prepared
		// on them), then on dead ones.
		if s.name == "Messages (Query)" {
			if err := s.run(); err != nil {
				t.Fatalf("%s: %v", s.name, err)
			}
		}
		f.terminate(t)
		if err := s.run(); err != nil {
			t.Fatalf("%s after its connections were terminated: %v", s.name, err)
		}
	}
}
