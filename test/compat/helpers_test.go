// Package compat_test checks COMPAT.md, the original chat system's protocol,
// against the real tokenrelay binary: its React page and scripts must work
// unchanged, and better.
package compat_test

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

const (
	wait            = 30 * time.Second
	cancelledSuffix = "\n\n[Đã hủy]"
	errorContent    = "Xin lỗi, đã có lỗi xảy ra khi xử lý yêu cầu của bạn."
)

// chatMessageKeys are the keys every ChatMessage carries (COMPAT.md).
var chatMessageKeys = []string{"message_id", "session_id", "user_id", "role", "content", "chunk", "timestamp", "is_complete"}

// serve starts tokenrelay serve for one test. When the binary was built
// with -race (TOKENRELAY_TEST_BINARY), a race it reports fails the test.
func serve(t *testing.T, args ...string) *trtest.Proc {
	t.Helper()
	var p *trtest.Proc
	t.Cleanup(func() { // runs after the process is killed, so its stderr is complete
		if p != nil && strings.Contains(p.Stderr(), "WARNING: DATA RACE") {
			t.Errorf("the server reported a data race:\n%s", p.Stderr())
		}
	})
	p = trtest.Serve(t, args...)
	return p
}

// wsURL is the compat WebSocket URL of p with the given query.
func wsURL(p *trtest.Proc, path string, q url.Values) string {
	u := "ws" + strings.TrimPrefix(p.URL, "http") + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	return u
}

// page dials /ws/chat as the original page does (token=dev-token) and
// checks the welcome frame.
func page(t *testing.T, p *trtest.Proc, session, user string) *trtest.Client {
	t.Helper()
	c := trtest.Dial(t, wsURL(p, "/ws/chat", url.Values{"session_id": {session}, "user_id": {user}, "token": {"dev-token"}}), nil)
	f, err := c.Next(wait)
	if err != nil {
		t.Fatalf("welcome: %v", err)
	}
	if f.Type() != "welcome" || f.Str("sessionId") != session {
		t.Fatalf("first frame = %v, want welcome for %s", f, session)
	}
	if _, err := time.Parse(time.RFC3339Nano, f.Str("timestamp")); err != nil {
		t.Fatalf("welcome timestamp %q: %v", f.Str("timestamp"), err)
	}
	return c
}

// call performs an HTTP request with a JSON body and decodes the answer.
func call(t *testing.T, method, u string, body any, hdr http.Header) (int, map[string]any, http.Header) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		switch b := body.(type) {
		case string:
			rd = strings.NewReader(b)
		default:
			data, err := json.Marshal(b)
			if err != nil {
				t.Fatal(err)
			}
			rd = bytes.NewReader(data)
		}
	}
	req, err := http.NewRequest(method, u, rd)
	if err != nil {
		t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	var out map[string]any
	if len(data) > 0 {
		if err := json.Unmarshal(data, &out); err != nil {
			t.Fatalf("%s %s: answer is not a JSON object: %q", method, u, data)
		}
	}
	return resp.StatusCode, out, resp.Header
}

// sendChat posts a message as the page does and returns the user message id.
func sendChat(t *testing.T, p *trtest.Proc, session, user, text string) string {
	t.Helper()
	code, body, _ := call(t, "POST", p.URL+"/api/chat", map[string]any{"session_id": session, "message": text, "user_id": user}, nil)
	if code != 200 || body["status"] != "streaming" || body["session_id"] != session || body["message"] != "AI is generating response..." {
		t.Fatalf("POST /api/chat = %d %v", code, body)
	}
	id, _ := body["message_id"].(string)
	if id == "" {
		t.Fatalf("POST /api/chat: no message_id in %v", body)
	}
	return id
}

// cancelReply posts /api/cancel and returns the answer's status.
func cancelReply(t *testing.T, p *trtest.Proc, session, id string) string {
	t.Helper()
	code, body, _ := call(t, "POST", p.URL+"/api/cancel", map[string]any{"session_id": session, "message_id": id}, nil)
	if code != 200 || body["session_id"] != session || body["message_id"] != id {
		t.Fatalf("POST /api/cancel %s = %d %v", id, code, body)
	}
	status, _ := body["status"].(string)
	want := map[string]string{"cancelled": "Streaming cancelled successfully", "completed": "Message already completed or not found"}[status]
	if want == "" || body["message"] != want {
		t.Fatalf("POST /api/cancel %s = %v", id, body)
	}
	return status
}

// history returns GET /api/history/{session}'s messages.
func history(t *testing.T, p *trtest.Proc, session string) []trtest.Frame {
	t.Helper()
	code, body, _ := call(t, "GET", p.URL+"/api/history/"+session, nil, nil)
	if code != 200 || body["session_id"] != session {
		t.Fatalf("GET /api/history/%s = %d %v", session, code, body)
	}
	msgs := messages(t, body["messages"])
	if n, _ := body["count"].(float64); int(n) != len(msgs) {
		t.Fatalf("history count %v, %d messages", body["count"], len(msgs))
	}
	return msgs
}

// messages converts a JSON array of ChatMessages, checking their keys.
func messages(t *testing.T, v any) []trtest.Frame {
	t.Helper()
	arr, ok := v.([]any)
	if !ok {
		t.Fatalf("messages is %T, want an array", v)
	}
	out := make([]trtest.Frame, 0, len(arr))
	for _, x := range arr {
		m, _ := x.(map[string]any)
		checkKeys(t, m)
		out = append(out, trtest.Frame(m))
	}
	return out
}

// checkKeys fails unless m has every ChatMessage key.
func checkKeys(t *testing.T, m map[string]any) {
	t.Helper()
	for _, k := range chatMessageKeys {
		if _, ok := m[k]; !ok {
			t.Fatalf("ChatMessage %v lacks %q", m, k)
		}
	}
	if ts, _ := m["timestamp"].(float64); ts < 1e12 {
		t.Fatalf("timestamp %v is not epoch ms", m["timestamp"])
	}
}

// reply follows one assistant reply on a socket: every content extends the
// one before, every chunk is the newest piece, and exactly one frame is
// complete.
type reply struct {
	t       *testing.T
	id      string   // the reply's message_id, learnt from its first frame
	content string   // newest content
	frames  int      // message frames seen
	seen    []string // every content, in order
	final   trtest.Frame
}

// apply folds a frame of the socket into r; it fails on any violation.
func (r *reply) apply(f trtest.Frame) {
	r.t.Helper()
	if f.Type() != "message" {
		return
	}
	d := f.Obj("data")
	checkKeys(r.t, d)
	if d.Str("role") != "assistant" {
		r.t.Fatalf("live frame for a %q message: %v (user messages are not sent live)", d.Str("role"), f)
	}
	if r.id == "" {
		r.id = d.Str("message_id")
	} else if d.Str("message_id") != r.id {
		r.t.Fatalf("frame of reply %s while following %s", d.Str("message_id"), r.id)
	}
	if r.final != nil {
		r.t.Fatalf("frame after the final one: %v", f)
	}
	content := d.Str("content")
	complete, _ := d["is_complete"].(bool)
	r.frames++
	r.seen = append(r.seen, content)
	if complete {
		r.final = f
		r.content = content
		return
	}
	if !strings.HasPrefix(content, r.content) || len(content) <= len(r.content) {
		r.t.Fatalf("content does not extend the previous one:\nprev %q\nnow  %q", r.content, content)
	}
	if chunk := d.Str("chunk"); chunk == "" || !strings.HasSuffix(content, chunk) {
		r.t.Fatalf("chunk %q is not the end of content %q", chunk, content)
	}
	r.content = content
}

// untilFinal applies frames of c until the reply's final frame.
func (r *reply) untilFinal(c *trtest.Client) {
	r.t.Helper()
	c.Until(wait, func(f trtest.Frame) bool {
		r.apply(f)
		return r.final != nil
	})
}

// untilFrames applies frames of c until n message frames were seen.
func (r *reply) untilFrames(c *trtest.Client, n int) {
	r.t.Helper()
	c.Until(wait, func(f trtest.Frame) bool {
		r.apply(f)
		if r.final != nil {
			r.t.Fatalf("reply ended after %d frames, wanted %d streaming ones", r.frames, n)
		}
		return r.frames >= n
	})
}

// pingPong sends a JSON ping and returns every frame before the pong.
func pingPong(t *testing.T, c *trtest.Client) []trtest.Frame {
	t.Helper()
	c.Send(map[string]any{"type": "ping"})
	fs := c.UntilType(wait, "pong")
	return fs[:len(fs)-1]
}

// lastAssistant returns the last assistant message of msgs.
func lastAssistant(t *testing.T, msgs []trtest.Frame) trtest.Frame {
	t.Helper()
	for i := len(msgs) - 1; i >= 0; i-- {
		if msgs[i].Str("role") == "assistant" {
			return msgs[i]
		}
	}
	t.Fatalf("no assistant message in %v", msgs)
	return nil
}

func jsonDecode(resp *http.Response, v any) error { return json.NewDecoder(resp.Body).Decode(v) }
