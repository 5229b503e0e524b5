package postgres

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/tokenrelay/tokenrelay/internal/chat"
)

// An error that says the server could not be reached is marked
// chat.ErrUnavailable (clients are told to try again); the errors of a
// request the server refused are not.
func TestUnreachable(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want bool
	}{
		{"connection refused", &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}, true},
		{"reset", fmt.Errorf("read: %w", syscall.ECONNRESET), true},
		{"server went away", io.ErrUnexpectedEOF, true},
		{"admin shutdown", &pgconn.PgError{Code: "57P01"}, true},
		{"starting up", &pgconn.PgError{Code: "57P03"}, true},
		{"connection failure", &pgconn.PgError{Code: "08006"}, true},
		{"unique violation", &pgconn.PgError{Code: "23505"}, false},
		{"syntax error", &pgconn.PgError{Code: "42601"}, false},
		{"domain error", chat.ErrNotFound, false},
		{"the caller's deadline", context.DeadlineExceeded, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := unreachable(tt.err)
			if got := errors.Is(err, chat.ErrUnavailable); got != tt.want {
				t.Fatalf("unreachable(%v) is ErrUnavailable: %v, want %v", tt.err, got, tt.want)
			}
			if !errors.Is(err, tt.err) {
				t.Fatalf("unreachable(%v) = %v lost the cause", tt.err, err)
			}
		})
	}
	if unreachable(nil) != nil {
		t.Fatal("unreachable(nil) != nil")
	}
}

// Only an error that says the statement never ran is run again: after a
// broken connection that may have run it, or a COMMIT that failed, the
// statement may have taken effect.
func TestNotRun(t *testing.T) {
	tests := []struct {
		name  string
		err   error
		again bool
		waits bool
	}{
		{"terminated backend", &pgconn.PgError{Code: "57P01"}, true, false},
		{"connection exception", &pgconn.PgError{Code: "08006"}, true, false},
		{"server starting", &pgconn.PgError{Code: "57P03"}, true, true},
		{"no connection", &pgconn.ConnectError{}, true, true},
		{"terminated, wrapped as unavailable", unreachable(&pgconn.PgError{Code: "57P01"}), true, false},
		{"broken while it ran", io.ErrUnexpectedEOF, false, false},
		{"reset while it ran", syscall.ECONNRESET, false, false},
		{"a failed commit", commitFailed{&pgconn.PgError{Code: "57P01"}}, false, false},
		{"unique violation", &pgconn.PgError{Code: "23505"}, false, false},
		{"the caller's deadline", context.DeadlineExceeded, false, false},
		{"domain error", chat.ErrNotFound, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			wait, again := notRun(tt.err, 0)
			if again != tt.again || (wait > 0) != tt.waits {
				t.Fatalf("notRun(%v) = %v, %v; want again %v, waits %v", tt.err, wait, again, tt.again, tt.waits)
			}
		})
	}
}
