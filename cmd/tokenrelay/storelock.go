package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/tokenrelay/tokenrelay/internal/store"
	"github.com/tokenrelay/tokenrelay/internal/store/postgres"
	"github.com/tokenrelay/tokenrelay/internal/store/sqlite"
)

// storeHold is a process's hold on its store: shared by every process
// using it, and held alone, briefly, by a serve that ends the store's
// unfinished turns as its own (see whileAlone).
type storeHold interface {
	Alone(ctx context.Context) (bool, error)
	EndAlone(ctx context.Context) error
	Release()
}

// holdStore takes the store shared, waiting while another process holds it
// alone (as long as ctx allows). A SQLite store is held by a record lock on
// a file beside it (named after the database file's real path), a
// PostgreSQL one by an advisory lock (per schema).
func holdStore(ctx context.Context, st store.Store, log *slog.Logger) (storeHold, error) {
	var h storeHold
	var err error
	switch db := st.(type) {
	case *postgres.DB:
		h, err = db.Hold(ctx, log)
	case *sqlite.DB:
		path := db.Path()
		if real, err := filepath.EvalSymlinks(path); err == nil {
			path = real
		}
		h, err = holdLockFile(ctx, path+".lock", os.OpenFile, log)
	default:
		return alwaysAlone{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("hold the store: %w", err)
	}
	return h, nil
}

// errNoLockFile says the lock file neither exists nor can be made.
var errNoLockFile = errors.New("the lock file cannot be made")

// holdLockFile holds a SQLite store by its lock file at path. Where the file
// cannot be made (a read-only directory) the store is used unguarded, as
// before there was a lock, and the log says so. A file this user cannot
// write (another user's) is held shared, never alone.
func holdLockFile(ctx context.Context, path string, open openFunc, log *slog.Logger) (storeHold, error) {
	h, err := holdFile(ctx, path, open)
	if errors.Is(err, errNoLockFile) {
		log.Warn("the store's lock file cannot be made; other processes on this store go unnoticed", "err", err)
		return alwaysAlone{}, nil
	}
	if err != nil {
		return nil, err
	}
	if ro := h.readOnly(); ro != nil {
		log.Warn("the store's lock file is not writable by this user; this process holds the store shared but never alone, so a serve's ending of unfinished turns is skipped", "path", path, "err", ro)
	}
	return h, nil
}

// whileAlone runs f, holding the store alone, when no other process uses
// it. A serve whose bus is its own ends every unfinished turn in its store
// as its own when it starts and stops: beside other processes (another
// serve on the same --store-url, or a deployment on NATS) those turns may
// be theirs and running, so it leaves them alone and says so.
func whileAlone(ctx context.Context, h storeHold, log *slog.Logger, what string, f func() error) error {
	ok, err := h.Alone(ctx)
	switch {
	case err != nil:
		log.Warn("could not hold the store alone; "+what+" skipped", "err", err)
		return nil
	case !ok:
		log.Warn("other tokenrelay processes use this store; " + what + " skipped, since their turns are not this process's to end")
		return nil
	}
	defer func() {
		if err := h.EndAlone(context.WithoutCancel(ctx)); err != nil {
			log.Warn("give back the store's exclusive hold", "err", err)
		}
	}()
	return f()
}

// alwaysAlone is the hold of a store no lock guards.
type alwaysAlone struct{}

func (alwaysAlone) Alone(context.Context) (bool, error) { return true, nil }
func (alwaysAlone) EndAlone(context.Context) error      { return nil }
func (alwaysAlone) Release()                            {}
