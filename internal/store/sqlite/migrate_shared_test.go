package sqlite

import (
	"path/filepath"
	"sync"
	"testing"
)

// Processes opening a new database file together all start: one of them
// migrates it, and the others find it migrated.
func TestOpenTogetherOnANewFile(t *testing.T) {
	for round := range 6 {
		path := filepath.Join(t.TempDir(), "t.db")
		var wg sync.WaitGroup
		errs := make([]error, 6)
		for i := range errs {
			wg.Go(func() {
				db, err := Open(t.Context(), path)
				if err == nil {
					db.Close()
				}
				errs[i] = err
			})
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("round %d: open %d: %v", round, i, err)
			}
		}
	}
}
