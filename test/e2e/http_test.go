package e2e_test

import (
	"bufio"
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/gateway"
	"github.com/tokenrelay/tokenrelay/internal/store"
	"github.com/tokenrelay/tokenrelay/internal/trtest"
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

// TestSSEHead: HEAD of a running turn's events answers the stream's headers
// and ends; it does not hold its connection until the turn ends, so the
// next request on that connection is answered.
func TestSSEHead(t *testing.T) {
	p := trtest.Serve(t)
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("head", nil)
	tr := startTurn(t, c, "head", "a long one [sim tokens=100000 rate=10]", 1)
	client := &http.Client{Timeout: wait / 2, Transport: &http.Transport{MaxConnsPerHost: 1}}
	t.Cleanup(client.CloseIdleConnections)
	resp, err := client.Head(p.URL + "/v1/turns/" + tr.ID + "/events")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("HEAD: %d %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	// The same connection (one per host) serves the next request.
	resp, err = client.Get(p.URL + "/healthz")
	if err != nil {
		t.Fatalf("the request after a HEAD of a running turn's events: %v", err)
	}
	resp.Body.Close()
}

// TestSSEKeepAlive: a stream that waits for its turn's next delta gets a
// comment every --ping-interval, so that a proxy does not cut it as idle.
func TestSSEKeepAlive(t *testing.T) {
	p := trtest.Serve(t, "--ping-interval", "50ms")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("keepalive", nil)
	tr := startTurn(t, c, "keepalive", "a slow one [sim tokens=10 rate=1]", 1)
	resp, err := http.Get(p.URL + "/v1/turns/" + tr.ID + "/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		switch line := sc.Text(); {
		case strings.HasPrefix(line, ":"):
			return
		case line == "event: end":
			t.Fatal("the stream ended without a keep-alive comment")
		}
	}
	t.Fatalf("the stream was cut: %v", sc.Err())
}

// TestNotFoundSaysWhat: a 404 of the API names what it did not find, so
// that a client paging with before can tell a message gone from a
// conversation gone.
func TestNotFoundSaysWhat(t *testing.T) {
	p := trtest.Serve(t)
	if code := trtest.Do(t, "POST", p.URL+"/v1/conversations/found/messages", "", map[string]any{"text": "hi", "message_id": "m1"}, nil); code != http.StatusAccepted {
		t.Fatalf("POST: %d", code)
	}
	for _, tt := range []struct{ method, path, want string }{
		{"GET", "/v1/conversations/found/messages?before=gone", `message "gone" (before) in conversation "found" not found`},
		{"GET", "/v1/conversations/nope/messages", `conversation "nope" not found`},
		{"DELETE", "/v1/conversations/nope", `conversation "nope" not found`},
		{"POST", "/v1/turns/nope/cancel", `turn "nope" not found`},
		{"GET", "/v1/turns/nope/events", `turn "nope" not found`},
	} {
		var body struct {
			Error struct{ Code, Message string }
		}
		code := trtest.Do(t, tt.method, p.URL+tt.path, "", nil, &body)
		if code != http.StatusNotFound || body.Error.Code != "not_found" || body.Error.Message != tt.want {
			t.Errorf("%s %s: %d %+v, want 404 not_found %q", tt.method, tt.path, code, body.Error, tt.want)
		}
	}
}
