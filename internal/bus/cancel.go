package bus

import (
	"context"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// MarkCancelled signals the cancel of a turn on CancelSubj, then writes its
// durable tombstone. It reports true when this call wrote the tombstone,
// false when it existed already (a cancel was already under way).
//
// The signal goes first: the worker producing the turn stops at once,
// without waiting for the tombstone's round trip. The tombstone still
// follows: a worker that picks the job up later checks it, and the watch of
// WatchCancels delivers it too. That watch rides a JetStream consumer that,
// when the NATS node holding it is lost, is only recreated after missed
// heartbeats (seconds); the signal takes any live route. A lost signal
// costs nothing: the tombstone stays.
func (b *Bus) MarkCancelled(ctx context.Context, turnID string) (bool, error) {
	_ = b.nc.Publish(CancelSubj, []byte(turnID))
	_, err := b.cancels.Create(ctx, Token(turnID), []byte{'1'})
	created := err == nil
	if err != nil && !errors.Is(err, jetstream.ErrKeyExists) {
		return false, fmt.Errorf("mark cancelled: %w", err)
	}
	return created, nil
}

// IsCancelled reports whether the turn has a cancel tombstone.
func (b *Bus) IsCancelled(ctx context.Context, turnID string) (bool, error) {
	_, err := b.cancels.Get(ctx, Token(turnID))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("is cancelled: %w", err)
	}
	return true, nil
}

// WatchCancels calls fn with the id of every turn cancelled from now on,
// from one goroutine, until ctx is done; fn may be called more than once
// for one turn. Each cancel arrives by two routes: the core signal of
// MarkCancelled, at once over any live connection, and a watch of the
// tombstones backed by JetStream, so a cancel written while the connection
// was briefly down still arrives. It returns once both are established.
func (b *Bus) WatchCancels(ctx context.Context, fn func(turnID string)) error {
	signals := make(chan *nats.Msg, 1024)
	sub, err := b.nc.ChanSubscribe(CancelSubj, signals)
	if err != nil {
		return fmt.Errorf("watch cancels: %w", err)
	}
	if err := b.nc.Flush(); err != nil {
		_ = sub.Unsubscribe()
		return fmt.Errorf("watch cancels: %w", err)
	}
	w, err := b.cancels.WatchAll(ctx, jetstream.UpdatesOnly(), jetstream.IgnoreDeletes())
	if err != nil {
		_ = sub.Unsubscribe()
		return fmt.Errorf("watch cancels: %w", err)
	}
	go func() {
		defer w.Stop()
		defer sub.Unsubscribe()
		for {
			select {
			case <-ctx.Done():
				return
			case m := <-signals:
				fn(string(m.Data))
			case e, ok := <-w.Updates():
				if !ok {
					return
				}
				if e == nil || e.Operation() != jetstream.KeyValuePut {
					continue
				}
				fn(Untoken(e.Key()))
			}
		}
	}()
	return nil
}
