package postgres_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

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
	for _, q := range []string{
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
	} {
		if _, err := conn.Exec(t.Context(), q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
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
