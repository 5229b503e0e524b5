package postgres_test

import (
	"sync"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/store"
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
