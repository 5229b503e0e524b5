package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

// notifyShutdown returns a context that the first SIGINT or SIGTERM ends,
// and from which hurried gives a channel that the second closes: an
// operator who presses Ctrl-C again wants the stop sooner, so the second
// signal cuts a --shutdown-drain short (the rest of the shutdown still
// runs). stop releases the signals and the goroutine watching them.
func notifyShutdown() (ctx context.Context, stop func()) {
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	ctx, cancel := context.WithCancel(context.Background())
	hurry, done := make(chan struct{}), make(chan struct{})
	go func() {
		select {
		case <-sigs:
			cancel()
		case <-done:
			return
		}
		select {
		case <-sigs:
			close(hurry)
		case <-done:
		}
	}()
	return withHurry(ctx, hurry), func() {
		signal.Stop(sigs)
		close(done)
		cancel()
	}
}

type hurryKey struct{}

// withHurry returns ctx carrying hurry, the channel hurried returns.
func withHurry(ctx context.Context, hurry <-chan struct{}) context.Context {
	return context.WithValue(ctx, hurryKey{}, hurry)
}

// hurried returns the channel closed when a stopping process is asked to
// stop sooner (a second signal, see notifyShutdown): it cuts the drain
// short. It is nil, never ready, when ctx carries none.
func hurried(ctx context.Context) <-chan struct{} {
	ch, _ := ctx.Value(hurryKey{}).(<-chan struct{})
	return ch
}
