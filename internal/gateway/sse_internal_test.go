package gateway

import (
	"context"
	"net/http"
	"os"
	"strings"
	"testing"
	"testing/synctest"
	"time"
)

// slowLink is a response writer over a link that carries rate bytes a
// second, whose write deadline fails a write that would end past it, as a
// connection's does.
type slowLink struct {
	rate     int
	deadline time.Time
	got      strings.Builder
}

func (l *slowLink) Header() http.Header { return http.Header{} }
func (l *slowLink) WriteHeader(int)     {}
func (l *slowLink) Flush()              {}

func (l *slowLink) SetWriteDeadline(t time.Time) error {
	l.deadline = t
	return nil
}

func (l *slowLink) Write(p []byte) (int, error) {
	took := time.Duration(len(p)) * time.Second / time.Duration(l.rate)
	if !l.deadline.IsZero() && time.Now().Add(took).After(l.deadline) {
		time.Sleep(time.Until(l.deadline))
		return 0, os.ErrDeadlineExceeded
	}
	time.Sleep(took)
	l.got.Write(p)
	return len(p), nil
}

// An SSE stream's catch-up (a long answer, replayed as one event) reaches
// a client that reads it steadily over a link too slow to carry it within
// --write-timeout, as a socket's joined frame does.
func TestSSECatchUpReachesASlowLink(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		link := &slowLink{rate: 200 << 10} // 1 MiB takes 5 s
		sw := &sseWriter{w: link, rc: http.NewResponseController(link), ctx: context.Background(), timeout: time.Second}
		text := strings.Repeat("x", 1<<20)
		sw.delta(7, []byte(text))
		sw.flush()
		if sw.err != nil {
			t.Fatalf("the catch-up was cut off: %v", sw.err)
		}
		want := "event: delta\nid: 7\ndata: {\"text\":\"" + text + "\"}\n\n"
		if link.got.String() != want {
			t.Fatalf("the client got %d bytes, want %d", link.got.Len(), len(want))
		}
	})
}
