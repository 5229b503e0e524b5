package postgres_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/store"
	"github.com/tokenrelay/tokenrelay/internal/store/postgres"
	"github.com/tokenrelay/tokenrelay/internal/store/postgres/pgtest"
)

// A send whose COMMIT outlasts the request's deadline may have committed
// all the same. Its answer must say what the store holds: an error for a
// send that stored its turn would leave the turn queued with no job, and
// the client's retry of it would only find it there (a duplicate, which
// starts nothing). Here the COMMIT is held by a deferred trigger, so it
// commits after the deadline has cut off its client.
func TestSendWhoseCommitOutlastsTheDeadline(t *testing.T) {
	db := storeWith(t,
		// The client's cancel (pgx sends one as it drops the connection)
		// only cuts the wait short: the COMMIT then goes through, as one
		// does that has committed locally when its wait for a synchronous
		// standby is cancelled.
		`CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
			BEGIN
				BEGIN PERFORM pg_sleep(0.5); EXCEPTION WHEN query_canceled THEN NULL; END;
				RETURN NULL;
			END $$`,
		`CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON messages
			DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
			WHEN (NEW.role = 'assistant') EXECUTE FUNCTION slow_commit()`,
	)
	req := store.SendRequest{ConversationID: "c1", Owner: "alice", MessageID: "m1", TurnID: "t1", Text: "hello", Now: time.Now()}
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	res, err := db.Send(ctx, req)
	cancel()
	// The client's retry: it waits for the first send's transaction.
	again, err2 := db.Send(t.Context(), req)
	if err2 != nil {
		t.Fatalf("retry: %v", err2)
	}
	if err != nil && again.Duplicate {
		t.Fatalf("the send answered %q, yet stored its turn (status %s): nothing would start it", err, again.Turn.Status)
	}
	if err == nil && (res.Duplicate || res.Turn.ID != "t1" || !again.Duplicate) {
		t.Fatalf("the send answered %+v, its retry %+v: want the turn stored once, by the send", res, again)
	}
}

// A turn's end whose answer was lost (the worker's try timed out while the
// statement ran on) may be stored all the same. The worker's next try of
// the very same end must then hear that it won: told that another end won,
// it would not save its journaled deltas before the end reached the
// stream, nor count the turn, taking the end stored as another's.
func TestFinishTurnWhoseAnswerWasLost(t *testing.T) {
	db := storeWith(t,
		// The end's UPDATE outlasts the try's deadline, and commits after
		// its client has given up.
		`CREATE FUNCTION slow_end() RETURNS trigger LANGUAGE plpgsql AS $$
			BEGIN
				BEGIN PERFORM pg_sleep(0.5); EXCEPTION WHEN query_canceled THEN NULL; END;
				RETURN NULL;
			END $$`,
		`CREATE TRIGGER slow_end AFTER UPDATE ON messages FOR EACH ROW
			WHEN (OLD.status IN ('queued', 'streaming') AND NEW.status NOT IN ('queued', 'streaming'))
			EXECUTE FUNCTION slow_end()`,
	)
	if _, err := db.Send(t.Context(), store.SendRequest{ConversationID: "c1", Owner: "alice", MessageID: "m1", TurnID: "t1", Text: "hello", Now: time.Now()}); err != nil {
		t.Fatalf("send: %v", err)
	}
	r := store.TurnResult{TurnID: "t1", Status: chat.StatusComplete, Content: "the answer", Seq: 3, Now: time.Now()}
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	_, _, err := db.FinishTurn(ctx, r)
	cancel()
	if err == nil {
		t.Fatal("the first try answered before its deadline: the trigger did not hold it")
	}
	st, won, err := db.FinishTurn(t.Context(), r)
	if err != nil || st != chat.StatusComplete || !won {
		t.Fatalf("the same end tried again: %s, won %v, %v; want complete, won", st, won, err)
	}
	// Another end is still told that it lost.
	other := r
	other.Status, other.Content, other.Now = chat.StatusInterrupted, "", time.Now()
	if st, won, err := db.FinishTurn(t.Context(), other); err != nil || st != chat.StatusComplete || won {
		t.Fatalf("another end: %s, won %v, %v; want complete, lost", st, won, err)
	}
}

// storeWith opens a store in a schema of its own, and runs stmts on it
// first (the triggers that make a statement outlast its deadline).
func storeWith(t *testing.T, stmts ...string) *postgres.DB {
	t.Helper()
	u := pgtest.SchemaURL(t)
	db, err := postgres.Open(t.Context(), u)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	t.Cleanup(func() { db.Close() })
	conn, err := pgx.Connect(t.Context(), u)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer conn.Close(context.Background())
	for _, q := range stmts {
		if _, err := conn.Exec(t.Context(), q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	return db
}
