package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/tokenrelay/tokenrelay/internal/store"
	"github.com/tokenrelay/tokenrelay/internal/store/postgres"
	"github.com/tokenrelay/tokenrelay/internal/store/sqlite"
)

// errHeld is lockFile's error when another process holds the lock in a way
// that excludes this one.
var errHeld = errors.New("held by another process")

// holdStore takes the store for as long as this process runs: alone for a
// serve whose bus is its own (no --nats-listen, no --nats-url), which ends
// every unfinished turn in the store as its own when it starts and stops,
// and so would end another process's running answers; shared by the
// processes of a deployment on NATS. Either refuses to start beside the
// other. A SQLite store is held by an flock on a file beside it, a
// PostgreSQL one by an advisory lock (per schema).
func holdStore(ctx context.Context, st store.Store, alone bool) (release func(), err error) {
	switch db := st.(type) {
	case *postgres.DB:
		release, err = db.Hold(ctx, alone)
	case *sqlite.DB:
		release, err = lockFile(db.Path()+".lock", alone)
	default:
		return func() {}, nil
	}
	switch {
	case (errors.Is(err, errHeld) || errors.Is(err, postgres.ErrHeld)) && alone:
		return nil, errors.New("the store is in use by other tokenrelay processes, and a serve without --nats-listen or --nats-url must be its only user (scale out with gateway and worker on NATS)")
	case errors.Is(err, errHeld) || errors.Is(err, postgres.ErrHeld):
		return nil, errors.New("the store is in use by a tokenrelay serve without --nats-listen or --nats-url, which must be its only user")
	case err != nil:
		return nil, fmt.Errorf("lock the store: %w", err)
	}
	return release, nil
}
