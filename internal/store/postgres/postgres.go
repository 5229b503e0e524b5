// Package postgres implements [store.Store] on PostgreSQL, which several
// tokenrelay gateways and workers can share.
package postgres

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"net"
	neturl "net/url"
	"os"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
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

// DefaultConnectTimeout bounds the setting up of a connection (the TCP
// connection, TLS and the login) when neither the URL nor PGCONNECT_TIMEOUT
// sets connect_timeout. Without it, a server that takes the connection but
// never answers (a hung one, a proxy in front of one that is gone) would
// hold a process starting on it for good, with nothing to say.
const DefaultConnectTimeout = 10 * time.Second

// parseConfig parses url as pgxpool does, with DefaultConnectTimeout
// unless a connect_timeout is given (0 there still means none).
func parseConfig(url string) (*pgxpool.Config, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, err
	}
	if os.Getenv("PGCONNECT_TIMEOUT") == "" && !connectTimeoutGiven(url) {
		cfg.ConnConfig.ConnectTimeout = DefaultConnectTimeout
	}
	return cfg, nil
}

// keywordConnectTimeout finds connect_timeout as a keyword of a
// key=value connection string.
var keywordConnectTimeout = regexp.MustCompile(`(^|\s)connect_timeout\s*=`)

// connectTimeoutGiven reports whether dsn, a URL or a key=value string,
// sets connect_timeout itself (as a query parameter or a keyword, not as
// part of another one's value).
func connectTimeoutGiven(dsn string) bool {
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		u, err := neturl.Parse(dsn)
		return err == nil && u.Query().Has("connect_timeout")
	}
	return keywordConnectTimeout.MatchString(dsn)
}

func open(ctx context.Context, url string) (*DB, error) {
	cfg, err := parseConfig(url)
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
	cfg, err := parseConfig(url)
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

const (
	// holdPingEvery is how often Hold checks its connection: a lost hold
	// lets another process take itself for the store's only user.
	holdPingEvery = 5 * time.Second
	// holdRetryMax bounds the wait between attempts to take a lost hold
	// again.
	holdRetryMax = 10 * time.Second
	// holdPingTimeout is how long a ping may take before its connection is
	// given up, and the lock with it: a busy server or a slow network must
	// not cost the lock (a dead server is noticed by TCP keepalives too).
	holdPingTimeout = 30 * time.Second
	// holdCallTimeout bounds Alone and EndAlone, which run at start and
	// shutdown, whatever a ping in progress: a server that stops
	// answering must not hang them.
	holdCallTimeout = 10 * time.Second
)

// Hold is a process's hold on the store (see DB.Hold).
type Hold struct {
	cfg   *pgx.ConnConfig
	log   *slog.Logger
	every time.Duration

	mu       holdMutex // held while conn is in use
	rawMu    sync.Mutex
	raw      net.Conn  // conn's network connection, for abort; guarded by rawMu
	conn     *pgx.Conn // nil while the hold is lost
	alone    bool      // conn holds the lock exclusively too
	released bool

	lost chan struct{} // wakes watch when a call found conn gone
	stop context.CancelFunc
	done chan struct{}
}

// Hold takes the store's lock shared, until Release or the process's end:
// a session advisory lock on a connection of its own, besides the pool's.
// It waits, as long as ctx allows, while another process holds it alone
// (see Alone). Should that connection break (a server restart, a proxy
// ending idle connections), the lock goes with it: the connection is
// pinged every few seconds, and a lost lock is taken again on a new one;
// log says when it is lost and when it is held again.
func (db *DB) Hold(ctx context.Context, log *slog.Logger) (*Hold, error) {
	return db.hold(ctx, log, holdPingEvery)
}

func (db *DB) hold(ctx context.Context, log *slog.Logger, every time.Duration) (*Hold, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cfg := db.pool.Config().ConnConfig.Copy()
	// TCP keepalives notice a dead server where no ping can, while a take
	// waits in pg_advisory_lock_shared; connect_timeout still applies.
	d := &net.Dialer{
		Timeout:         cfg.ConnectTimeout,
		KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: 15 * time.Second, Interval: 5 * time.Second, Count: 3},
	}
	cfg.DialFunc = d.DialContext
	h := &Hold{cfg: cfg, log: log, every: every, mu: make(holdMutex, 1), lost: make(chan struct{}, 1), done: make(chan struct{})}
	conn, err := h.take(ctx, true)
	if err != nil {
		return nil, err
	}
	h.setConnLocked(conn)
	wctx, stop := context.WithCancel(context.Background())
	h.stop = stop
	go h.watch(wctx)
	return h, nil
}

// take connects and takes the lock shared, waiting for it when wait is
// set; without wait, a nil conn and error say another process holds it
// alone.
func (h *Hold) take(ctx context.Context, wait bool) (*pgx.Conn, error) {
	conn, err := pgx.ConnectConfig(ctx, h.cfg)
	if err != nil {
		return nil, err
	}
	// Timeouts the URL, role or database may set (idle_session_timeout on
	// managed databases) would end the hold's idle session. They are set
	// here, not as startup parameters, which servers before 14 (for
	// idle_session_timeout) and PgBouncer refuse.
	_, err = conn.Exec(ctx, `SELECT set_config(name, '0', false) FROM pg_settings
		WHERE name IN ('idle_session_timeout', 'idle_in_transaction_session_timeout', 'statement_timeout')`)
	if err == nil {
		if wait {
			_, err = conn.Exec(ctx, `SELECT pg_advisory_lock_shared($1, hashtext(current_schema()))`, holdLockSpace)
		} else {
			var ok bool
			err = conn.QueryRow(ctx, `SELECT pg_try_advisory_lock_shared($1, hashtext(current_schema()))`, holdLockSpace).Scan(&ok)
			if err == nil && !ok {
				conn.Close(context.WithoutCancel(ctx))
				return nil, nil
			}
		}
	}
	if err != nil {
		conn.Close(context.WithoutCancel(ctx))
		return nil, err
	}
	return conn, nil
}

// watch pings the hold's connection every h.every and, once it is gone,
// takes the hold again on a new one, retrying with backoff.
func (h *Hold) watch(ctx context.Context) {
	defer close(h.done)
	tick := time.NewTicker(h.every)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-h.lost:
		}
		if h.ping(ctx) {
			continue
		}
		for wait := 100 * time.Millisecond; !h.held(); wait = min(2*wait, holdRetryMax) {
			conn, err := h.take(ctx, true)
			if err == nil {
				h.mu.Lock()
				if !h.installLocked(conn) {
					conn.Close(context.Background())
				}
				h.mu.Unlock()
				break
			}
			if ctx.Err() != nil {
				return
			}
			h.log.Debug("take the store's hold again", "err", err, "retry_in", wait)
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
		}
	}
}

// ping reports whether the hold is there, dropping a connection that does
// not answer.
func (h *Hold) ping(ctx context.Context) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.conn == nil {
		return false
	}
	pctx, cancel := context.WithTimeout(ctx, holdPingTimeout)
	defer cancel()
	err := h.conn.Ping(pctx)
	if err != nil && ctx.Err() == nil {
		h.dropLocked(err)
		return false
	}
	return true
}

// installLocked makes conn the hold's, unless it has one again or is
// released.
func (h *Hold) installLocked(conn *pgx.Conn) bool {
	if h.conn != nil || h.released {
		return false
	}
	h.setConnLocked(conn)
	h.log.Info("the store's lock is held again")
	return true
}

// setConnLocked makes conn the hold's connection (nil: none).
func (h *Hold) setConnLocked(conn *pgx.Conn) {
	h.conn = conn
	h.rawMu.Lock()
	h.raw = nil
	if conn != nil {
		h.raw = conn.PgConn().Conn()
	}
	h.rawMu.Unlock()
}

// abort closes the hold's network connection under whatever uses it (a
// ping waiting on a server that does not answer), which then fails and
// drops it; the server ends the session, and its locks, as it sees the
// connection close.
func (h *Hold) abort() {
	h.rawMu.Lock()
	defer h.rawMu.Unlock()
	if h.raw != nil {
		_ = h.raw.Close()
	}
}

// holdMutex is the hold's mutex: a channel, so that Alone and EndAlone can
// stop waiting for it.
type holdMutex chan struct{}

func (m holdMutex) Lock()   { m <- struct{}{} }
func (m holdMutex) Unlock() { <-m }

// lockCtx locks m unless ctx ends first, and reports whether it did.
func (m holdMutex) lockCtx(ctx context.Context) bool {
	if ctx.Err() != nil {
		return false
	}
	select {
	case m <- struct{}{}:
		return true
	case <-ctx.Done():
		return false
	}
}

// dropLocked ends a hold whose connection failed with err, and has watch
// take it again.
func (h *Hold) dropLocked(err error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	h.conn.Close(ctx) // a server that does not answer is not waited for
	h.setConnLocked(nil)
	h.alone = false
	h.log.Warn("the store's lock is lost with its connection; until it is held again, another process may take itself for the store's only user", "err", err)
	select {
	case h.lost <- struct{}{}:
	default:
	}
}

// Alone takes the lock exclusively as well, and reports whether it could:
// only when no other process holds the store. EndAlone gives the exclusive
// hold back. A lost hold is taken again first, if it can be now.
func (h *Hold) Alone(ctx context.Context) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, holdCallTimeout)
	defer cancel()
	if !h.mu.lockCtx(ctx) {
		// A ping waits on a slow server: not alone, as far as anyone knows.
		return false, fmt.Errorf("the store's lock is busy: %w", context.Cause(ctx))
	}
	defer h.mu.Unlock()
	for retried := false; ; retried = true {
		if h.released {
			return false, errors.New("the store's hold is released")
		}
		if h.conn == nil {
			conn, err := h.take(ctx, false)
			if err != nil {
				return false, fmt.Errorf("the store's lock is lost: %w", err)
			}
			if conn == nil {
				return false, nil // another process is alone meanwhile
			}
			h.installLocked(conn)
		}
		var ok bool
		err := h.conn.QueryRow(ctx, `SELECT pg_try_advisory_lock($1, hashtext(current_schema()))`, holdLockSpace).Scan(&ok)
		if err == nil {
			h.alone = ok
			return ok, nil
		}
		closed := h.conn.IsClosed()
		if !closed && pgconn.SafeToRetry(err) {
			return false, err // nothing was sent: nothing was taken
		}
		// Whether the lock was taken is unknown: the connection goes, and
		// the exclusive lock with it, should it have been.
		h.dropLocked(err)
		if !closed || retried {
			return false, err
		}
	}
}

// EndAlone gives back the exclusive hold Alone took; a hold lost meanwhile
// has none to give back.
func (h *Hold) EndAlone(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, holdCallTimeout)
	defer cancel()
	if !h.mu.lockCtx(ctx) {
		// A ping holds the connection on a server that does not answer:
		// cut it under the ping, which then drops it, and the exclusive
		// lock with it.
		h.abort()
		h.mu.Lock()
	}
	defer h.mu.Unlock()
	if h.conn == nil || !h.alone {
		return nil
	}
	_, err := h.conn.Exec(ctx, `SELECT pg_advisory_unlock($1, hashtext(current_schema()))`, holdLockSpace)
	if err != nil {
		// The exclusive lock must not outlive this call, or it would keep
		// every other process out for this one's life: the connection
		// goes, and the lock with it (watch takes the shared one again).
		h.dropLocked(err)
		return nil
	}
	h.alone = false
	return nil
}

// Release ends the hold.
func (h *Hold) Release() {
	h.stop()
	<-h.done
	h.mu.Lock()
	defer h.mu.Unlock()
	h.released = true
	if h.conn != nil {
		h.conn.Close(context.Background())
		h.conn = nil
	}
}

// held reports whether the hold has a connection (Alone may have taken it
// again).
func (h *Hold) held() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.conn != nil
}

// pid is the server process of the hold's connection, 0 while it is lost.
func (h *Hold) pid() uint32 {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.conn == nil {
		return 0
	}
	return h.conn.PgConn().PID()
}
