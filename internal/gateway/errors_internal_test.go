package gateway

import (
	"fmt"
	"log/slog"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/protocol"
)

// A request that fails on the message broker's connection (a join while
// the gateway's NATS connection is closed, say) is unavailable, not
// internal; other errors keep their codes.
func TestAsError(t *testing.T) {
	for _, c := range []struct {
		err  error
		code protocol.Code
	}{
		{fmt.Errorf("subscribe: %w", nats.ErrConnectionClosed), protocol.CodeUnavailable},
		{chat.ErrNotFound, protocol.CodeNotFound},
		{protocol.Errorf(protocol.CodeBadRequest, "x"), protocol.CodeBadRequest},
		{fmt.Errorf("boom"), protocol.CodeInternal},
	} {
		if got := asError(c.err).Code; got != c.code {
			t.Errorf("asError(%v) = %s, want %s", c.err, got, c.code)
		}
	}
}

// An HTTP answer of an internal error says nothing of its cause; the log
// does (and only for internal errors).
func TestWriteErrorLogsInternalErrors(t *testing.T) {
	var log strings.Builder
	s := &Server{log: slog.New(slog.NewTextHandler(&log, nil))}
	w := httptest.NewRecorder()
	s.writeError(w, fmt.Errorf("store: disk I/O error"))
	if w.Code != 500 || strings.Contains(w.Body.String(), "disk") {
		t.Fatalf("answered %d %s", w.Code, w.Body)
	}
	if !strings.Contains(log.String(), "request failed") || !strings.Contains(log.String(), "disk I/O error") {
		t.Fatalf("log: %q", log.String())
	}
	log.Reset()
	s.writeError(httptest.NewRecorder(), chat.ErrNotFound)
	if log.Len() != 0 {
		t.Fatalf("a not_found was logged: %q", log.String())
	}
}
