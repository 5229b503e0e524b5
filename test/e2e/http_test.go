package e2e_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/gateway"
	"github.com/tokenrelay/tokenrelay/internal/store"
)

// goneAfterSend is a store whose Send, once stored, ends the context of
// the HTTP request that made it: its client went away at that moment.
type goneAfterSend struct {
	store.Store
	leave context.CancelFunc
}

func (s *goneAfterSend) Send(ctx context.Context, req store.SendRequest) (store.SendResult, error) {
	res, err := s.Store.Send(ctx, req)
	s.leave()
	return res, err
}

// TestPostedMessageOutlivesItsClient: a POST whose client goes away once
// its message is stored still starts its turn, as a WebSocket send does;
// the turn does not end in an error for a broker that was never down, which
// the client's retry of the message would then find. So does a POST of the
// compatibility API.
func TestPostedMessageOutlivesItsClient(t *testing.T) {
	server := bustest.Start(t)
	ping, err := server.ServeWorkerPing("test", func() string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ping.Unsubscribe() })
	st, a := storeAndAuth(t)
	gone := &goneAfterSend{Store: st}
	gw := gateway.New(gateway.Config{}, bustest.Open(t, server.Conn().ConnectedUrl()), gone, a)
	t.Cleanup(func() { _ = gw.Shutdown(context.Background()) })

	for _, tt := range []struct{ path, body, conv string }{
		{"/v1/conversations/left/messages", `{"text":"hello","message_id":"m1"}`, "left"},
		{"/api/chat", `{"message":"hello","session_id":"left-compat"}`, "left-compat"},
	} {
		ctx, leave := context.WithCancel(t.Context())
		gone.leave = leave
		req := httptest.NewRequestWithContext(ctx, http.MethodPost, tt.path, strings.NewReader(tt.body))
		gw.ServeHTTP(httptest.NewRecorder(), req)
		turn, err := st.ActiveTurn(t.Context(), tt.conv)
		if err != nil {
			t.Fatalf("POST %s whose client left: no turn running (%v)", tt.path, err)
		}
		if turn.Status != chat.StatusQueued {
			t.Fatalf("POST %s whose client left: turn %s, want queued", tt.path, turn.Status)
		}
	}
}
