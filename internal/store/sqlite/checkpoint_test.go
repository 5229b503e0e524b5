package sqlite

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/store"
)

// TestWALIsTruncated: past walTruncateFrames the checkpointer empties the
// WAL file, which a passive checkpoint never shrinks, even while a reader
// holds an old snapshot during the writes.
func TestWALIsTruncated(t *testing.T) {
	frames, every := walTruncateFrames, truncateEvery
	walTruncateFrames, truncateEvery = 100, 0
	t.Cleanup(func() { walTruncateFrames, truncateEvery = frames, every })
	path := filepath.Join(t.TempDir(), "history.db")
	db, err := Open(t.Context(), path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	// A reader in the middle of a transaction: the WAL cannot start over.
	tx, err := db.read.BeginTx(t.Context(), nil)
	if err != nil {
		t.Fatal(err)
	}
	var n int
	if err := tx.QueryRowContext(t.Context(), "SELECT count(*) FROM messages").Scan(&n); err != nil {
		t.Fatal(err)
	}
	text := strings.Repeat("x", 4000)
	for i := range 300 {
		id := strconv.Itoa(i)
		if _, err := db.Send(t.Context(), store.SendRequest{
			ConversationID: "c" + id, Owner: "alice", MessageID: "m" + id, TurnID: "t" + id, Text: text, Now: time.Unix(1, 0),
		}); err != nil {
			t.Fatal(err)
		}
	}
	wal := func() int64 {
		fi, err := os.Stat(path + "-wal")
		if err != nil {
			t.Fatal(err)
		}
		return fi.Size()
	}
	if size := wal(); size < 300*4000 {
		t.Fatalf("WAL %d bytes after 1.2 MB written under an open read", size)
	}
	if err := tx.Rollback(); err != nil {
		t.Fatal(err)
	}
	giveUp := time.After(20 * time.Second)
	for wal() > 100*4096 {
		select {
		case <-giveUp:
			t.Fatalf("WAL still %d bytes after the writes and the read ended", wal())
		case <-time.After(20 * time.Millisecond):
		}
	}
}
