package postgres_test

import (
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tokenrelay/tokenrelay/internal/store"
	"github.com/tokenrelay/tokenrelay/internal/store/migrations"
	"github.com/tokenrelay/tokenrelay/internal/store/postgres"
	"github.com/tokenrelay/tokenrelay/internal/store/postgres/pgtest"
	"github.com/tokenrelay/tokenrelay/internal/store/storetest"
)

// open returns a store in a new schema of its own.
func open(t testing.TB) store.Store {
	t.Helper()
	db, err := postgres.Open(t.Context(), pgtest.SchemaURL(t))
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func TestStore(t *testing.T) {
	storetest.Run(t, open)
}

func TestMigrateConcurrently(t *testing.T) {
	// Processes starting together each migrate; the advisory lock makes the
	// later ones find the schema ready.
	u := pgtest.SchemaURL(t)
	const n = 5
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { errs[i] = postgres.Migrate(t.Context(), u) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("Migrate %d: %v", i, err)
		}
	}
	db, err := postgres.Open(t.Context(), u)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	defer db.Close()
	if _, err := db.ClaimConversation(t.Context(), "c1", "alice", time.Unix(1, 0)); err != nil {
		t.Fatalf("ClaimConversation: %v", err)
	}
}

// A schema a newer tokenrelay migrated further is refused, not used.
func TestMigrateRefusesANewerSchema(t *testing.T) {
	u := pgtest.SchemaURL(t)
	if err := postgres.Migrate(t.Context(), u); err != nil {
		t.Fatalf("Migrate: %v", err)
	}
	conn, err := pgx.Connect(t.Context(), u)
	if err != nil {
		t.Fatal(err)
	}
	_, err = conn.Exec(t.Context(), `INSERT INTO `+migrations.TableName+` (version_id, is_applied) VALUES (999, true)`)
	conn.Close(t.Context())
	if err != nil {
		t.Fatalf("record a newer version: %v", err)
	}
	if err := postgres.Migrate(t.Context(), u); err == nil || !strings.Contains(err.Error(), "version 999, which a newer tokenrelay migrated it to") {
		t.Fatalf("Migrate of a schema at version 999: %v", err)
	}
	if db, err := postgres.Open(t.Context(), u); err == nil {
		db.Close()
		t.Fatal("a schema at version 999 was opened")
	}
}

// Conversations updated in the same millisecond are listed in the order of
// their ids' bytes, as SQLite lists them, also in a database whose
// collation orders text as words (en_US.UTF-8, an ICU locale).
func TestConversationTiesIgnoreTheCollation(t *testing.T) {
	u := pgtest.SchemaURL(t)
	db, err := postgres.Open(t.Context(), u)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	defer db.Close()
	conn, err := pgx.Connect(t.Context(), u)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(t.Context())
	// A collation under which "a" sorts before "B", unlike bytes.
	var coll string
	err = conn.QueryRow(t.Context(), `SELECT quote_ident(collname) FROM pg_collation
		WHERE collname IN ('und-x-icu', 'en-US-x-icu', 'en_US.utf8', 'en_US.UTF-8')
		ORDER BY collname LIMIT 1`).Scan(&coll)
	if errors.Is(err, pgx.ErrNoRows) {
		t.Skip("the server has no collation that orders text as words")
	}
	if err != nil {
		t.Fatal(err)
	}
	var wordwise bool
	if err := conn.QueryRow(t.Context(), `SELECT 'a' COLLATE `+coll+` < 'B'`).Scan(&wordwise); err != nil || !wordwise {
		t.Skipf("collation %s orders text by bytes (%v)", coll, err)
	}
	if _, err := conn.Exec(t.Context(), `ALTER TABLE conversations ALTER COLUMN id TYPE TEXT COLLATE `+coll); err != nil {
		t.Fatalf("collate conversations.id: %v", err)
	}
	now := time.Unix(1, 0)
	want := []string{"a", "_x", "B", "-y"}
	for _, id := range want {
		if _, err := db.Send(t.Context(), store.SendRequest{ConversationID: id, Owner: "alice", MessageID: "m", TurnID: "t" + id, Text: "hi", Now: now}); err != nil {
			t.Fatalf("Send: %v", err)
		}
	}
	cs, err := db.Conversations(t.Context(), "alice", 0)
	if err != nil {
		t.Fatalf("Conversations: %v", err)
	}
	var got []string
	for _, c := range cs {
		got = append(got, c.ID)
	}
	if !slices.Equal(got, want) {
		t.Fatalf("Conversations = %v, want %v", got, want)
	}
}
