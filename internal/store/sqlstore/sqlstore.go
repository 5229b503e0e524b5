// Package sqlstore implements what the SQLite and PostgreSQL stores share:
// the queries, written once with ? placeholders, the row scanning and the
// order of Send's checks, over the [Queryer] and [Dialect] each store gives.
package sqlstore

import (
	"context"
)

// Scanner is a row: *sql.Row, *sql.Rows, pgx.Row or pgx.Rows.
type Scanner interface {
	Scan(dest ...any) error
}

// Rows is the result of a query, as *sql.Rows gives it.
type Rows interface {
	Scanner
	Next() bool
	Err() error
	Close() error
}

// Queryer runs SQL written with ? placeholders on a connection pool or in a
// transaction. A query that finds no row fails Scan with an error that
// errors.Is matches to sql.ErrNoRows (pgx.ErrNoRows does). Implementations
// are safe for concurrent use when what they wrap is.
type Queryer interface {
	QueryRow(ctx context.Context, query string, args ...any) Scanner
	Query(ctx context.Context, query string, args ...any) (Rows, error)
	// Exec returns the number of rows the statement changed.
	Exec(ctx context.Context, query string, args ...any) (int64, error)
}

// Dialect is what one database does its own way: transactions, locking and
// driver error codes.
type Dialect interface {
	// InTx runs fn in the write transaction in which Send checks and
	// stores, committing it when fn returns nil and rolling it back
	// otherwise; fn runs its statements on tx with the context it is
	// given. Together with LockConversation it must make Send's checks see
	// every send to the conversation that committed before, and keep sends
	// to it from committing until this one ends.
	InTx(ctx context.Context, fn func(ctx context.Context, tx Queryer) error) error

	// MayHaveCommitted reports whether InTx's error err leaves it unknown
	// whether the transaction committed: its COMMIT was sent, and its
	// answer lost (the caller's deadline cut it off, the connection
	// broke). Send then looks for what it stored (see DB.Send).
	MayHaveCommitted(err error) bool

	// LockConversation returns the owner and updated_at (unix
	// milliseconds) of conversation id, creating it untitled and owned by
	// owner, at now, when it is missing, and locks it against other sends
	// until tx ends.
	LockConversation(ctx context.Context, tx Queryer, id, owner string, now int64) (string, int64, error)

	// LockOwner serializes owner's sends until tx ends, so that counting the
	// owner's active turns in tx cannot race another send. Send calls it
	// after LockConversation.
	LockOwner(ctx context.Context, tx Queryer, owner string) error

	// IsUniqueViolation reports whether err is the database's unique or
	// primary key constraint failure.
	IsUniqueViolation(err error) bool

	// NoLimit is the argument of LIMIT ? that means no limit.
	NoLimit() any

	// Bytewise is the COLLATE clause that orders text by its bytes,
	// whatever collation the database or column has, so that ties are
	// broken alike on every dialect.
	Bytewise() string
}

// DB implements the methods of [store.Store] that every dialect shares; a
// dialect's store embeds it and adds DeleteConversation, Ping and Close. It
// is safe for concurrent use.
type DB struct {
	read  Queryer // reads that need not see this process's latest write
	write Queryer // writes, and reads that must see them
	d     Dialect
}

// New returns the shared store that reads through read and writes through
// write (which may be the same pool), with the dialect d. It does not take
// ownership of them: the dialect's store closes its own pools.
func New(read, write Queryer, d Dialect) *DB {
	return &DB{read: read, write: write, d: d}
}

type priorityKey struct{}

// WithPriority marks the writes made with ctx as ones that should pass
// other writes waiting for the database: a turn's end, which a user may
// be waiting on. A dialect that lets one writer in at a time (SQLite)
// honours it; elsewhere it changes nothing.
func WithPriority(ctx context.Context) context.Context {
	return context.WithValue(ctx, priorityKey{}, true)
}

// HasPriority reports whether ctx was marked by WithPriority.
func HasPriority(ctx context.Context) bool {
	v, _ := ctx.Value(priorityKey{}).(bool)
	return v
}
