package worker

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/provider"
)

// providerProbeEvery is how often a worker probes its model server (a
// provider.Pinger's own answer may be cached for as long), and
// providerProbeDownEvery how often while it cannot be reached, so that
// new turns are taken again soon after it is back.
const (
	providerProbeEvery     = 10 * time.Second
	providerProbeDownEvery = 2 * time.Second
)

// firstProbeTimeout bounds the probe a worker waits for before it answers
// pings.
const firstProbeTimeout = time.Second

// watchProvider probes the provider's model server, when the provider can
// be probed, at once and then every providerProbeEvery until ctx ends, and
// keeps why it cannot be reached (provider.ErrUnreachable), or nothing.
// Gateways refuse new turns while no worker can reach its model server:
// each would only end in an error a moment later.
func (w *Worker) watchProvider(ctx context.Context) {
	pg, ok := w.provider.(provider.Pinger)
	if !ok {
		return
	}
	first := true
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		pctx, cancel := ctx, context.CancelFunc(func() {})
		if first {
			// The worker answers no ping until this one is done: a
			// refused connection is known at once, and a slow server
			// counts as reachable anyway.
			pctx, cancel = context.WithTimeout(ctx, firstProbeTimeout)
		}
		err := pg.Ping(pctx)
		cancel()
		if ctx.Err() != nil {
			return
		}
		every := providerProbeEvery
		if errors.Is(err, provider.ErrUnreachable) {
			why := err.Error()
			if w.modelDown.Swap(&why) == nil {
				w.log.Warn("the model server cannot be reached; new turns are refused until it can", "err", err)
			}
			every = providerProbeDownEvery
		} else {
			w.modelReached()
		}
		if first {
			first = false
			close(w.probed)
		}
		t.Reset(every)
	}
}

// modelReached records that the model server answered: a probe, or a
// turn's first token.
func (w *Worker) modelReached() {
	if w.modelDown.Load() != nil && w.modelDown.Swap(nil) != nil {
		w.log.Info("the model server can be reached again")
	}
}

// modelDownReason says why the model server could not be reached at its
// last probe, or "".
func (w *Worker) modelDownReason() string {
	if why := w.modelDown.Load(); why != nil {
		return *why
	}
	return ""
}

// ModelUnreachable returns an error wrapping bus.ErrProviderUnreachable
// when the worker's model server could not be reached at its last probe,
// else nil. It waits for the first probe (of a running worker), or for
// ctx to end.
func (w *Worker) ModelUnreachable(ctx context.Context) error {
	select {
	case <-w.probed:
	case <-ctx.Done():
		return nil // not known yet: the turn's own request will tell
	}
	if why := w.modelDownReason(); why != "" {
		return fmt.Errorf("%w: %s", bus.ErrProviderUnreachable, why)
	}
	return nil
}
