package sqlite

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/store/sqlstore"
)

// writer makes every write of the store on the write connection, from one
// goroutine, and commits the writes that queued together in one
// transaction (group commit): a batch is one BEGIN IMMEDIATE … COMMIT, each
// write in it under a savepoint, so that a write that fails undoes only
// itself. A write returns once its batch has committed.
//
// SQLite lets one writer in at a time, and a commit's cost (the WAL frames
// of every page it touched) is paid once per batch: under load the pages a
// batch's writes share (the newest messages, their indexes) are written
// once. One goroutine running the batches back to back also leaves no gap
// between writes for the scheduler to wake the next writer, which is what
// held a connection handed from goroutine to goroutine to about a
// thousand writes a second on two busy processors.
//
// A write with priority (sqlstore.WithPriority: a turn's end, which a Stop
// waits on) goes in the next batch, before every write without it that
// waits, and a batch holds only writes of one kind: an end does not wait
// for the sends queued beside it.
type writer struct {
	db    *sql.DB
	stmts *stmtCache

	mu       sync.Mutex
	priority []*writeOp // waiting, in order; guarded by mu
	others   []*writeOp // guarded by mu
	closed   bool       // guarded by mu

	wake chan struct{} // a write is queued (or the writer closed)
	done chan struct{} // closed when the loop has returned

	batches atomic.Int64 // transactions committed or rolled back, for tests

	// walFrames is the WAL's length in pages, as the checkpointer last
	// saw it; lastRestart is when the loop last tried to let it start
	// over (see restartWAL).
	walFrames   atomic.Int64
	lastRestart time.Time
}

// maxBatch bounds the writes of one transaction, so that the first of a
// long queue does not wait for all the others to run.
const maxBatch = 64

type writeOp struct {
	ctx   context.Context
	fn    func(context.Context, conn) error
	state atomic.Int32 // opWaiting, then opStarted or opAbandoned
	err   error        // fn's, or the batch's; set before done is closed
	done  chan struct{}
}

const (
	opWaiting int32 = iota
	opStarted
	opAbandoned
)

var errWriterClosed = errors.New("sqlite: store closed")

func newWriter(db *sql.DB, stmts *stmtCache) *writer {
	w := &writer{db: db, stmts: stmts, wake: make(chan struct{}, 1), done: make(chan struct{})}
	go w.loop()
	return w
}

// do runs fn as one write, in a transaction, and returns fn's error or the
// commit's. fn must use the context and the conn it is given: the context
// does not end with ctx, because interrupting a statement can roll back
// the whole transaction, the other writes of its batch with it.
//
// While the write waits, ctx ending gives it up: do returns ctx's error
// and fn never runs. Once fn has started, do returns what fn and the
// commit did, whatever ctx does meanwhile, so that an error always means
// nothing was written.
func (w *writer) do(ctx context.Context, fn func(context.Context, conn) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	op := &writeOp{ctx: ctx, fn: fn, done: make(chan struct{})}
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return errWriterClosed
	}
	if sqlstore.HasPriority(ctx) {
		w.priority = append(w.priority, op)
	} else {
		w.others = append(w.others, op)
	}
	w.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
	select {
	case <-op.done:
		return op.err
	case <-ctx.Done():
		if op.state.CompareAndSwap(opWaiting, opAbandoned) {
			return ctx.Err()
		}
		<-op.done
		return op.err
	}
}

// close runs the writes already queued, refuses new ones and returns once
// the loop has ended.
func (w *writer) close() {
	w.mu.Lock()
	w.closed = true
	w.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
	<-w.done
}

func (w *writer) loop() {
	defer close(w.done)
	for {
		batch, closed := w.take()
		if len(batch) > 0 {
			w.run(batch)
			w.restartWAL(false)
			continue
		}
		if closed {
			return
		}
		w.restartWAL(true)
		<-w.wake
	}
}

// The WAL starts over once it holds walRestartFrames pages (64 MiB of
// 4 KiB pages), the writer trying at most every restartEvery while idle, or
// between batches when it has not been idle for restartOverdue; the restart
// cuts the file to walKeepBytes (journal_size_limit), as large, so that the
// next round of writes overwrites the file instead of extending it.
var (
	walRestartFrames int64 = 16384
	walKeepBytes           = 64 << 20
	restartEvery           = time.Second
	restartOverdue         = 10 * time.Second
	restartWait            = 10 * time.Millisecond
)

// restartWAL lets a grown WAL start over from its beginning. SQLite does
// that in the first write after a checkpoint has copied every page of the
// WAL into the database file and every read that used the WAL has ended.
// The background checkpointer seldom gets there under load: writes keep
// coming while it copies, and reads keep starting on the WAL's newest
// pages, so the file grew without end (gigabytes at thousands of turns a
// second). The writer therefore runs a RESTART checkpoint between its own
// writes, on its own connection: nothing is written meanwhile, so it copies
// only the pages the checkpointer has not yet copied, then waits at most
// restartWait for the reads already running (reads starting meanwhile read
// the database file alone), and the next write starts the WAL over. When
// the reads outlast the wait it tries again later. A write queued
// meanwhile waits for the copy, its two fsyncs and that wait: 14-83 ms
// (median 28) in a probe at 300-450 turns a second.
func (w *writer) restartWAL(idle bool) {
	if w.walFrames.Load() < walRestartFrames {
		return
	}
	wait := restartEvery
	if !idle {
		wait = restartOverdue
	}
	now := time.Now()
	if now.Sub(w.lastRestart) < wait {
		return
	}
	w.lastRestart = now
	ctx := context.Background()
	c, err := w.db.Conn(ctx)
	if err != nil {
		return
	}
	defer c.Close()
	if _, err := c.ExecContext(ctx, fmt.Sprintf("PRAGMA busy_timeout = %d", restartWait.Milliseconds())); err != nil {
		return
	}
	var busy, frames, copied int
	err = c.QueryRowContext(ctx, "PRAGMA wal_checkpoint(RESTART)").Scan(&busy, &frames, &copied)
	if err == nil && busy == 0 {
		w.walFrames.Store(0)
	}
	if _, err := c.ExecContext(ctx, fmt.Sprintf("PRAGMA busy_timeout = %d", busyTimeout.Milliseconds())); err != nil {
		// The connection would keep the short timeout: drop it.
		_ = c.Raw(func(any) error { return driver.ErrBadConn })
	}
}

// take dequeues the next batch: the writes with priority waiting, or else
// the others, maxBatch at most.
func (w *writer) take() ([]*writeOp, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	q := &w.priority
	if len(*q) == 0 {
		q = &w.others
	}
	n := min(len(*q), maxBatch)
	if n == 0 {
		return nil, w.closed
	}
	batch := make([]*writeOp, n)
	copy(batch, *q)
	rest := copy(*q, (*q)[n:])
	clear((*q)[rest:])
	*q = (*q)[:rest]
	return batch, w.closed
}

// run makes one batch's writes in one transaction. The writes given up
// meanwhile are left out.
func (w *writer) run(batch []*writeOp) {
	ops := batch[:0]
	for _, op := range batch {
		if op.state.CompareAndSwap(opWaiting, opStarted) {
			ops = append(ops, op)
		}
	}
	if len(ops) == 0 {
		return
	}
	defer func() {
		for _, op := range ops {
			close(op.done)
		}
	}()
	w.batches.Add(1)
	bg := context.Background()
	// Statements first met in a transaction are prepared now, while the
	// pool's one connection is free.
	w.stmts.prepareWanted(bg)
	tx, err := w.db.BeginTx(bg, nil)
	if err != nil {
		for _, op := range ops {
			op.err = err
		}
		return
	}
	q := conn{c: tx, cache: w.stmts, tx: tx}
	if len(ops) == 1 {
		// Alone, a write needs no savepoint: the transaction is its own.
		op := ops[0]
		if op.err = op.fn(context.WithoutCancel(op.ctx), q); op.err != nil {
			_ = tx.Rollback()
			return
		}
		op.err = tx.Commit()
		return
	}
	var broken error
	for _, op := range ops {
		ctx := context.WithoutCancel(op.ctx)
		if _, err := q.Exec(ctx, "SAVEPOINT w"); err != nil {
			broken = err
			break
		}
		if op.err = op.fn(ctx, q); op.err != nil {
			// A failure SQLite answers by rolling back the whole
			// transaction (a full disk, an I/O error) has taken the
			// savepoint with it: that breaks the batch.
			if _, err := q.Exec(ctx, "ROLLBACK TO w"); err != nil {
				broken = err
				break
			}
		}
		if _, err := q.Exec(ctx, "RELEASE w"); err != nil {
			broken = err
			break
		}
	}
	if broken == nil {
		broken = tx.Commit()
	} else {
		_ = tx.Rollback()
	}
	if broken != nil {
		for _, op := range ops {
			if op.err == nil {
				op.err = broken
			}
		}
	}
}
