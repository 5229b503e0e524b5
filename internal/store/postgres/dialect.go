package postgres

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"syscall"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/store/sqlstore"
)

// pgxConn is what *pgxpool.Pool and pgx.Tx share.
type pgxConn interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// conn runs the shared queries on the pool or in a transaction, their ?
// placeholders numbered as PostgreSQL wants them. On the pool (maxConns >
// 0) a statement that a dead connection did not run is run again (see
// retry.go).
type conn struct {
	c        pgxConn
	maxConns int // the pool's; 0 in a transaction
}

var _ sqlstore.Queryer = conn{}

func (c conn) QueryRow(ctx context.Context, query string, args ...any) sqlstore.Scanner {
	if c.maxConns > 0 {
		return retryRow{c: c, ctx: ctx, query: rebind(query), args: args}
	}
	return pgxRow{c.c.QueryRow(ctx, rebind(query), args...)}
}

func (c conn) Query(ctx context.Context, query string, args ...any) (sqlstore.Rows, error) {
	query = rebind(query)
	if c.maxConns > 0 {
		var rows pgx.Rows
		err := c.retry(ctx, func() (err error) {
			rows, err = c.c.Query(ctx, query, args...)
			return err
		})
		if err != nil {
			return nil, err
		}
		return &retryRows{pgxRows: pgxRows{rows}, c: c, ctx: ctx, query: query, args: args}, nil
	}
	rows, err := c.c.Query(ctx, query, args...)
	if err != nil {
		return nil, unreachable(err)
	}
	return pgxRows{rows}, nil
}

func (c conn) Exec(ctx context.Context, query string, args ...any) (int64, error) {
	query = rebind(query)
	var tag pgconn.CommandTag
	run := func() (err error) {
		tag, err = c.c.Exec(ctx, query, args...)
		return err
	}
	if c.maxConns > 0 {
		if err := c.retry(ctx, run); err != nil {
			return 0, err
		}
	} else if err := run(); err != nil {
		return 0, unreachable(err)
	}
	return tag.RowsAffected(), nil
}

// pgxRow marks the Scan error of a server that could not be reached.
type pgxRow struct{ pgx.Row }

func (r pgxRow) Scan(dest ...any) error { return unreachable(r.Row.Scan(dest...)) }

// pgxRows gives pgx.Rows the Close of [sqlstore.Rows]; its errors come from
// Err.
type pgxRows struct{ pgx.Rows }

func (r pgxRows) Close() error {
	r.Rows.Close()
	return nil
}

func (r pgxRows) Err() error { return unreachable(r.Rows.Err()) }

// unreachable adds chat.ErrUnavailable to an error that says the server
// could not be reached or went away (down, restarting, the network), so
// that clients are told to try again rather than of an internal error.
func unreachable(err error) error {
	if err == nil || errors.Is(err, chat.ErrUnavailable) ||
		errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err // the caller's own end (also a net.Error)
	}
	var (
		ce *pgconn.ConnectError
		ne net.Error
		pe *pgconn.PgError
	)
	switch {
	case errors.As(err, &ce), errors.As(err, &ne), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET), pgconn.SafeToRetry(err):
	case errors.As(err, &pe) && (strings.HasPrefix(pe.Code, "08") || strings.HasPrefix(pe.Code, "57P")):
		// connection_exception; admin_shutdown, crash_shutdown,
		// cannot_connect_now (the server starting or stopping)
	default:
		return err
	}
	return fmt.Errorf("%w: %w", chat.ErrUnavailable, err)
}

// rebind numbers the ? placeholders of query outside single-quoted literals
// as $1, $2, ….
func rebind(query string) string {
	if !strings.Contains(query, "?") {
		return query
	}
	var b strings.Builder
	b.Grow(len(query) + 16)
	n, quoted := 0, false
	for i := range len(query) {
		switch c := query[i]; {
		case c == '\'':
			quoted = !quoted // '' inside a literal toggles twice
			b.WriteByte(c)
		case c == '?' && !quoted:
			n++
			b.WriteByte('$')
			b.WriteString(strconv.Itoa(n))
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

// dialect is how PostgreSQL keeps concurrent sends apart: row and advisory
// locks in READ COMMITTED transactions.
type dialect struct {
	pool *pgxpool.Pool
}

var _ sqlstore.Dialect = dialect{}

// InTx runs fn in a transaction. One whose connection failed before it ran
// a statement has changed nothing, so it is run again from the start on
// another connection, as the pool's single statements are (see retry.go);
// a COMMIT that fails is not, since it may have committed.
func (d dialect) InTx(ctx context.Context, fn func(context.Context, sqlstore.Queryer) error) error {
	c := conn{c: d.pool, maxConns: int(d.pool.Config().MaxConns)}
	return c.retry(ctx, func() error {
		t, err := d.pool.Begin(ctx)
		if err != nil {
			return err
		}
		if err := fn(ctx, conn{c: t}); err != nil {
			// Rolled back even when ctx is done, so that the connection
			// goes back to the pool clean rather than being closed.
			_ = t.Rollback(context.WithoutCancel(ctx))
			return err
		}
		if err := t.Commit(ctx); err != nil {
			return commitFailed{err}
		}
		return nil
	})
}

// MayHaveCommitted reports whether err is a failed COMMIT's.
func (dialect) MayHaveCommitted(err error) bool {
	var cf commitFailed
	return errors.As(err, &cf)
}

// LockConversation makes concurrent sends to one conversation queue on its
// row lock (SELECT … FOR UPDATE). Under READ COMMITTED every later statement
// of the transaction sees the sends that committed while it waited.
func (dialect) LockConversation(ctx context.Context, tx sqlstore.Queryer, id, owner string, now int64) (string, int64, error) {
	for range 3 {
		// Create the conversation if need be, so that there is a row to lock.
		_, err := tx.Exec(ctx, `INSERT INTO conversations (id, owner, title, created_at, updated_at)
			VALUES (?, ?, '', ?, ?) ON CONFLICT (id) DO NOTHING`, id, owner, now, now)
		if err != nil {
			return "", 0, err
		}
		var got string
		var updated int64
		err = tx.QueryRow(ctx, `SELECT owner, updated_at FROM conversations WHERE id = ? FOR UPDATE`, id).Scan(&got, &updated)
		if !errors.Is(err, pgx.ErrNoRows) {
			return got, updated, err
		}
		// Deleted between the two statements (a delete held the lock this
		// waited for): the send goes to the conversation created afresh,
		// as a send made after the delete does.
	}
	return "", 0, fmt.Errorf("conversation %s: deleted as often as it was created", id)
}

// ownerLockSpace is the first key of the transaction advisory lock that
// serializes one owner's sends while Send counts the owner's active turns;
// the second key is hashtext(owner).
const ownerLockSpace int32 = 0x7472 // "tr"

// LockOwner takes the owner's transaction advisory lock.
func (dialect) LockOwner(ctx context.Context, tx sqlstore.Queryer, owner string) error {
	_, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(?, hashtext(?))`, ownerLockSpace, owner)
	return err
}

// uniqueViolation is PostgreSQL's SQLSTATE for a unique constraint failure.
const uniqueViolation = "23505"

func (dialect) IsUniqueViolation(err error) bool {
	var e *pgconn.PgError
	return errors.As(err, &e) && e.Code == uniqueViolation
}

// NoLimit is NULL, which PostgreSQL's LIMIT takes as no limit.
func (dialect) NoLimit() any { return nil }

// Bytewise is the "C" collation: a database made with another (en_US.UTF-8,
// an ICU locale) would otherwise order ids as words, unlike SQLite.
func (dialect) Bytewise() string { return `COLLATE "C"` }
