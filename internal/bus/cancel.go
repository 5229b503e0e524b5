package bus

import (
	"context"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"
)

// MarkCancelled writes the durable cancel tombstone of a turn. It reports
// true when this call wrote it, false when it existed already (a cancel was
// already under way).
func (b *Bus) MarkCancelled(ctx context.Context, turnID string) (bool, error) {
	_, err := b.cancels.Create(ctx, Token(turnID), []byte{'1'})
	if errors.Is(err, jetstream.ErrKeyExists) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("mark cancelled: %w", err)
	}
	return true, nil
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
// from one goroutine, until ctx is done. The watch is backed by JetStream,
// so a cancel written while the connection was briefly down still arrives.
// It returns once the watch is established.
func (b *Bus) WatchCancels(ctx context.Context, fn func(turnID string)) error {
	w, err := b.cancels.WatchAll(ctx, jetstream.UpdatesOnly(), jetstream.IgnoreDeletes())
	if err != nil {
		return fmt.Errorf("watch cancels: %w", err)
	}
	go func() {
		defer w.Stop()
		for {
			select {
			case <-ctx.Done():
				return
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
