package sqlite_test

import (
	"database/sql"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/store"
	"github.com/tokenrelay/tokenrelay/internal/store/migrations"
	"github.com/tokenrelay/tokenrelay/internal/store/sqlite"
	"github.com/tokenrelay/tokenrelay/internal/store/storetest"
)

// open returns a new store in a file of its own under t.TempDir.
func open(t testing.TB) store.Store {
	t.Helper()
	db, err := sqlite.Open(t.Context(), filepath.Join(t.TempDir(), "history.db"))
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	t.Cleanup(func() {
		if err := db.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return db
}

func TestStore(t *testing.T) {
	storetest.Run(t, open)
}

func TestReopen(t *testing.T) {
	// Opening an existing file finds its data and no migration left to run.
	path := filepath.Join(t.TempDir(), "history.db")
	for i := range 2 {
		db, err := sqlite.Open(t.Context(), path)
		if err != nil {
			t.Fatalf("open %d: %v", i, err)
		}
		if _, err := db.ClaimConversation(t.Context(), "c1", "alice", time.Unix(1, 0)); err != nil {
			t.Fatalf("open %d: ClaimConversation: %v", i, err)
		}
		if err := db.Close(); err != nil {
			t.Fatalf("close %d: %v", i, err)
		}
	}
}

func TestOpenRejects(t *testing.T) {
	for _, path := range []string{"", ":memory:", "file:x.db", "x.db?mode=ro"} {
		if db, err := sqlite.Open(t.Context(), path); err == nil {
			db.Close()
			t.Errorf("Open(%q) succeeded, want an error", path)
		}
	}
}

// The writer leaves checkpoints to the background checkpointer, which
// copies committed pages into the database file while the store is open:
// here the file grows past its size after the migrations without anything
// else checkpointing.
func TestCheckpointsInTheBackground(t *testing.T) {
	path := filepath.Join(t.TempDir(), "history.db")
	db, err := sqlite.Open(t.Context(), path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	size := func() int64 {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		return fi.Size()
	}
	before := size()
	text := strings.Repeat("x", 4000)
	for i := range 200 {
		id := strconv.Itoa(i)
		if _, err := db.Send(t.Context(), store.SendRequest{
			ConversationID: "c" + id, Owner: "alice", MessageID: "m" + id, TurnID: "t" + id, Text: text, Now: time.Unix(1, 0),
		}); err != nil {
			t.Fatal(err)
		}
	}
	giveUp := time.After(10 * time.Second)
	for size() < before+200*4000 {
		select {
		case <-giveUp:
			t.Fatalf("database file %d bytes after 800 kB written (%d before): not checkpointed", size(), before)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// A database a newer tokenrelay migrated further is refused, not used.
func TestOpenRefusesANewerSchema(t *testing.T) {
	path := filepath.Join(t.TempDir(), "history.db")
	db, err := sqlite.Open(t.Context(), path)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	if err := db.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	raw, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := raw.Exec(`INSERT INTO ` + migrations.TableName + ` (version_id, is_applied) VALUES (999, 1)`); err != nil {
		t.Fatalf("record a newer version: %v", err)
	}
	raw.Close()
	if db, err := sqlite.Open(t.Context(), path); err == nil {
		db.Close()
		t.Fatal("a schema at version 999 was opened")
	} else if !strings.Contains(err.Error(), "version 999, which a newer tokenrelay migrated it to") {
		t.Fatalf("open: %v", err)
	}
}
