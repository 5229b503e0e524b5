package sqlite

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/store"
)

// TestWALStartsOverUnderLoad: with writes back to back and reads always
// running, the WAL still starts over from its beginning once it has grown
// past walRestartFrames, and the restart cuts its file to walKeepBytes,
// where before it kept every write since the store opened (164 MB for 12 MB
// of text written this way).
func TestWALStartsOverUnderLoad(t *testing.T) {
	frames, keep, every := walRestartFrames, walKeepBytes, restartEvery
	walRestartFrames, walKeepBytes, restartEvery = 64, 256<<10, 0
	t.Cleanup(func() { walRestartFrames, walKeepBytes, restartEvery = frames, keep, every })
	path := filepath.Join(t.TempDir(), "history.db")
	db, err := Open(t.Context(), path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()

	stop := make(chan struct{})
	var readers sync.WaitGroup
	for range 3 {
		readers.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				var n int
				if err := db.read.QueryRowContext(t.Context(), "SELECT count(*) FROM messages").Scan(&n); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wal := func() int64 {
		fi, err := os.Stat(path + "-wal")
		if err != nil {
			t.Fatal(err)
		}
		return fi.Size()
	}
	const writes, size = 1000, 4000
	text := strings.Repeat("x", size)
	var largest int64
	for i := range writes {
		id := strconv.Itoa(i)
		if _, err := db.Send(t.Context(), store.SendRequest{
			ConversationID: "c" + id, Owner: "alice", MessageID: "m" + id, TurnID: "t" + id, Text: text, Now: time.Unix(1, 0),
		}); err != nil {
			t.Fatal(err)
		}
		largest = max(largest, wal())
	}
	close(stop)
	readers.Wait()
	if largest <= int64(walKeepBytes) {
		t.Fatalf("the WAL reached only %d bytes: the test wrote too little to show a restart", largest)
	}
	// A restart is made by a write: write on until one cuts the file to
	// walKeepBytes, which a WAL that never starts over does not.
	giveUp := time.After(20 * time.Second)
	for i := writes; wal() > int64(walKeepBytes); i++ {
		select {
		case <-giveUp:
			t.Fatalf("the WAL file is still %d bytes (largest %d) after %d writes: it never started over", wal(), largest, i)
		default:
		}
		id := strconv.Itoa(i)
		if _, err := db.Send(t.Context(), store.SendRequest{
			ConversationID: "c" + id, Owner: "alice", MessageID: "m" + id, TurnID: "t" + id, Text: "x", Now: time.Unix(1, 0),
		}); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("largest WAL %d bytes, %d bytes of text written", largest, writes*size)
}
