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
