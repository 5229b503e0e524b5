// Package migrations holds the embedded goose SQL migrations that create the
// history store's schema, one directory per SQL dialect.
//
// The two directories define the same tables, columns, constraints and
// indexes; they differ only where the dialects do: the messages.position
// column is an INTEGER PRIMARY KEY AUTOINCREMENT in SQLite and a BIGINT
// GENERATED ALWAYS AS IDENTITY in PostgreSQL. A change to the schema is a new
// numbered file in both directories.
package migrations

import (
	"context"
	"embed"
	"fmt"
	"io/fs"

	"github.com/pressly/goose/v3"
)

// files holds both dialects' migrations; it is read-only.
//
//go:embed sqlite/*.sql postgres/*.sql
var files embed.FS

// TableName is the table in which goose records which migrations ran. It is
// not goose's default so that tokenrelay can share a database schema with
// another goose-managed application without mixing their versions.
const TableName = "tokenrelay_schema_version"

// SQLite returns the migrations for SQLite, for goose.NewProvider.
func SQLite() fs.FS { return sub("sqlite") }

// Postgres returns the migrations for PostgreSQL, for goose.NewProvider.
func Postgres() fs.FS { return sub("postgres") }

// Up applies p's pending migrations. It refuses a database that a newer
// tokenrelay has migrated past the newest migration this one holds (goose
// alone would pass over the versions it does not know): this one's code
// may not read, or may spoil, what that one's schema holds.
func Up(ctx context.Context, p *goose.Provider) error {
	if _, err := p.Up(ctx); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	current, newest, err := p.GetVersions(ctx)
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	if current > newest {
		return fmt.Errorf("the database's schema is at version %d, which a newer tokenrelay migrated it to; this one knows versions up to %d: run the newer one, or restore a backup taken before it ran", current, newest)
	}
	return nil
}

func sub(dir string) fs.FS {
	f, err := fs.Sub(files, dir)
	if err != nil {
		// fs.Sub fails only for an invalid path, and dir is a constant.
		panic("migrations: " + err.Error())
	}
	return f
}
