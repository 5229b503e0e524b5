package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"sync"

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
// their ? placeholders as they are. Statements are prepared once per pool
// and reused (in a transaction through tx.StmtContext): parsing the SQL
// cost more than running it.
type conn struct {
	c     sqlConn
	cache *stmtCache // the pool's statements
	tx    *sql.Tx    // set inside a transaction
	w     *writer    // set on the write pool: each call is a write of its own
}

var _ sqlstore.Queryer = conn{}

// stmtCache holds a pool's prepared statements by query text. A statement
// is never prepared inside a transaction (the write pool has one
// connection, which the transaction holds): a transaction asks for it
// with want, and the next Begin prepares it before taking the connection.
type stmtCache struct {
	db     *sql.DB
	m      sync.Map // query → *sql.Stmt
	wanted sync.Map // query → struct{}: used in a transaction, not prepared yet
}

// want notes a query met in a transaction.
func (c *stmtCache) want(query string) { c.wanted.Store(query, struct{}{}) }

// prepareWanted prepares the queries transactions asked for; call it while
// holding no connection of the pool.
func (c *stmtCache) prepareWanted(ctx context.Context) {
	c.wanted.Range(func(q, _ any) bool {
		c.wanted.Delete(q)
		_, _ = c.stmt(ctx, q.(string))
		return true
	})
}

func (c *stmtCache) stmt(ctx context.Context, query string) (*sql.Stmt, error) {
	if st, ok := c.m.Load(query); ok {
		return st.(*sql.Stmt), nil
	}
	st, err := c.db.PrepareContext(ctx, query)
	if err != nil {
		return nil, err
	}
	if prev, loaded := c.m.LoadOrStore(query, st); loaded {
		st.Close()
		return prev.(*sql.Stmt), nil
	}
	return st, nil
}

func (c *stmtCache) close() {
	c.m.Range(func(_, st any) bool {
		st.(*sql.Stmt).Close()
		return true
	})
}

// stmt returns the prepared statement of query, or nil to run it as text.
func (c conn) stmt(ctx context.Context, query string) *sql.Stmt {
	if c.cache == nil {
		return nil
	}
	if c.tx != nil {
		if st, ok := c.cache.m.Load(query); ok {
			return c.tx.StmtContext(ctx, st.(*sql.Stmt))
		}
		c.cache.want(query)
		return nil
	}
	st, err := c.cache.stmt(ctx, query)
	if err != nil {
		return nil // run it as text: the error, if any, comes back from there
	}
	return st
}

func (c conn) QueryRow(ctx context.Context, query string, args ...any) sqlstore.Scanner {
	if c.w != nil {
		return writerRow{c.w, ctx, query, args}
	}
	if st := c.stmt(ctx, query); st != nil {
		return st.QueryRowContext(ctx, args...)
	}
	return c.c.QueryRowContext(ctx, query, args...)
}

// writerRow is a row read by the writer, when it is scanned: a read that
// must see the writes before it.
type writerRow struct {
	w     *writer
	ctx   context.Context
	query string
	args  []any
}

func (r writerRow) Scan(dest ...any) error {
	return r.w.do(r.ctx, func(ctx context.Context, q conn) error {
		return q.QueryRow(ctx, r.query, r.args...).Scan(dest...)
	})
}

func (c conn) Query(ctx context.Context, query string, args ...any) (sqlstore.Rows, error) {
	if c.w != nil {
		// Rows would hold the write connection while their reader
		// pleases; reads of many rows go through the read pool, or
		// inside a write (InTx).
		return nil, errors.New("sqlite: Query on the write pool; read through the read pool or in InTx")
	}
	var rows *sql.Rows
	var err error
	if st := c.stmt(ctx, query); st != nil {
		rows, err = st.QueryContext(ctx, args...)
	} else {
		rows, err = c.c.QueryContext(ctx, query, args...)
	}
	if err != nil {
		return nil, err
	}
	return rows, nil
}

func (c conn) Exec(ctx context.Context, query string, args ...any) (int64, error) {
	if c.w != nil {
		var n int64
		err := c.w.do(ctx, func(ctx context.Context, q conn) error {
			var err error
			n, err = q.Exec(ctx, query, args...)
			return err
		})
		return n, err
	}
	var res sql.Result
	var err error
	if st := c.stmt(ctx, query); st != nil {
		res, err = st.ExecContext(ctx, args...)
	} else {
		res, err = c.c.ExecContext(ctx, query, args...)
	}
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// dialect is how SQLite serializes writes: through one connection whose
// transactions begin IMMEDIATE, all made by the writer (see [DB]).
type dialect struct {
	write, read           *sql.DB
	writeStmts, readStmts *stmtCache
	w                     *writer
}

var _ sqlstore.Dialect = dialect{}

// InTx runs fn as one write of the writer: in a transaction begun
// IMMEDIATE, which sees every committed send, and which no other writer's
// commit can come between.
func (d dialect) InTx(ctx context.Context, fn func(context.Context, sqlstore.Queryer) error) error {
	return d.w.do(ctx, func(ctx context.Context, q conn) error { return fn(ctx, q) })
}

// LockConversation needs no lock of its own: the transaction holds the
// database's write lock already.
func (dialect) LockConversation(ctx context.Context, tx sqlstore.Queryer, id, owner string, now int64) (string, int64, error) {
	var got string
	var updated int64
	err := tx.QueryRow(ctx, `SELECT owner, updated_at FROM conversations WHERE id = ?`, id).Scan(&got, &updated)
	if !errors.Is(err, sql.ErrNoRows) {
		return got, updated, err
	}
	_, err = tx.Exec(ctx, `INSERT INTO conversations (id, owner, title, created_at, updated_at)
		VALUES (?, ?, '', ?, ?)`, id, owner, now, now)
	return owner, now, err
}

// LockOwner needs no lock of its own either.
func (dialect) LockOwner(context.Context, sqlstore.Queryer, string) error { return nil }

// MayHaveCommitted is false: the writer's error means nothing was written
// (see writer.do).
func (dialect) MayHaveCommitted(error) bool { return false }

// IsUniqueViolation reports whether err is SQLite's UNIQUE or PRIMARY KEY
// constraint failure.
func (dialect) IsUniqueViolation(err error) bool {
	var e *sqlite.Error
	if !errors.As(err, &e) {
		return false
	}
	return e.Code() == sqlite3.SQLITE_CONSTRAINT_UNIQUE || e.Code() == sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY
}

// NoLimit is SQLite's LIMIT -1.
func (dialect) NoLimit() any { return -1 }

// Bytewise is SQLite's BINARY collation, its default.
func (dialect) Bytewise() string { return "COLLATE BINARY" }
