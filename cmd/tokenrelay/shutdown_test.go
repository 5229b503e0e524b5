package main

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// A worker whose Run does not return once it is told to stop (its store or
// broker does not answer) holds the process for --shutdown-timeout, no
// more; one that returns in time gives its error.
func TestRunWithin(t *testing.T) {
	var logs strings.Builder
	log := slog.New(slog.NewTextHandler(&logs, nil))
	ctx, cancel := context.WithCancel(t.Context())
	hung := make(chan struct{})
	defer close(hung)
	done := make(chan error, 1)
	go func() {
		done <- runWithin(ctx, func(context.Context) error { <-hung; return nil }, 50*time.Millisecond, log)
	}()
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("runWithin = %v, want nil at the timeout", err)
	}
	if !strings.Contains(logs.String(), "leaving them to recovery") {
		t.Fatalf("log: %s", logs.String())
	}

	stopped := errors.New("stopped")
	ctx, cancel = context.WithCancel(t.Context())
	cancel()
	if err := runWithin(ctx, func(ctx context.Context) error { <-ctx.Done(); return stopped }, time.Hour, log); err != stopped {
		t.Fatalf("runWithin = %v, want Run's error", err)
	}
}

// closeWithin waits for a close that finishes, and not for one that does
// not (a pool whose connections a hung database holds).
func TestCloseWithin(t *testing.T) {
	var logs strings.Builder
	log := slog.New(slog.NewTextHandler(&logs, nil))
	closed := false
	closeWithin("store", func() { closed = true }, log)
	if !closed || logs.Len() != 0 {
		t.Fatalf("closed %v, log %q", closed, logs.String())
	}
	hung := make(chan struct{})
	defer close(hung)
	closeWithin("store", func() { <-hung }, log)
	if !strings.Contains(logs.String(), "not waiting") {
		t.Fatalf("log: %s", logs.String())
	}
}
