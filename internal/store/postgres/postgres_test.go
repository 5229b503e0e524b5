package postgres_test

import (
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
