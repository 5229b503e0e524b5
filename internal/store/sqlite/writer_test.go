package sqlite

import (
	"context"
	"errors"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"testing"

	"github.com/tokenrelay/tokenrelay/internal/store/sqlstore"
)

// writerOn opens a store in t.TempDir and returns its writer, with a table
// t (k PRIMARY KEY) to write to.
func writerOn(t *testing.T) *writer {
	t.Helper()
	db, err := open(t.Context(), filepath.Join(t.TempDir(), "w.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := db.Close(); err != nil {
			t.Error(err)
		}
	})
	w := db.d.w
	if err := w.do(t.Context(), func(ctx context.Context, q conn) error {
		_, err := q.Exec(ctx, `CREATE TABLE t (k TEXT PRIMARY KEY)`)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return w
}

// hold makes the writer wait inside a write until release is called, so
// that writes queue behind it.
func hold(t *testing.T, w *writer) (release func()) {
	t.Helper()
	in, out := make(chan struct{}), make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- w.do(context.Background(), func(context.Context, conn) error {
			close(in)
			<-out
			return nil
		})
	}()
	<-in
	return func() {
		close(out)
		if err := <-done; err != nil {
			t.Error(err)
		}
	}
}

// queued waits until n writes wait.
func queued(w *writer, n int) {
	for {
		w.mu.Lock()
		k := len(w.priority) + len(w.others)
		w.mu.Unlock()
		if k == n {
			return
		}
		runtime.Gosched()
	}
}

func insert(k string) func(context.Context, conn) error {
	return func(ctx context.Context, q conn) error {
		_, err := q.Exec(ctx, `INSERT INTO t (k) VALUES (?)`, k)
		return err
	}
}

func keys(t *testing.T, w *writer) []string {
	t.Helper()
	var got []string
	err := w.do(t.Context(), func(ctx context.Context, q conn) error {
		rows, err := q.Query(ctx, `SELECT k FROM t ORDER BY k`)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			var k string
			if err := rows.Scan(&k); err != nil {
				return err
			}
			got = append(got, k)
		}
		return rows.Err()
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// Writes that queued together are one transaction, and each keeps its own
// outcome: one that fails undoes only itself.
func TestWriterCommitsTogether(t *testing.T) {
	w := writerOn(t)
	release := hold(t, w)
	before := w.batches.Load()
	ks := []string{"a", "b", "a", "c"}
	errs := make([]error, len(ks))
	var wg sync.WaitGroup
	for i, k := range ks {
		wg.Go(func() { errs[i] = w.do(t.Context(), insert(k)) })
		queued(w, i+1)
	}
	release()
	wg.Wait()
	for i, err := range errs {
		if dup := i == 2; (err != nil) != dup || dup && !(dialect{}).IsUniqueViolation(err) {
			t.Errorf("insert %d (%s): %v", i, ks[i], err)
		}
	}
	if got := w.batches.Load() - before; got != 1 {
		t.Errorf("%d transactions for four queued writes, want 1", got)
	}
	if got := keys(t, w); !slices.Equal(got, []string{"a", "b", "c"}) {
		t.Errorf("stored %v, want [a b c]", got)
	}
}

// A write with priority (a turn's end) goes before the writes waiting
// without it, in a transaction of its own kind; writes of one kind keep
// their order.
func TestWriterPriority(t *testing.T) {
	w := writerOn(t)
	release := hold(t, w)
	var mu sync.Mutex
	var order []string
	var wg sync.WaitGroup
	for i, name := range []string{"send 1", "end 1", "send 2", "end 2"} {
		ctx := t.Context()
		if name[:3] == "end" {
			ctx = sqlstore.WithPriority(ctx)
		}
		wg.Go(func() {
			err := w.do(ctx, func(context.Context, conn) error {
				mu.Lock()
				order = append(order, name)
				mu.Unlock()
				return nil
			})
			if err != nil {
				t.Error(err)
			}
		})
		queued(w, i+1)
	}
	before := w.batches.Load()
	release()
	wg.Wait()
	if want := []string{"end 1", "end 2", "send 1", "send 2"}; !slices.Equal(order, want) {
		t.Fatalf("ran %v, want %v", order, want)
	}
	if got := w.batches.Load() - before; got != 2 {
		t.Errorf("%d transactions after the held one, want 2 (the ends, then the sends)", got)
	}
}

// A write whose context ends while it waits is given up and never runs;
// one whose context ends while it runs is made, and says so.
func TestWriterContextEnds(t *testing.T) {
	w := writerOn(t)
	release := hold(t, w)
	ctx, cancel := context.WithCancel(t.Context())
	gaveUp := make(chan error, 1)
	go func() { gaveUp <- w.do(ctx, insert("never")) }()
	queued(w, 1)
	cancel()
	if err := <-gaveUp; !errors.Is(err, context.Canceled) {
		t.Fatalf("write given up while waiting: %v, want context.Canceled", err)
	}
	release()

	ctx, cancel = context.WithCancel(t.Context())
	defer cancel()
	err := w.do(ctx, func(ctx context.Context, q conn) error {
		cancel()
		if ctx.Err() != nil {
			t.Error("the write's own context ended with the caller's")
		}
		return insert("made")(ctx, q)
	})
	if err != nil {
		t.Fatalf("write whose context ended while it ran: %v", err)
	}
	if got := keys(t, w); !slices.Equal(got, []string{"made"}) {
		t.Errorf("stored %v, want [made]", got)
	}
}

// close makes the writes already queued and refuses later ones.
func TestWriterClose(t *testing.T) {
	db, err := open(t.Context(), filepath.Join(t.TempDir(), "w.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	w := db.d.w
	release := hold(t, w)
	queuedErr := make(chan error, 1)
	go func() {
		queuedErr <- w.do(t.Context(), func(ctx context.Context, q conn) error {
			_, err := q.Exec(ctx, `CREATE TABLE t (k TEXT)`)
			return err
		})
	}()
	queued(w, 1)
	closed := make(chan struct{})
	go func() {
		w.close()
		close(closed)
	}()
	release()
	<-closed
	if err := <-queuedErr; err != nil {
		t.Fatalf("write queued before close: %v", err)
	}
	if err := w.do(t.Context(), insert("late")); !errors.Is(err, errWriterClosed) {
		t.Fatalf("write after close: %v, want errWriterClosed", err)
	}
}
