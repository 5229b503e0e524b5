// Package sqlite implements [store.Store] on an SQLite database file, for a
// single tokenrelay process (or several on one machine) that needs nothing
// else installed.
package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io/fs"
	"runtime"
	"strings"
	"time"

	"github.com/pressly/goose/v3"

	"github.com/tokenrelay/tokenrelay/internal/store"
	"github.com/tokenrelay/tokenrelay/internal/store/migrations"
	"github.com/tokenrelay/tokenrelay/internal/store/sqlstore"
)

var _ store.Store = (*DB)(nil)

// DB is the history store kept in one SQLite file. It is safe for concurrent
// use; Close releases it.
//
// Writes go through a single connection whose transactions begin IMMEDIATE,
// all made by one goroutine that commits the writes waiting together (see
// writer); across processes the database's write lock serializes them
// (waiting up to the busy timeout). A check made
// inside a write transaction, such as Send's "one active turn per
// conversation", therefore cannot race another writer. Reads use a separate
// pool of read-only connections and run concurrently with each other and with
// the writer, which WAL allows.
//
// The writer does not copy the WAL into the database file itself: a third
// connection does, in the background (see checkpointer). The writer only
// lets the WAL start over when it has grown (see writer.restartWAL).
type DB struct {
	*sqlstore.DB         // the queries, on read and write
	write        *sql.DB // one connection, BEGIN IMMEDIATE
	read         *sql.DB // query_only connections
	ckpt         *sql.DB // one connection, checkpointing
	stopCkpt     context.CancelFunc
	ckptDone     chan struct{}
	d            dialect
	path         string
}

// busyTimeout is how long a connection waits for another process's lock
// before failing with SQLITE_BUSY.
const busyTimeout = 5 * time.Second

// Open opens (creating it when missing) the SQLite database at path, a file
// name, and applies any pending migrations before returning. In-memory
// databases are not supported: the read and write pools must see one file.
func Open(ctx context.Context, path string) (*DB, error) {
	db, err := open(ctx, path)
	if err != nil {
		return nil, fmt.Errorf("open sqlite store: %w", err)
	}
	return db, nil
}

func open(ctx context.Context, path string) (*DB, error) {
	if path == "" || strings.HasPrefix(path, ":memory:") || strings.HasPrefix(path, "file:") || strings.ContainsRune(path, '?') {
		return nil, fmt.Errorf("unsupported database path %q: want a plain file name", path)
	}
	common := fmt.Sprintf("_pragma=busy_timeout(%d)&_pragma=foreign_keys(1)&_pragma=synchronous(NORMAL)", busyTimeout.Milliseconds())

	write, err := sql.Open("sqlite", path+"?"+common+"&_pragma=journal_mode(WAL)&_pragma=wal_autocheckpoint(0)"+
		fmt.Sprintf("&_pragma=journal_size_limit(%d)", walKeepBytes)+"&_txlock=immediate")
	if err != nil {
		return nil, err
	}
	write.SetMaxOpenConns(1)
	write.SetMaxIdleConns(1)
	write.SetConnMaxLifetime(0)
	write.SetConnMaxIdleTime(0)
	// The writer connects first so that the file exists and is in WAL mode
	// before a read-only connection opens it.
	if err := whileBusy(ctx, func() error { return write.PingContext(ctx) }); err != nil {
		write.Close()
		return nil, err
	}
	if err := migrateShared(ctx, write); err != nil {
		write.Close()
		return nil, err
	}
	// A file this process may not write opens all the same, read only,
	// and a migrated one is not written above: find out now rather than
	// at the first send.
	if err := writable(ctx, write); err != nil {
		write.Close()
		return nil, fmt.Errorf("database file %s is not writable: %w", path, err)
	}

	read, err := sql.Open("sqlite", path+"?"+common+"&_pragma=query_only(1)")
	if err != nil {
		write.Close()
		return nil, err
	}
	n := max(4, runtime.NumCPU())
	read.SetMaxOpenConns(n)
	read.SetMaxIdleConns(n)
	if err := read.PingContext(ctx); err != nil {
		write.Close()
		read.Close()
		return nil, err
	}
	ckpt, err := sql.Open("sqlite", path+"?"+common)
	if err != nil {
		write.Close()
		read.Close()
		return nil, err
	}
	ckpt.SetMaxOpenConns(1)
	d := dialect{write: write, read: read, writeStmts: &stmtCache{db: write}, readStmts: &stmtCache{db: read}}
	d.w = newWriter(write, d.writeStmts)
	db := &DB{DB: sqlstore.New(conn{c: read, cache: d.readStmts}, conn{c: write, cache: d.writeStmts, w: d.w}, d), write: write, read: read, ckpt: ckpt, d: d, path: path}
	cctx, stop := context.WithCancel(context.Background())
	db.stopCkpt, db.ckptDone = stop, make(chan struct{})
	go db.checkpointer(cctx)
	return db, nil
}

// checkpointEvery is how often the checkpointer copies the WAL into the
// database file.
const checkpointEvery = 200 * time.Millisecond

// checkpointer copies the WAL's committed pages into the database file
// every checkpointEvery, on a connection of its own, without waiting for
// readers or the writer (a PASSIVE checkpoint). SQLite's own automatic
// checkpoint runs inside the commit that fills the WAL to 1,000 pages, so
// about twice a second under load one write (a turn's start, end, or a
// cancel) waited for a thousand pages to be copied and synced: that was the
// tail of the writer's latency.
func (s *DB) checkpointer(ctx context.Context) {
	defer close(s.ckptDone)
	t := time.NewTicker(checkpointEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		// A failure (a busy lock held by another process) is retried at
		// the next tick.
		var busy, frames, copied int
		// A checkpoint that found another one running reads -1 frames.
		if err := s.ckpt.QueryRowContext(ctx, "PRAGMA wal_checkpoint(PASSIVE)").Scan(&busy, &frames, &copied); err == nil && frames >= 0 {
			s.d.w.walFrames.Store(int64(frames))
		}
	}
}

// migrateShared migrates db, which other processes may be migrating at
// the same moment (a gateway and workers starting together on a new file).
// Each migration is one transaction, but the check of which are applied
// is not in it: of two processes that both found one missing, the second
// to run it fails on a table the first created, and finds it applied when
// it checks again.
func migrateShared(ctx context.Context, db *sql.DB) error {
	// A process meets another's work at most once per migration (and
	// once for goose's own table); more is something else.
	sqls, _ := fs.Glob(migrations.SQLite(), "*.sql")
	left := len(sqls) + 1
	return whileBusy(ctx, func() error {
		err := migrate(ctx, db)
		if err != nil && strings.Contains(err.Error(), "already exists") && left > 0 {
			left--
			return fmt.Errorf("%w: %w", errBusy, err)
		}
		return err
	})
}

var errBusy = errors.New("busy")

// whileBusy calls fn until it returns something else than SQLite's
// "database is locked", for as long as busy_timeout. Some steps of opening
// a file that other processes open at the same moment fail so at once
// instead of waiting out busy_timeout: the first connection's switch of a
// new file to WAL mode, say.
func whileBusy(ctx context.Context, fn func() error) error {
	deadline := time.Now().Add(busyTimeout)
	for pause := 5 * time.Millisecond; ; pause = min(2*pause, 100*time.Millisecond) {
		err := fn()
		if err == nil || !(errors.Is(err, errBusy) || strings.Contains(err.Error(), "SQLITE_BUSY")) || time.Now().Add(pause).After(deadline) {
			return err
		}
		select {
		case <-time.After(pause):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func migrate(ctx context.Context, db *sql.DB) error {
	p, err := goose.NewProvider(goose.DialectSQLite3, db, migrations.SQLite(),
		goose.WithTableName(migrations.TableName),
		goose.WithDisableGlobalRegistry(true),
		goose.WithLogger(goose.NopLogger()),
	)
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	return migrations.Up(ctx, p)
}

// Ping checks that both connection pools answer.
func (s *DB) Ping(ctx context.Context) error {
	if err := s.write.PingContext(ctx); err != nil {
		return fmt.Errorf("ping: %w", err)
	}
	if err := s.read.PingContext(ctx); err != nil {
		return fmt.Errorf("ping: %w", err)
	}
	return nil
}

// Close closes the database. Calls in flight may fail.
func (s *DB) Close() error {
	s.d.w.close()
	s.stopCkpt()
	<-s.ckptDone
	s.d.readStmts.close()
	s.d.writeStmts.close()
	return errors.Join(s.ckpt.Close(), s.read.Close(), s.write.Close())
}

// writable runs a write statement that changes nothing on db, in a
// transaction rolled back: a read-only database refuses it (in WAL mode
// it refuses no BEGIN, only a write).
func writable(ctx context.Context, db *sql.DB) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	_, err = tx.ExecContext(ctx, `DELETE FROM conversations WHERE 0`)
	return err
}

// Path is the database file's name.
func (db *DB) Path() string { return db.path }
