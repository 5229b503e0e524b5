package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"slices"
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
	gate  *writeGate // the write pool's gate; nil on the read pool and in a transaction
}

// writeGate lets one writer at a time at the write pool, in the order they
// came, except that a write with priority (sqlstore.WithPriority: a turn's
// end) passes the writes without it that are waiting. The pool has one
// connection, and database/sql hands a released connection to a random
// waiter: under load a turn's end could wait behind any number of later
// writes. Under 20,000 tokens/s on two cores, with a new turn's send and
// start queueing beside every end, a cancelled turn's end waited 30 ms at
// the 99th percentile for the writes ahead of it, and ran in 1.
type writeGate struct {
	mu       sync.Mutex
	busy     bool            // a writer is in; guarded by mu
	priority []chan struct{} // waiting, in order; guarded by mu
	others   []chan struct{} // guarded by mu
}

func newWriteGate() *writeGate { return new(writeGate) }

// enter waits for the gate; a waiter is let in by closing its channel.
func (g *writeGate) enter(ctx context.Context) error {
	g.mu.Lock()
	if !g.busy {
		g.busy = true
		g.mu.Unlock()
		return nil
	}
	w := make(chan struct{})
	first := sqlstore.HasPriority(ctx)
	if first {
		g.priority = append(g.priority, w)
	} else {
		g.others = append(g.others, w)
	}
	g.mu.Unlock()
	select {
	case <-w:
		return nil
	case <-ctx.Done():
	}
	g.mu.Lock()
	removed := remove(&g.priority, w) || remove(&g.others, w)
	g.mu.Unlock()
	if !removed {
		// Let in meanwhile: pass the gate on.
		g.leave()
	}
	return ctx.Err()
}

func (g *writeGate) leave() {
	g.mu.Lock()
	var next chan struct{}
	switch {
	case len(g.priority) > 0:
		next = g.priority[0]
		g.priority = shift(g.priority)
	case len(g.others) > 0:
		next = g.others[0]
		g.others = shift(g.others)
	default:
		g.busy = false
	}
	g.mu.Unlock()
	if next != nil {
		close(next)
	}
}

// shift drops q's first waiter, reusing q's storage once it is empty.
func shift(q []chan struct{}) []chan struct{} {
	q[0] = nil
	if len(q) == 1 {
		return q[:0]
	}
	return q[1:]
}

// remove takes w out of *q, reporting whether it was there.
func remove(q *[]chan struct{}, w chan struct{}) bool {
	i := slices.Index(*q, w)
	if i < 0 {
		return false
	}
	*q = slices.Delete(*q, i, i+1)
	return true
}

// errRow is a row that failed before its query ran.
type errRow struct{ err error }

func (r errRow) Scan(...any) error { return r.err }

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
	if c.gate != nil {
		// The row holds the connection until it is scanned; the next
		// writer through the gate waits for it in the pool, alone.
		if err := c.gate.enter(ctx); err != nil {
			return errRow{err}
		}
		defer c.gate.leave()
	}
	if st := c.stmt(ctx, query); st != nil {
		return st.QueryRowContext(ctx, args...)
	}
	return c.c.QueryRowContext(ctx, query, args...)
}

func (c conn) Query(ctx context.Context, query string, args ...any) (sqlstore.Rows, error) {
	if c.gate != nil {
		if err := c.gate.enter(ctx); err != nil {
			return nil, err
		}
		defer c.gate.leave()
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
	if c.gate != nil {
		if err := c.gate.enter(ctx); err != nil {
			return 0, err
		}
		defer c.gate.leave()
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

// writeTx is Send's transaction. It holds the write gate until it ends.
type writeTx struct {
	conn
	tx    *sql.Tx
	leave func() // leaves the gate, once
}

func (t writeTx) Commit(context.Context) error {
	defer t.leave()
	return t.tx.Commit()
}

func (t writeTx) Rollback(context.Context) error {
	defer t.leave()
	return t.tx.Rollback()
}

// dialect is how SQLite serializes writes: through one connection whose
// transactions begin IMMEDIATE (see [DB]).
type dialect struct {
	write, read           *sql.DB
	writeStmts, readStmts *stmtCache
	gate                  *writeGate
}

var _ sqlstore.Dialect = dialect{}

// Begin begins IMMEDIATE (see Open): the transaction sees every committed
// send, and no other writer can commit until it ends.
func (d dialect) Begin(ctx context.Context) (sqlstore.Tx, error) {
	d.writeStmts.prepareWanted(ctx)
	if err := d.gate.enter(ctx); err != nil {
		return nil, err
	}
	t, err := d.write.BeginTx(ctx, nil)
	if err != nil {
		d.gate.leave()
		return nil, err
	}
	return writeTx{conn{c: t, cache: d.writeStmts, tx: t}, t, sync.OnceFunc(d.gate.leave)}, nil
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

// NoLimit is SQLite's LIMIT -1.
func (dialect) NoLimit() any { return -1 }
