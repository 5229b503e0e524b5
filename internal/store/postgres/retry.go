package postgres

import (
	"context"
	"errors"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// A statement run on the pool, outside a transaction, that fails because
// its connection was dead before it ran (the server terminated the
// backend: a restart, a failover, pg_terminate_backend, an idle timeout in
// a proxy) is run again on another connection. The pool finds such a
// connection dead only by using it, and pings only those idle for over a
// second, so after a restart every pooled connection fails once; without
// this, each of those failures was a worker's FinishTurn or a send lost.
//
// Only errors that say the statement did not run are retried: a write
// whose connection broke while the server ran it is not repeated, since it
// may have committed.

// retries bounds how often one statement is tried again: enough to go
// through every pooled connection (each may be dead) and then wait a little
// for a server that is starting.
func (c conn) retries() int { return c.maxConns + 3 }

// notRun reports whether err says that the statement it answers never
// ran, so that running it again cannot apply it twice, and how long to wait
// before that: nothing when another connection may be fine at once, a
// growing delay when the server is not taking connections.
func notRun(err error, attempt int) (time.Duration, bool) {
	var (
		pe *pgconn.PgError
		ce *pgconn.ConnectError
	)
	backoff := min(100*time.Millisecond<<attempt, time.Second)
	var cf commitFailed
	switch {
	case err == nil, errors.As(err, &cf):
		return 0, false
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return 0, false
	case errors.As(err, &ce):
		return backoff, true // no connection at all
	case errors.As(err, &pe):
		switch {
		case pe.Code == "57P03": // cannot_connect_now: starting or stopping
			return backoff, true
		case strings.HasPrefix(pe.Code, "57P"), strings.HasPrefix(pe.Code, "08"):
			// admin_shutdown, crash_shutdown, idle_session_timeout (57P05);
			// a connection exception: the backend was gone before it ran
			// the statement (a FATAL in place of its answer rolls back
			// what an autocommit statement did).
			return 0, true
		}
		return 0, false
	case pgconn.SafeToRetry(err):
		return 0, true // nothing was sent
	}
	return 0, false
}

// retry runs fn until it succeeds, fails with an error that notRun does not
// take, or has been tried c.retries() times.
func (c conn) retry(ctx context.Context, fn func() error) error {
	var err error
	for attempt := range c.retries() {
		if err = fn(); err == nil {
			return nil
		}
		wait, again := notRun(err, attempt)
		if !again || attempt == c.retries()-1 {
			break
		}
		if wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return unreachable(err)
			}
		}
	}
	return unreachable(err)
}

// retryRow is the row of a QueryRow on the pool: Scan runs the query, again
// as retry allows.
type retryRow struct {
	c     conn
	ctx   context.Context
	query string
	args  []any
}

func (r retryRow) Scan(dest ...any) error {
	return r.c.retry(r.ctx, func() error { return r.c.c.QueryRow(r.ctx, r.query, r.args...).Scan(dest...) })
}

// retryRows is the result of a Query on the pool. A dead connection may
// show only when the first row is read (pgx sends a statement it has
// prepared before without waiting for an answer), so until a row has been
// read, the query is run again as retry allows.
type retryRows struct {
	pgxRows
	c       conn
	ctx     context.Context
	query   string
	args    []any
	started bool
	err     error // of running the query again
}

func (r *retryRows) Next() bool {
	if r.started || r.err != nil {
		return r.err == nil && r.pgxRows.Next()
	}
	for attempt := 0; ; attempt++ {
		if r.pgxRows.Next() {
			r.started = true
			return true
		}
		wait, again := notRun(r.Rows.Err(), attempt)
		if !again || attempt >= r.c.retries()-1 {
			return false
		}
		r.Rows.Close()
		if wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-r.ctx.Done():
				t.Stop()
				r.err = r.ctx.Err()
				return false
			}
		}
		var rows pgx.Rows
		r.err = r.c.retry(r.ctx, func() (err error) {
			rows, err = r.c.c.Query(r.ctx, r.query, r.args...)
			return err
		})
		if r.err != nil {
			return false
		}
		r.Rows = rows
	}
}

func (r *retryRows) Err() error {
	if r.err != nil {
		return r.err
	}
	return r.pgxRows.Err()
}

// commitFailed is the error of a transaction's COMMIT, which is never run
// again: it may have committed before the connection failed.
type commitFailed struct{ err error }

func (e commitFailed) Error() string { return e.err.Error() }
func (e commitFailed) Unwrap() error { return e.err }
