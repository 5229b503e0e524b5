package e2e_test

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/tokenrelay/tokenrelay/internal/auth"
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
	answerWorkerPing(t, server)
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
	// A socket's cancel says the same as the API's.
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Send(map[string]any{"type": "cancel", "id": "c", "turn_id": "nope"})
	fs := c.Until(wait, func(f trtest.Frame) bool { return f.Str("id") == "c" })
	if f := fs[len(fs)-1]; f.Type() != "error" || f.Str("code") != "not_found" || f.Str("message") != `turn "nope" not found` {
		t.Errorf("cancel of an unknown turn: %v, want not_found %q", f, `turn "nope" not found`)
	}
}

// retakenOnRead is a store where, at the first read of a listed
// conversation's messages, its owner alice has just deleted it and bob
// taken its id and written to it: the read finds bob's message.
type retakenOnRead struct {
	store.Store
	mu      sync.Mutex
	pending map[string]bool
}

func (s *retakenOnRead) retake(ctx context.Context, conv string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.pending[conv] {
		return nil
	}
	delete(s.pending, conv)
	if err := s.Store.DeleteConversation(ctx, conv, "alice"); err != nil {
		return err
	}
	_, err := s.Store.Send(ctx, store.SendRequest{ConversationID: conv, Owner: "bob", MessageID: "bob-" + conv, Text: "bob's own words", Now: time.Now()})
	return err
}

func (s *retakenOnRead) Messages(ctx context.Context, conv string, limit int, before string) ([]chat.Message, error) {
	if err := s.retake(ctx, conv); err != nil {
		return nil, err
	}
	return s.Store.Messages(ctx, conv, limit, before)
}

func (s *retakenOnRead) MessageHeads(ctx context.Context, conv string, limit int) ([]chat.Message, error) {
	if err := s.retake(ctx, conv); err != nil {
		return nil, err
	}
	return s.Store.MessageHeads(ctx, conv, limit)
}

// TestHistoryOfARetakenConversation: a conversation whose owner deletes it
// while a read of its history is under way, and whose id another user then
// takes, shows that user's messages to no one but them: a join (native and
// compatible) and a read of the messages check the owner again after the
// read, and refuse.
func TestHistoryOfARetakenConversation(t *testing.T) {
	const secret = "a secret of thirty-two bytes or more"
	server := bustest.Start(t)
	st, _ := storeAndAuth(t)
	a, err := auth.New(auth.Config{HS256Secret: []byte(secret)})
	if err != nil {
		t.Fatal(err)
	}
	convs := []string{"native", "native-resume", "api", "compat-ws", "compat-http"}
	rs := &retakenOnRead{Store: st, pending: make(map[string]bool)}
	for _, c := range convs {
		if _, err := st.Send(t.Context(), store.SendRequest{ConversationID: c, Owner: "alice", MessageID: "alice-" + c, TurnID: "alice-" + c + "-t", Text: "alice's words", Now: time.Now()}); err != nil {
			t.Fatal(err)
		}
		if _, _, err := st.FinishTurn(t.Context(), store.TurnResult{TurnID: "alice-" + c + "-t", Status: chat.StatusComplete, Content: "an answer", Seq: 1, Now: time.Now()}); err != nil {
			t.Fatal(err)
		}
		rs.pending[c] = true
	}
	gw := gateway.New(gateway.Config{}, bustest.Open(t, server.Conn().ConnectedUrl()), rs, a)
	wsURL := serveGateway(t, gw)
	base := "http" + strings.TrimSuffix(strings.TrimPrefix(wsURL, "ws"), "/v1/ws")
	token, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{"sub": "alice", "exp": time.Now().Add(time.Hour).Unix()}).SignedString([]byte(secret))
	if err != nil {
		t.Fatal(err)
	}

	for _, join := range []map[string]any{
		{"type": "join", "conversation_id": "native"},
		{"type": "join", "conversation_id": "native-resume", "history": 0},
	} {
		c := trtest.Dial(t, wsURL, &trtest.DialOptions{Token: token})
		c.Send(join)
		fs := c.Until(10*time.Second, func(f trtest.Frame) bool { return f.Type() == "joined" || f.Type() == "error" })
		if f := fs[len(fs)-1]; f.Type() != "error" || f.Str("code") != "forbidden" {
			t.Errorf("join %v of a conversation bob took meanwhile: %v, want error forbidden", join, fs)
		}
	}

	req, _ := http.NewRequest(http.MethodGet, base+"/v1/conversations/api/messages", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden || strings.Contains(string(body), "bob") {
		t.Errorf("GET messages of a conversation bob took meanwhile: %d %s, want 403", resp.StatusCode, body)
	}

	resp, err = http.Get(base + "/api/history/compat-http?user_id=alice&token=" + token)
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if strings.Contains(string(body), "bob") {
		t.Errorf("compatible history of a session bob took meanwhile: %d %s", resp.StatusCode, body)
	}

	c := trtest.Dial(t, strings.TrimSuffix(wsURL, "/v1/ws")+"/ws/chat?session_id=compat-ws&user_id=alice&token="+token, nil)
	for {
		f, err := c.Next(10 * time.Second)
		if err != nil {
			break // closed, as a session of another user is
		}
		if b, _ := json.Marshal(f); strings.Contains(string(b), "bob") {
			t.Fatalf("compatible socket of a session bob took meanwhile got %s", b)
		}
	}
}

// TestIDConflictsSayWhich: a send whose ids clash with what is stored is
// bad_request with a message naming the id at fault, over HTTP and
// WebSocket.
func TestIDConflictsSayWhich(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "0")
	post := func(conv string, body map[string]any) (int, string, string) {
		t.Helper()
		var res struct {
			Error struct{ Code, Message string }
		}
		code := trtest.Do(t, "POST", p.URL+"/v1/conversations/"+conv+"/messages", "", body, &res)
		return code, res.Error.Code, res.Error.Message
	}
	if code, _, msg := post("ids", map[string]any{"text": "[sim tokens=3] hi", "message_id": "m1", "turn_id": "t1"}); code != http.StatusAccepted {
		t.Fatalf("first POST: %d %s", code, msg)
	}
	c := trtest.Dial(t, p.WSURL(), nil)
	for _, tt := range []struct {
		name, conv, message, turn, want string
	}{
		{"message id of a turn", "ids", "t1", "t2", "message_id is the id of an assistant message in this conversation"},
		{"same ids", "ids2", "x1", "x1", "turn_id must differ from message_id"},
		{"turn id of another conversation", "ids3", "m1", "t1", "turn_id is already used by another turn"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			code, ec, msg := post(tt.conv, map[string]any{"text": "again", "message_id": tt.message, "turn_id": tt.turn})
			if code != http.StatusBadRequest || ec != "bad_request" || msg != tt.want {
				t.Errorf("POST: %d %s %q, want 400 bad_request %q", code, ec, msg, tt.want)
			}
			c.Send(map[string]any{"type": "send", "id": "s", "conversation_id": tt.conv, "text": "again", "message_id": tt.message, "turn_id": tt.turn})
			f := c.Until(wait, func(f trtest.Frame) bool { return f.Str("id") == "s" })
			if last := f[len(f)-1]; last.Type() != "error" || last.Str("code") != "bad_request" || last.Str("message") != tt.want {
				t.Errorf("send: %v, want bad_request %q", last, tt.want)
			}
		})
	}
}

// shutDuringSend is a store whose Send, once stored, waits until the
// gateway has shut down: the send was in flight when the process was told
// to stop. A send whose context the shutdown ends waits for that; another
// waits to be resumed.
type shutDuringSend struct {
	store.Store
	stored chan struct{}
	resume chan struct{}
}

func (s *shutDuringSend) Send(ctx context.Context, req store.SendRequest) (store.SendResult, error) {
	res, err := s.Store.Send(ctx, req)
	close(s.stored)
	select {
	case <-ctx.Done():
	case <-s.resume:
	}
	return res, err
}

// TestSendOutlivesAShutdown: a message whose send is in flight when the
// gateway shuts down (SIGTERM: the sockets close, then the HTTP server
// waits for the requests under way) still starts its turn; the turn does
// not end in an error for a broker that was never down. Over HTTP, native
// and compat, and over a WebSocket.
func TestSendOutlivesAShutdown(t *testing.T) {
	server := bustest.Start(t)
	answerWorkerPing(t, server)
	for _, tt := range []struct{ name, path, body, conv string }{
		{"native", "/v1/conversations/shut/messages", `{"text":"hello","message_id":"m1"}`, "shut"},
		{"compat", "/api/chat", `{"message":"hello","session_id":"shut-compat"}`, "shut-compat"},
		{"websocket", "", "", "shut-ws"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			st, a := storeAndAuth(t)
			slow := &shutDuringSend{Store: st, stored: make(chan struct{}), resume: make(chan struct{})}
			gw := gateway.New(gateway.Config{}, bustest.Open(t, server.Conn().ConnectedUrl()), slow, a)
			srv := httptest.NewServer(gw)
			t.Cleanup(srv.Close)
			answered := make(chan int, 1)
			if tt.path != "" {
				go func() {
					resp, err := http.Post(srv.URL+tt.path, "application/json", strings.NewReader(tt.body))
					if err != nil {
						answered <- 0
						return
					}
					resp.Body.Close()
					answered <- resp.StatusCode
				}()
			} else {
				c := trtest.Dial(t, "ws"+strings.TrimPrefix(srv.URL, "http")+"/v1/ws", nil)
				c.Send(map[string]any{"type": "send", "conversation_id": tt.conv, "text": "hello", "id": "s"})
			}
			<-slow.stored
			// The shutdown ends the sockets (their frames' sends included)
			// before it returns.
			ctx, cancel := context.WithTimeout(t.Context(), wait)
			defer cancel()
			if err := gw.Shutdown(ctx); err != nil {
				t.Fatal(err)
			}
			close(slow.resume)
			if tt.path != "" {
				if code := <-answered; code/100 != 2 {
					t.Errorf("POST %s in flight at the shutdown: %d", tt.path, code)
				}
			}
			turn, err := st.ActiveTurn(t.Context(), tt.conv)
			if err != nil || turn.Status != chat.StatusQueued {
				t.Fatalf("a send in flight at the shutdown: turn %+v, %v; want it queued", turn, err)
			}
		})
	}
}

// TestSSEOfATurnDeletedBeforeItsEnd: a turn's producer is gone and its
// conversation is deleted before any end is stored (the deletion's cancel
// goes unanswered). The view's quiet check finds the turn deleted; its
// event stream then closes instead of waiting for an end that cannot
// come, and the client's resume learns the turn is gone.
func TestSSEOfATurnDeletedBeforeItsEnd(t *testing.T) {
	t.Parallel()
	g, w := trtest.StartScaleOut(t, "--cancel-wait", "100ms", "--quiet-check", "200ms")
	c := trtest.Dial(t, g.WSURL(), nil)
	c.Join("sse-deleted", nil)
	tr := startTurn(t, c, "sse-deleted", "a long one [sim tokens=5000 rate=20]", 1)

	ctx := trtest.Ctx(t, 30*time.Second)
	req, _ := http.NewRequestWithContext(ctx, "GET", g.URL+"/v1/turns/"+tr.ID+"/events", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() && sc.Text() != "event: delta" {
	}
	w.Kill()
	del, _ := http.NewRequest("DELETE", g.URL+"/v1/conversations/sse-deleted", nil)
	dr, err := http.DefaultClient.Do(del)
	if err != nil {
		t.Fatal(err)
	}
	dr.Body.Close()
	if dr.StatusCode/100 != 2 {
		t.Fatalf("DELETE = %d", dr.StatusCode)
	}
	for sc.Scan() {
		if sc.Text() == "event: end" {
			t.Fatal("an end event for a turn that never ended")
		}
	}
	if ctx.Err() != nil {
		t.Fatal("the stream of the deleted turn stayed open")
	}
	again, err := http.Get(g.URL + "/v1/turns/" + tr.ID + "/events")
	if err != nil {
		t.Fatal(err)
	}
	again.Body.Close()
	if again.StatusCode != http.StatusNotFound {
		t.Fatalf("resuming the deleted turn's stream: %d, want 404", again.StatusCode)
	}
}
