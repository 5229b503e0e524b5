package sqlite

import (
	"context"
	"database/sql"
	"errors"

	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"

	"github.com/tokenrelay/tokenrelay/internal/store/sqlstore"
)

// sqlConn is what *sql.DB and *sql.Tx share.
type sqlConn interface {
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
}

// conn runs the shared queries on a pool or in a transaction; SQLite takes
// their ? placeholders as they are.
type conn struct{ c sqlConn }

var _ sqlstore.Queryer = conn{}

func (c conn) QueryRow(ctx context.Context, query string, args ...any) sqlstore.Scanner {
	return c.c.QueryRowContext(ctx, query, args...)
}

func (c conn) Query(ctx context.Context, query string, args ...any) (sqlstore.Rows, error) {
	rows, err := c.c.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	return rows, nil
}

func (c conn) Exec(ctx context.Context, query string, args ...any) (int64, error) {
	res, err := c.c.ExecContext(ctx, query, args...)
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// writeTx is Send's transaction.
type writeTx struct {
	conn
	tx *sql.Tx
}

func (t writeTx) Commit(context.Context) error   { return t.tx.Commit() }
func (t writeTx) Rollback(context.Context) error { return t.tx.Rollback() }

// dialect is how SQLite serializes writes: through one connection whose
// transactions begin IMMEDIATE (see [DB]).
type dialect struct {
	write, read *sql.DB
}

var _ sqlstore.Dialect = dialect{}

// Begin begins IMMEDIATE (see Open): the transaction sees every committed
// send, and no other writer can commit until it ends.
func (d dialect) Begin(ctx context.Context) (sqlstore.Tx, error) {
	t, err := d.write.BeginTx(ctx, nil)
	if err != nil {
		return nil, err
	}
	return writeTx{conn{t}, t}, nil
}

// LockConversation needs no lock of its own: the transaction holds the
// database's write lock already.
func (dialect) LockConversation(ctx context.Context, tx sqlstore.Queryer, id, owner string, now int64) (string, error) {
	var got string
	err := tx.QueryRow(ctx, `SELECT owner FROM conversations WHERE id = ?`, id).Scan(&got)
	if !errors.Is(err, sql.ErrNoRows) {
		return got, err
	}
	_, err = tx.Exec(ctx, `INSERT INTO conversations (id, owner, title, created_at, updated_at)
		VALUES (?, ?, '', ?, ?)`, id, owner, now, now)
	return owner, err
}

// LockOwner needs no lock of its own either.
func (dialect) LockOwner(context.Context, sqlstore.Queryer, string) error { return nil }

// IsUniqueViolation reports whether err is SQLite's UNIQUE or PRIMARY KEY
// constraint failure.
func (dialect) IsUniqueViolation(err error) bool {
	var e *sqlite.Error
	if !errors.As(err, &e) {
		return false
	}
	return e.Code() == sqlite3.SQLITE_CONSTRAINT_UNIQUE || e.Code() == sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY
}

// Snapshot runs fn in one read transaction, so that a page and the position
// it starts from come from the same snapshot.
func (d dialect) Snapshot(ctx context.Context, fn func(q sqlstore.Queryer) error) error {
	t, err := d.read.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return err
	}
	defer t.Rollback()
	return fn(conn{t})
}

// NoLimit is SQLite's LIMIT -1.
func (dialect) NoLimit() any { return -1 }
