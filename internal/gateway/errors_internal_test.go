package gateway

import (
	"fmt"
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
