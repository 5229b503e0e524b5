package migrations

import (
	"io/fs"
	"slices"
	"testing"
)

// TestDialectsInStep checks that each dialect has the same migrations.
func TestDialectsInStep(t *testing.T) {
	names := func(fsys fs.FS) []string {
		t.Helper()
		got, err := fs.Glob(fsys, "*.sql")
		if err != nil {
			t.Fatalf("glob: %v", err)
		}
		return got
	}
	sqlite, postgres := names(SQLite()), names(Postgres())
	if len(sqlite) == 0 || !slices.Equal(sqlite, postgres) {
		t.Fatalf("migrations differ: sqlite %v, postgres %v", sqlite, postgres)
	}
}
