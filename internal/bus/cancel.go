package bus

import (
	"context"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// MarkCancelled writes the durable cancel tombstone of a turn, then signals
// the cancel on CancelSubj. It reports true when this call wrote the
// tombstone, false when it existed already (a cancel was already under way).
//
// The order matters for a turn no worker has started: a worker that picks
// the job up after the tombstone is written finds it, and one that picked it
// up before hears the signal, which follows the tombstone. (Signalling
// first would let a worker pick the job up between the signal and the
// tombstone, miss both, and call the model.)
func (b *Bus) MarkCancelled(ctx context.Context, turnID string) (bool, error) {
	_, err := b.cancels.Create(ctx, Token(turnID), []byte{'1'})
	created := err == nil
	if err != nil && !errors.Is(err, jetstream.ErrKeyExists) {
		return false, fmt.Errorf("mark cancelled: %w", err)
	}
	// The watch of WatchCancels delivers the tombstone too, but it rides a
	// JetStream consumer that, when the NATS node holding it is lost, is
	// only recreated after missed heartbeats: seconds. The signal takes any
	// live route. A lost signal costs nothing: the tombstone stays.
	b.SignalCancel(turnID)
	return created, nil
}

// SignalCancel sends only the cancel signal. For a turn already streaming,
// whose worker is known to be running it, the caller sends it before
// MarkCancelled: the worker stops without waiting for the tombstone's round
// trip (MarkCancelled signals again; a repeated signal is harmless). Under
// a Local the signal reaches the process's WatchCancels callbacks directly,
// on the caller's goroutine.
func (b *Bus) SignalCancel(turnID string) {
	if b.cfg.Local != nil {
		b.cfg.Local.signalCancel(turnID)
		return
	}
	_ = b.nc.Publish(CancelSubj, []byte(turnID))
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
// until ctx is done; fn may be called more than once for one turn, and
// concurrently (it must not block). Each cancel arrives by two routes: the
// core signal of MarkCancelled, at once over any live connection (under a
// Local, in the process), and a watch of the tombstones backed by
// JetStream, so a cancel written while the connection was briefly down
// still arrives. It returns once both are established.
//
// The watch can end under a live ctx: when its consumer cannot be recreated
// (the bucket was deleted) or the connection is closed for good. Then the
// returned channel receives the error, once, while the signals go on
// reaching fn until ctx is done: a worker told so stops taking jobs, and
// can still stop the turns it ends. The channel is closed when the watch
// stops.
func (b *Bus) WatchCancels(ctx context.Context, fn func(turnID string)) (<-chan error, error) {
	signals := make(chan *nats.Msg, 1024)
	sub, err := b.nc.ChanSubscribe(CancelSubj, signals)
	if err != nil {
		return nil, fmt.Errorf("watch cancels: %w", err)
	}
	if err := b.nc.Flush(); err != nil {
		_ = sub.Unsubscribe()
		return nil, fmt.Errorf("watch cancels: %w", err)
	}
	w, err := b.cancels.WatchAll(ctx, jetstream.UpdatesOnly(), jetstream.IgnoreDeletes())
	if err != nil {
		_ = sub.Unsubscribe()
		return nil, fmt.Errorf("watch cancels: %w", err)
	}
	ended := make(chan error, 1)
	go func() {
		defer close(ended)
		defer w.Stop()
		defer sub.Unsubscribe()
		updates := w.Updates()
		for {
			select {
			case <-ctx.Done():
				return
			case m := <-signals:
				fn(string(m.Data))
			case e, ok := <-updates:
				if !ok {
					if ctx.Err() == nil {
						ended <- fmt.Errorf("watch cancels: the watch of bucket %s ended", CancelBucket)
					}
					updates = nil // signals only, from now on
					continue
				}
				if e == nil || e.Operation() != jetstream.KeyValuePut {
					continue
				}
				fn(Untoken(e.Key()))
			}
		}
	}()
	if l := b.cfg.Local; l != nil {
		context.AfterFunc(ctx, l.watchCancels(fn))
	}
	return ended, nil
}
