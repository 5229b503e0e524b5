package compat_test

import (
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// Cancel by the reply's id: exactly one completion frame, ending with the
// suffix; every cancel answers 200 cancelled, however often it is sent;
// history keeps the suffix.
func TestCancelReply(t *testing.T) {
	t.Parallel()
	p := serve(t)
	c := page(t, p, "stop", "demo_user")
	sendChat(t, p, "stop", "demo_user", "[sim tokens=2000 rate=50] a very long answer")
	r := &reply{t: t}
	r.untilFrames(c, 3)

	// The page's impatient user clicks Stop three times at once.
	var wg sync.WaitGroup
	statuses := make([]string, 3)
	for i := range statuses {
		wg.Add(1)
		go func() {
			defer wg.Done()
			statuses[i] = cancelOnce(t, p, "stop", r.id)
		}()
	}
	wg.Wait()
	for i, s := range statuses {
		if s != "cancelled" {
			t.Fatalf("concurrent cancel %d answered %q", i, s)
		}
	}
	r.untilFinal(c)
	final := r.final.Obj("data").Str("content")
	text, ok := strings.CutSuffix(final, cancelledSuffix)
	if !ok || !strings.HasPrefix(text, r.seen[len(r.seen)-2]) {
		t.Fatalf("cancelled final content %q does not end with the suffix after the text so far", final)
	}
	for range 3 {
		if s := cancelReply(t, p, "stop", r.id); s != "cancelled" {
			t.Fatalf("repeated cancel answered %q", s)
		}
	}
	if more := pingPong(t, c); len(more) != 0 {
		t.Fatalf("frames after the completion frame: %v", more)
	}
	if got := lastAssistant(t, history(t, p, "stop")).Str("content"); got != final {
		t.Fatalf("history %q, final frame %q", got, final)
	}
}

// cancelOnce is cancelReply for another goroutine: it reports instead of
// failing.
func cancelOnce(t *testing.T, p *trtest.Proc, session, id string) string {
	req, _ := http.NewRequest("POST", p.URL+"/api/cancel", strings.NewReader(`{"session_id":"`+session+`","message_id":"`+id+`"}`))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return resp.Status
	}
	var body struct{ Status string }
	_ = jsonDecode(resp, &body)
	return body.Status
}

// Cancel by the id of the user message the reply answers, before the first
// token: the reply ends with the suffix alone. Unprefixed paths work too.
func TestCancelByUserMessageID(t *testing.T) {
	t.Parallel()
	p := serve(t)
	c := page(t, p, "early", "demo_user")
	userID := sendChat(t, p, "early", "demo_user", "[sim tokens=50 delay_ms=20000] slow to start")
	// Another user's turn in another conversation, given the same id
	// (ids are chosen by clients), does not stand in its way.
	m := trtest.Dial(t, p.WSURL(), nil)
	m.Join("mallory-conv", nil)
	m.Send(map[string]any{"type": "send", "id": "s1", "conversation_id": "mallory-conv", "turn_id": userID, "text": "[sim tokens=5000 rate=20] hers"})
	m.Until(wait, func(f trtest.Frame) bool { return f.Type() == "turn.start" })
	code, body, _ := call(t, "POST", p.URL+"/cancel", map[string]any{"session_id": "early", "message_id": userID}, nil)
	if code != 200 || body["status"] != "cancelled" || body["message_id"] != userID {
		t.Fatalf("POST /cancel = %d %v", code, body)
	}
	r := &reply{t: t}
	r.untilFinal(c)
	if got := r.final.Obj("data").Str("content"); got != cancelledSuffix {
		t.Fatalf("content of a reply cancelled before its first token: %q", got)
	}
	if s := cancelReply(t, p, "early", userID); s != "cancelled" {
		t.Fatalf("repeated cancel by user message id: %q", s)
	}
}

// Cancel of a reply that completed, or of an unknown id: 200 completed.
// Malformed requests: 400.
func TestCancelCompletedOrUnknown(t *testing.T) {
	t.Parallel()
	p := serve(t)
	c := page(t, p, "done", "demo_user")
	userID := sendChat(t, p, "done", "demo_user", "[sim tokens=5 rate=0] quick")
	r := &reply{t: t}
	r.untilFinal(c)
	for _, id := range []string{r.id, userID, "unknown-id", r.id} {
		if s := cancelReply(t, p, "done", id); s != "completed" {
			t.Fatalf("cancel %s after the end: %q", id, s)
		}
	}
	if s := cancelReply(t, p, "no-such-session", "x"); s != "completed" {
		t.Fatalf("cancel in an unknown session: %q", s)
	}
	for _, body := range []any{
		map[string]any{"session_id": "done"},
		map[string]any{"message_id": r.id},
		map[string]any{"session_id": "done", "message_id": "bad id!"},
		"{not json",
	} {
		code, out, _ := call(t, "POST", p.URL+"/api/cancel", body, nil)
		if code != 400 || out["error"] != "Bad request" || out["detail"] == "" {
			t.Fatalf("cancel %v = %d %v, want 400", body, code, out)
		}
	}
	if more := pingPong(t, c); len(more) != 0 {
		t.Fatalf("frames after cancels of a finished reply: %v", more)
	}
}

// POST /api/chat: 400 for a missing or blank message or field, 409 while a
// reply streams; the same without /api.
func TestChatRequests(t *testing.T) {
	t.Parallel()
	p := serve(t)
	for _, tc := range []struct {
		body   any
		detail string
	}{
		{map[string]any{"session_id": "s", "message": ""}, "Message cannot be empty"},
		{map[string]any{"session_id": "s", "message": " \n\t "}, "Message cannot be empty"},
		{map[string]any{"session_id": "s"}, "Field required: message"},
		{map[string]any{"message": "hi"}, "Field required: session_id"},
		{map[string]any{"session_id": "no spaces allowed", "message": "hi"}, "session_id must match ^[A-Za-z0-9_.:-]{1,128}$"},
		{"[]", "The body must be a JSON object"},
	} {
		code, out, hdr := call(t, "POST", p.URL+"/api/chat", tc.body, nil)
		if code != 400 || out["error"] != "Bad request" || out["detail"] != tc.detail {
			t.Fatalf("chat %v = %d %v, want 400 %q", tc.body, code, out, tc.detail)
		}
		if hdr.Get("Access-Control-Allow-Origin") != "*" {
			t.Fatalf("error answer without CORS header")
		}
	}
	// The AI service's own paths, without /api.
	code, out, _ := call(t, "POST", p.URL+"/chat", map[string]any{"session_id": "busy", "message": "[sim tokens=1000 rate=20] long", "user_id": "demo_user"}, nil)
	if code != 200 || out["status"] != "streaming" {
		t.Fatalf("POST /chat = %d %v", code, out)
	}
	code, out, _ = call(t, "POST", p.URL+"/api/chat", map[string]any{"session_id": "busy", "message": "again", "user_id": "demo_user"}, nil)
	if code != 409 || out["error"] != "Conflict" || out["detail"] == "" {
		t.Fatalf("chat while streaming = %d %v, want 409", code, out)
	}
	// History while streaming: the user message, not the partial reply.
	code, out, _ = call(t, "GET", p.URL+"/history/busy", nil, nil)
	msgs := messages(t, out["messages"])
	if code != 200 || len(msgs) != 1 || msgs[0].Str("role") != "user" || out["count"] != float64(1) {
		t.Fatalf("GET /history/busy while streaming = %d %v", code, out)
	}
	// DELETE stops the reply and clears the session; both prefixes.
	for _, path := range []string{"/history/busy", "/api/history/busy", "/api/history/never-used"} {
		code, out, _ = call(t, "DELETE", p.URL+path, nil, nil)
		sid := path[strings.LastIndex(path, "/")+1:]
		if code != 200 || out["status"] != "success" || out["message"] != "History cleared for session "+sid {
			t.Fatalf("DELETE %s = %d %v", path, code, out)
		}
	}
	if msgs := history(t, p, "busy"); len(msgs) != 0 {
		t.Fatalf("history after DELETE: %v", msgs)
	}
	// A socket on the cleared session gets no history frame.
	if before := pingPong(t, page(t, p, "busy", "demo_user")); len(before) != 0 {
		t.Fatalf("frames on a cleared session: %v", before)
	}
	code, out, _ = call(t, "POST", p.URL+"/api/chat", map[string]any{"session_id": "busy", "message": "[sim tokens=3 rate=0] after clearing", "user_id": "demo_user"}, nil)
	if code != 200 {
		t.Fatalf("chat after DELETE = %d %v", code, out)
	}
}

// A session belongs to its first user: another may not read, write or
// cancel in it.
func TestSessionOwnership(t *testing.T) {
	t.Parallel()
	p := serve(t)
	c := page(t, p, "alices", "alice")
	sendChat(t, p, "alices", "alice", "[sim tokens=5 rate=0] mine")
	r := &reply{t: t}
	r.untilFinal(c)
	forbidden := func(method, path string, body any) {
		t.Helper()
		code, out, _ := call(t, method, p.URL+path, body, nil)
		if code != 403 || out["error"] != "Forbidden" || out["detail"] == "" {
			t.Fatalf("%s %s as bob = %d %v, want 403", method, path, code, out)
		}
	}
	forbidden("POST", "/api/chat", map[string]any{"session_id": "alices", "message": "hi", "user_id": "bob"})
	forbidden("POST", "/api/cancel", map[string]any{"session_id": "alices", "message_id": r.id, "user_id": "bob"})
	forbidden("GET", "/api/history/alices?user_id=bob", nil)
	forbidden("DELETE", "/api/history/alices?user_id=bob", nil)
	if msgs := history(t, p, "alices"); len(msgs) != 2 || msgs[0].Str("user_id") != "alice" {
		t.Fatalf("alice's history = %v", msgs)
	}
}

// With a JWT key (no dev mode), the token must be a valid HS256 JWT whose
// sub is user_id, on the socket and over HTTP.
func TestJWTAuth(t *testing.T) {
	t.Parallel()
	secret := "0123456789abcdef0123456789abcdef"
	p := serve(t, "--jwt-secret", secret)
	token := func(sub string) string {
		s, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{"sub": sub, "exp": time.Now().Add(time.Hour).Unix()}).SignedString([]byte(secret))
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	dial := func(user, tok string) *trtest.Client {
		q := url.Values{"session_id": {"jwt-s"}, "user_id": {user}}
		if tok != "" {
			q.Set("token", tok)
		}
		return trtest.Dial(t, wsURL(p, "/ws/chat", q), nil)
	}
	for _, tc := range []struct{ user, tok string }{
		{"alice", ""}, {"alice", "dev-token"}, {"bob", token("alice")}, {"alice", token("alice") + "x"},
	} {
		c := dial(tc.user, tc.tok)
		if f, err := c.Next(wait); err != nil || f.Str("error") != "Authentication failed" || c.CloseStatus() != 1003 {
			t.Fatalf("user %s token %.12q: %v %v", tc.user, tc.tok, f, err)
		}
	}
	for _, tok := range []string{token("alice"), "Bearer " + token("alice")} {
		c := dial("alice", tok)
		if f, err := c.Next(wait); err != nil || f.Type() != "welcome" {
			t.Fatalf("valid token: %v %v", f, err)
		}
	}
	code, out, _ := call(t, "POST", p.URL+"/api/chat", map[string]any{"session_id": "jwt-s", "message": "hi"}, nil)
	if code != 401 || out["error"] != "Unauthorized" {
		t.Fatalf("chat without a token = %d %v", code, out)
	}
	auth := http.Header{"Authorization": {"Bearer " + token("alice")}}
	code, out, _ = call(t, "POST", p.URL+"/api/chat", map[string]any{"session_id": "jwt-s", "message": "[sim tokens=3 rate=0] hi"}, auth)
	if code != 200 {
		t.Fatalf("chat with alice's token = %d %v", code, out)
	}
	code, out, _ = call(t, "GET", p.URL+"/api/history/jwt-s", nil, http.Header{"Authorization": {"Bearer " + token("bob")}})
	if code != 403 {
		t.Fatalf("bob reading alice's history = %d %v", code, out)
	}
	code, _, _ = call(t, "GET", p.URL+"/api/history/jwt-s?token="+token("alice"), nil, nil)
	if code != 200 {
		t.Fatalf("history with ?token= = %d", code)
	}
}

// CORS: any origin, preflight answered, on every compat HTTP path.
func TestCORS(t *testing.T) {
	t.Parallel()
	p := serve(t)
	for _, path := range []string{"/api/chat", "/api/cancel", "/api/history/x", "/chat", "/cancel", "/history/x", "/api/ai-health", "/health"} {
		code, _, hdr := call(t, "OPTIONS", p.URL+path, nil, http.Header{
			"Origin": {"http://localhost:5173"}, "Access-Control-Request-Method": {"POST"}, "Access-Control-Request-Headers": {"content-type"},
		})
		if code != 204 || hdr.Get("Access-Control-Allow-Origin") != "*" || !strings.Contains(hdr.Get("Access-Control-Allow-Methods"), "POST") ||
			!strings.Contains(strings.ToLower(hdr.Get("Access-Control-Allow-Headers")), "content-type") {
			t.Fatalf("preflight %s = %d %v", path, code, hdr)
		}
	}
	_, _, hdr := call(t, "GET", p.URL+"/api/history/x", nil, http.Header{"Origin": {"http://localhost:5173"}})
	if hdr.Get("Access-Control-Allow-Origin") != "*" {
		t.Fatalf("GET history without CORS: %v", hdr)
	}
}

// Health: UP with node and port, READY, ALIVE; the AI service is reachable.
func TestHealth(t *testing.T) {
	t.Parallel()
	p := serve(t)
	code, out, _ := call(t, "GET", p.URL+"/health", nil, nil)
	_, port, _ := net.SplitHostPort(strings.TrimPrefix(p.URL, "http://"))
	if code != 200 || out["status"] != "UP" || out["nodeId"] == "" || strconv.Itoa(int(out["port"].(float64))) != port {
		t.Fatalf("/health = %d %v", code, out)
	}
	if _, err := time.Parse(time.RFC3339Nano, out["timestamp"].(string)); err != nil {
		t.Fatalf("/health timestamp: %v", err)
	}
	if code, out, _ = call(t, "GET", p.URL+"/health/ready", nil, nil); code != 200 || out["status"] != "READY" || out["nodeId"] == "" {
		t.Fatalf("/health/ready = %d %v", code, out)
	}
	if code, out, _ = call(t, "GET", p.URL+"/health/live", nil, nil); code != 200 || out["status"] != "ALIVE" || out["nodeId"] == "" {
		t.Fatalf("/health/live = %d %v", code, out)
	}
	if code, out, _ = call(t, "GET", p.URL+"/api/ai-health", nil, nil); code != 200 || out["ai_service"] != "reachable" || out["status"] != "healthy" || out["url"] == "" {
		t.Fatalf("/api/ai-health = %d %v", code, out)
	}
}

// Without a worker: chat 502, ai-health 503, not ready; without a broker:
// DOWN. A gateway alone against its own NATS shows all of them.
func TestNoWorkerNoBroker(t *testing.T) {
	t.Parallel()
	ns, natsURL, storeURL := trtest.ScaleOutDeps(t)
	g := trtest.Start(t, "gateway", "--addr", "127.0.0.1:0", "--nats-url", natsURL, "--store-url", storeURL)

	code, out, _ := call(t, "POST", g.URL+"/api/chat", map[string]any{"session_id": "s", "message": "hello"}, nil)
	if code != 502 || out["error"] != "Communication error with AI service" || out["detail"] == "" {
		t.Fatalf("chat without a worker = %d %v", code, out)
	}
	if code, out, _ = call(t, "GET", g.URL+"/api/ai-health", nil, nil); code != 503 || out["ai_service"] != "unreachable" || out["error"] == "" {
		t.Fatalf("/api/ai-health without a worker = %d %v", code, out)
	}
	if code, out, _ = call(t, "GET", g.URL+"/health/ready", nil, nil); code != 503 || out["status"] != "NOT_READY" || !strings.Contains(out["reason"].(string), "worker") {
		t.Fatalf("/health/ready without a worker = %d %v", code, out)
	}
	if code, out, _ = call(t, "GET", g.URL+"/health", nil, nil); code != 200 || out["status"] != "UP" {
		t.Fatalf("/health with a broker = %d %v", code, out)
	}
	if code, out, _ = call(t, "GET", g.URL+"/health/live", nil, nil); code != 200 || out["status"] != "ALIVE" {
		t.Fatalf("/health/live = %d %v", code, out)
	}

	ns.Server.Shutdown()
	ns.Server.WaitForShutdown()
	if code, out, _ = call(t, "GET", g.URL+"/health", nil, nil); code != 503 || out["status"] != "DOWN" || out["error"] != "broker failing" {
		// The cause, which gives addresses away, is in the log only.
		t.Fatalf("/health without a broker = %d %v, want the error \"broker failing\"", code, out)
	}
}

// --compat-allowed-origins restricts the compat paths: a listed origin is
// served (and named in Access-Control-Allow-Origin), another is refused,
// on the socket's upgrade and over HTTP, preflight included; a request
// without an Origin (a script) is served as before.
func TestConfiguredOrigins(t *testing.T) {
	t.Parallel()
	good, bad := "http://page.example", "http://evil.example"
	p := serve(t, "--compat-allowed-origins", good)
	q := url.Values{"session_id": {"origins"}, "user_id": {"demo_user"}, "token": {"dev-token"}}
	c := trtest.Dial(t, wsURL(p, "/ws/chat", q), &trtest.DialOptions{Header: http.Header{"Origin": {good}}})
	if f, err := c.Next(wait); err != nil || f.Type() != "welcome" {
		t.Fatalf("listed origin: %v %v", f, err)
	}
	if _, err := trtest.TryDial(t, wsURL(p, "/ws/chat", q), &trtest.DialOptions{Header: http.Header{"Origin": {bad}}}); err == nil {
		t.Fatal("an unlisted origin opened the compat socket")
	}
	code, out, hdr := call(t, "GET", p.URL+"/api/history/origins", nil, http.Header{"Origin": {good}})
	if code != 200 || hdr.Get("Access-Control-Allow-Origin") != good {
		t.Fatalf("history from the listed origin = %d %v %v", code, out, hdr)
	}
	code, out, hdr = call(t, "GET", p.URL+"/api/history/origins", nil, nil)
	if code != 200 || hdr.Get("Access-Control-Allow-Origin") != "" {
		t.Fatalf("history without an Origin = %d %v %v", code, out, hdr)
	}
	for _, m := range []string{"OPTIONS", "POST"} {
		code, out, hdr = call(t, m, p.URL+"/api/chat", map[string]any{"session_id": "origins", "message": "hi"}, http.Header{"Origin": {bad}})
		if code != 403 || out["error"] != "Forbidden" || hdr.Get("Access-Control-Allow-Origin") != "" {
			t.Fatalf("%s from an unlisted origin = %d %v %v", m, code, out, hdr)
		}
	}
}
