package postgres_test

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/store/postgres"
)

// silentServer accepts connections and never answers, as a host whose
// database hangs, or a proxy in front of one that is gone, does.
func silentServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	var conns []net.Conn
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				for _, c := range conns {
					c.Close()
				}
				return
			}
			conns = append(conns, c)
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return ln.Addr().String()
}

// A process starting on a server that takes the connection but never
// answers gives up after the default connect timeout, naming it, rather
// than waiting for good: it has nothing to report otherwise, and whatever
// restarts it never learns that it failed. The URL's password is not in
// the error.
func TestOpenGivesUpOnASilentServer(t *testing.T) {
	u := "postgres://tokenrelay:hunter2-secret@" + silentServer(t) + "/db?sslmode=disable"
	for name, open := range map[string]func(context.Context) error{
		"open": func(ctx context.Context) error {
			db, err := postgres.Open(ctx, u)
			if err == nil {
				db.Close()
			}
			return err
		},
		"migrate": func(ctx context.Context) error { return postgres.Migrate(ctx, u) },
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			errc := make(chan error, 1)
			start := time.Now()
			go func() { errc <- open(context.Background()) }()
			select {
			case err := <-errc:
				took := time.Since(start)
				if err == nil {
					t.Fatal("no error from a server that never answered")
				}
				if !strings.Contains(err.Error(), "timeout") || strings.Contains(err.Error(), "hunter2") {
					t.Fatalf("error %q: want a timeout, without the password", err)
				}
				if took < postgres.DefaultConnectTimeout/2 {
					t.Fatalf("gave up after %v, before the default connect timeout of %v", took, postgres.DefaultConnectTimeout)
				}
			case <-time.After(postgres.DefaultConnectTimeout + 20*time.Second):
				t.Fatalf("still waiting for a server that never answers after %v", time.Since(start).Round(time.Second))
			}
		})
	}
}
