package postgres

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/tokenrelay/tokenrelay/internal/store/postgres/pgtest"
)

// openDB opens a store at url, closed when t ends.
func openDB(t *testing.T, url string) *DB {
	t.Helper()
	db, err := Open(t.Context(), url)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// takeHold takes db's hold, released when t ends.
func takeHold(t *testing.T, db *DB, log *slog.Logger, every time.Duration) *Hold {
	t.Helper()
	h, err := db.hold(t.Context(), log, every)
	if err != nil {
		t.Fatalf("hold: %v", err)
	}
	t.Cleanup(h.Release)
	return h
}

// admin connects to the test database outside any hold.
func admin(t *testing.T) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), os.Getenv(pgtest.EnvURL))
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// waitFor polls cond until it holds, failing t after 30 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// gone reports whether the server process pid has ended.
func gone(t *testing.T, conn *pgx.Conn, pid uint32) bool {
	var n int
	if err := conn.QueryRow(t.Context(), `SELECT count(*) FROM pg_stat_activity WHERE pid = $1`, pid).Scan(&n); err != nil {
		t.Fatalf("pg_stat_activity: %v", err)
	}
	return n == 0
}

// release releases b and waits until a's is the only session holding
// the store's lock: sessions give it back as they end, and a hold may
// close a spare one of its own.
func release(t *testing.T, adm *pgx.Conn, db *DB, a, b *Hold) {
	t.Helper()
	b.Release()
	var schema string
	if err := db.pool.QueryRow(t.Context(), `SELECT current_schema()`).Scan(&schema); err != nil {
		t.Fatalf("schema: %v", err)
	}
	waitFor(t, "only one session holds the store's lock", func() bool {
		var pids []uint32
		err := adm.QueryRow(t.Context(), `SELECT coalesce(array_agg(DISTINCT pid), '{}') FROM pg_locks
			WHERE locktype = 'advisory' AND granted AND classid = $1 AND objid = hashtext($2)::oid`,
			holdLockSpace, schema).Scan(&pids)
		if err != nil {
			t.Fatalf("pg_locks: %v", err)
		}
		return len(pids) == 1 && pids[0] == a.pid()
	})
}

func alone(t *testing.T, h *Hold) bool {
	t.Helper()
	ok, err := h.Alone(t.Context())
	if err != nil {
		t.Fatalf("alone: %v", err)
	}
	if ok {
		if err := h.EndAlone(t.Context()); err != nil {
			t.Fatalf("end alone: %v", err)
		}
	}
	return ok
}

// An idle_session_timeout (set here in the URL, elsewhere by a managed
// database's defaults) ends idle sessions, but not the hold's: a second
// process still finds the first one there.
func TestHoldOutlivesIdleSessionTimeout(t *testing.T) {
	url := pgtest.SchemaURL(t) + "&idle_session_timeout=300"
	db := openDB(t, url)
	a := takeHold(t, db, nil, time.Hour)
	pid := a.pid()

	// A session idle since after the hold's was is ended by then.
	idle, err := pgx.Connect(t.Context(), url)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer idle.Close(context.Background())
	adm := admin(t)
	waitFor(t, "the idle session is ended", func() bool { return gone(t, adm, idle.PgConn().PID()) })

	if gone(t, adm, pid) {
		t.Fatal("the hold's session was ended as idle")
	}
	b := takeHold(t, db, nil, time.Hour)
	if alone(t, b) {
		t.Fatal("a second hold is alone beside the first")
	}
}

// A hold whose connection is ended is taken again on a new one, and says
// so; meanwhile and after, only one hold alone is alone.
func TestHoldIsTakenAgainAfterItsConnectionDrops(t *testing.T) {
	db := openDB(t, pgtest.SchemaURL(t))
	var logs syncBuffer
	a := takeHold(t, db, slog.New(slog.NewTextHandler(&logs, nil)), 20*time.Millisecond)
	b := takeHold(t, db, nil, time.Hour)
	adm := admin(t)

	pid := a.pid()
	if _, err := adm.Exec(t.Context(), `SELECT pg_terminate_backend($1)`, pid); err != nil {
		t.Fatalf("terminate: %v", err)
	}
	waitFor(t, "the hold is taken again", func() bool { p := a.pid(); return p != 0 && p != pid })
	for _, want := range []string{"the store's lock is lost", "the store's lock is held again"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("the log lacks %q:\n%s", want, logs.String())
		}
	}
	if alone(t, b) {
		t.Fatal("a hold is alone beside one taken again")
	}
	release(t, adm, db, a, b)
	if !alone(t, a) {
		t.Fatal("a hold taken again is not alone once the other is released")
	}
}

// Alone takes a lost hold again itself (as at a shutdown before the
// watch has noticed), and is not alone while another process is.
func TestAloneTakesALostHoldAgain(t *testing.T) {
	db := openDB(t, pgtest.SchemaURL(t))
	a := takeHold(t, db, nil, time.Hour)
	adm := admin(t)

	pid := a.pid()
	if _, err := adm.Exec(t.Context(), `SELECT pg_terminate_backend($1)`, pid); err != nil {
		t.Fatalf("terminate: %v", err)
	}
	waitFor(t, "the hold's session has ended", func() bool { return gone(t, adm, pid) })
	if !alone(t, a) {
		t.Fatal("a hold taken again by Alone is not alone")
	}
	if p := a.pid(); p == 0 || p == pid {
		t.Fatalf("the hold's connection is %d after Alone, want a new one", p)
	}

	// Lost, the hold leaves another process alone (the window a lost hold
	// opens), and then is not alone itself.
	b := takeHold(t, db, nil, time.Hour)
	pid = a.pid()
	if _, err := adm.Exec(t.Context(), `SELECT pg_terminate_backend($1)`, pid); err != nil {
		t.Fatalf("terminate: %v", err)
	}
	waitFor(t, "the hold's session has ended", func() bool { return gone(t, adm, pid) })
	if ok, err := b.Alone(t.Context()); err != nil || !ok {
		t.Fatalf("b alone beside a lost hold: %v, %v; want true", ok, err)
	}
	if ok, err := a.Alone(t.Context()); ok || err != nil {
		t.Fatalf("a lost hold alone beside one held alone: %v, %v; want false", ok, err)
	}
	if err := b.EndAlone(t.Context()); err != nil {
		t.Fatalf("end alone: %v", err)
	}
	if alone(t, a) {
		t.Fatal("a is alone beside b")
	}
	release(t, adm, db, a, b)
	if !alone(t, a) {
		t.Fatal("a is not alone once b is released")
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// An EndAlone whose unlock fails (here its context has ended; a server
// that stops answering does the same) gives the exclusive lock up with
// its connection: it must not keep every other process out for this
// one's life.
func TestFailedEndAloneLeavesNoExclusiveLock(t *testing.T) {
	db := openDB(t, pgtest.SchemaURL(t))
	a := aloneHold(t, db)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := a.EndAlone(ctx); err != nil {
		t.Fatalf("end alone: %v", err)
	}
	notAloneAnyMore(t, db)
}

// aloneHold takes db's hold and has it alone.
func aloneHold(t *testing.T, db *DB) *Hold {
	t.Helper()
	h := takeHold(t, db, nil, time.Hour)
	if ok, err := h.Alone(t.Context()); err != nil || !ok {
		t.Fatalf("alone: %v, %v", ok, err)
	}
	return h
}

// notAloneAnyMore checks that another process can hold the store: it
// would wait while one is alone.
func notAloneAnyMore(t *testing.T, db *DB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	b, err := db.hold(ctx, nil, time.Hour)
	if err != nil {
		t.Fatalf("a second hold: %v (the first is still alone)", err)
	}
	b.Release()
}

// An EndAlone that cannot have the hold's connection in time (a ping
// holds it, waiting on a server that does not answer) cuts the connection
// under it: the exclusive lock goes with it, and other processes can hold
// the store again.
func TestEndAloneBehindAStuckPingCutsTheConnection(t *testing.T) {
	db := openDB(t, pgtest.SchemaURL(t))
	a := aloneHold(t, db)
	a.mu.Lock() // as a ping in progress holds it
	ended := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
		defer cancel()
		ended <- a.EndAlone(ctx)
	}()
	waitFor(t, "EndAlone cuts the connection", func() bool {
		a.rawMu.Lock()
		defer a.rawMu.Unlock()
		_, err := a.raw.Write([]byte{})
		return err != nil
	})
	a.mu.Unlock() // the ping fails and returns
	if err := <-ended; err != nil {
		t.Fatalf("end alone: %v", err)
	}
	notAloneAnyMore(t, db)
}

// An Alone whose context has ended sends nothing, and so keeps the hold's
// connection and its shared lock.
func TestCancelledAloneKeepsTheHold(t *testing.T) {
	db := openDB(t, pgtest.SchemaURL(t))
	a := takeHold(t, db, nil, time.Hour)
	pid := a.pid()
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if ok, err := a.Alone(ctx); ok || err == nil {
		t.Fatalf("alone with an ended context: %v, %v", ok, err)
	}
	if a.pid() != pid {
		t.Fatalf("the hold's connection changed (%d, was %d): its lock was dropped", a.pid(), pid)
	}
}
