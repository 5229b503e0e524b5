// Package postgres implements [store.Store] on PostgreSQL, which several
// tokenrelay gateways and workers can share.
package postgres

import (
	"context"
	"database/sql"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"

	"github.com/tokenrelay/tokenrelay/internal/store"
	"github.com/tokenrelay/tokenrelay/internal/store/migrations"
	"github.com/tokenrelay/tokenrelay/internal/store/sqlstore"
)

var _ store.Store = (*DB)(nil)

// DB is the history store in a PostgreSQL database. It is safe for concurrent
// use, also by several processes sharing the database; Close releases it.
//
// Every query runs in the schema that the connection's search_path names
// first (public by default); a URL may choose another with
// ?search_path=name.
type DB struct {
	*sqlstore.DB // the queries, on pool
	pool         *pgxpool.Pool
}

// Open connects to the PostgreSQL database at url (a postgres:// URL or a
// key=value string, which may carry pgxpool's pool_* settings) and applies
// any pending migrations, as Migrate does, before returning.
func Open(ctx context.Context, url string) (*DB, error) {
	db, err := open(ctx, url)
	if err != nil {
		return nil, fmt.Errorf("open postgres store: %w", err)
	}
	return db, nil
}

func open(ctx context.Context, url string) (*DB, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, err
	}
	if err := migrate(ctx, cfg); err != nil {
		return nil, err
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, err
	}
	c := conn{c: pool, maxConns: int(cfg.MaxConns)}
	return &DB{DB: sqlstore.New(c, c, dialect{pool}), pool: pool}, nil
}

// Migrate applies the pending migrations to the database at url and
// returns. It holds a PostgreSQL advisory lock while it works, so that
// processes starting together migrate one at a time and the later ones find
// nothing left to do; it waits for that lock as long as ctx allows.
func Migrate(ctx context.Context, url string) error {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	return migrate(ctx, cfg)
}

func migrate(ctx context.Context, cfg *pgxpool.Config) error {
	// goose speaks database/sql; a short-lived pool through pgx's adapter
	// does the migrating with the same connection settings.
	db := stdlib.OpenDB(*cfg.ConnConfig)
	defer db.Close()
	p, err := goose.NewProvider(goose.DialectPostgres, db, migrations.Postgres(),
		goose.WithTableName(migrations.TableName),
		goose.WithDisableGlobalRegistry(true),
		goose.WithLogger(goose.NopLogger()),
		goose.WithSessionLocker(advisoryLock{}),
	)
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	return migrations.Up(ctx, p)
}

// migrationLockID is the advisory lock key held while migrating. Advisory
// locks are per database, not per schema, so migrations of different
// schemas in one database also take turns.
const migrationLockID int64 = 0x746f6b656e72 // "tokenr"

// advisoryLock is a goose session locker that waits in pg_advisory_lock,
// bounded by ctx, rather than polling pg_try_advisory_lock every few seconds
// as goose's own locker does.
type advisoryLock struct{}

var _ lock.SessionLocker = advisoryLock{}

func (advisoryLock) SessionLock(ctx context.Context, conn *sql.Conn) error {
	if _, err := conn.ExecContext(ctx, `SELECT pg_advisory_lock($1)`, migrationLockID); err != nil {
		return fmt.Errorf("lock migrations: %w", err)
	}
	return nil
}

func (advisoryLock) SessionUnlock(ctx context.Context, conn *sql.Conn) error {
	var ok bool
	if err := conn.QueryRowContext(ctx, `SELECT pg_advisory_unlock($1)`, migrationLockID).Scan(&ok); err != nil {
		return fmt.Errorf("unlock migrations: %w", err)
	}
	if !ok {
		return errors.New("unlock migrations: lock was not held")
	}
	return nil
}

// Ping checks that the database answers.
func (s *DB) Ping(ctx context.Context) error {
	if err := s.pool.Ping(ctx); err != nil {
		return fmt.Errorf("ping: %w", err)
	}
	return nil
}

// Close closes the pool, waiting for the connections in use to be released.
func (s *DB) Close() error {
	s.pool.Close()
	return nil
}

// holdLockSpace is the first key of the session advisory lock Hold takes;
// the second is the hash of the schema, so that stores in schemas of one
// database are held apart.
const holdLockSpace int32 = 0x7472686f // "trho"

// Hold is a process's hold on the store (see DB.Hold).
type Hold struct {
	conn *pgx.Conn
}

// Hold takes the store's lock shared, until Release or the process's end:
// a session advisory lock on a connection of its own, besides the pool's.
// It waits, as long as ctx allows, while another process holds it alone
// (see Alone). (Should that connection break, the hold is gone: it guards
// against mistakes, not against a determined second process.)
func (db *DB) Hold(ctx context.Context) (*Hold, error) {
	conn, err := pgx.ConnectConfig(ctx, db.pool.Config().ConnConfig.Copy())
	if err != nil {
		return nil, err
	}
	h := &Hold{conn: conn}
	if _, err := h.conn.Exec(ctx, `SELECT pg_advisory_lock_shared($1, hashtext(current_schema()))`, holdLockSpace); err != nil {
		h.conn.Close(context.WithoutCancel(ctx))
		return nil, err
	}
	return h, nil
}

// Alone takes the lock exclusively as well, and reports whether it could:
// only when no other process holds the store. EndAlone gives the exclusive
// hold back.
func (h *Hold) Alone(ctx context.Context) (bool, error) {
	var ok bool
	err := h.conn.QueryRow(ctx, `SELECT pg_try_advisory_lock($1, hashtext(current_schema()))`, holdLockSpace).Scan(&ok)
	return ok, err
}

// EndAlone gives back the exclusive hold Alone took.
func (h *Hold) EndAlone(ctx context.Context) error {
	_, err := h.conn.Exec(ctx, `SELECT pg_advisory_unlock($1, hashtext(current_schema()))`, holdLockSpace)
	return err
}

// Release ends the hold.
func (h *Hold) Release() { h.conn.Close(context.Background()) }
