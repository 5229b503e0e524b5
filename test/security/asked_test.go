package security_test

import (
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// The frames a client asks for (a joined frame with its history, a compat
// reconnect's final frame) are not counted against --limit-outbound-bytes,
// so that one long history never closes a socket. These tests check that
// asking again and again without reading does not grow the server's queue
// by a history each time: the socket is closed as a slow consumer after a
// few requests.

const slowCloses = "tokenrelay_slow_consumer_closes_total"

// longConversation makes conversation conv of user's (a JWT; "" in dev
// mode) hold two answers of ~600 KB each and returns the last one's turn
// id.
func longConversation(t *testing.T, p *trtest.Proc, token, conv string) string {
	t.Helper()
	c := trtest.Dial(t, p.WSURL(), &trtest.DialOptions{Token: token})
	c.Join(conv, nil)
	var id string
	for range 2 {
		tr := startTurn(t, c, conv, "[sim tokens=100000 rate=0] a long answer")
		finish(t, c, tr)
		id = tr.ID
	}
	return id
}

// askWithoutReading dials wsURL, never reads, and writes frame n times or
// until the server has closed the socket. The socket stays open until the
// test ends.
func askWithoutReading(t *testing.T, wsURL string, h http.Header, frame string, n int) {
	t.Helper()
	ctx := trtest.Ctx(t, 2*time.Minute)
	ws, _, err := websocket.Dial(ctx, wsURL, &websocket.DialOptions{HTTPHeader: h})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ws.CloseNow() })
	for range n {
		if err := ws.Write(ctx, websocket.MessageText, []byte(frame)); err != nil {
			return // closed by the server
		}
	}
}

// A socket that re-joins without reading is cut off after a few joins: its
// queue overflows, and the joins after that are not carried out (each reads
// and encodes the whole history). The socket is then closed by
// --write-timeout, its write being blocked.
func TestRejoinWithoutReadingIsASlowConsumer(t *testing.T) {
	t.Parallel()
	p := serveJWT(t, "--write-timeout", "3s", "--limit-outbound-bytes", "262144")
	tok := tokenFor(t, "alice")
	longConversation(t, p, tok, "long")
	askWithoutReading(t, p.WSURL(), http.Header{"Authorization": {"Bearer " + tok}},
		`{"type":"join","conversation_id":"long","history":500}`, 200)
	waitMetric(t, p.URL, slowCloses, "", 1)
	if n := trtest.Metric(t, p.URL, "tokenrelay_joins_total", `kind="fresh"`); n > 50 {
		t.Fatalf("%v joins carried out for a socket that did not read, want a few", n)
	}
}

// A compat socket that asks for a long reply again and again without
// reading is closed as a slow consumer at once, however long --write-timeout.
func TestCompatReconnectWithoutReadingIsASlowConsumer(t *testing.T) {
	t.Parallel()
	p := trtest.Serve(t, "--write-timeout", "5m", "--limit-outbound-bytes", "262144")
	turn := longConversation(t, p, "", "long")
	u := "ws" + strings.TrimPrefix(p.URL, "http") + "/ws/chat?" +
		url.Values{"session_id": {"long"}, "user_id": {"dev"}, "token": {"dev-token"}}.Encode()
	askWithoutReading(t, u, nil, `{"type":"reconnect","messageId":"`+turn+`","lastChunkIndex":0}`, 200)
	waitMetric(t, p.URL, slowCloses, "", 1)
}

// A compat socket closed for another reason (here: it answered no ping)
// is not counted as a slow consumer, however many of its session's frames
// arrive while its close handshake runs.
func TestCompatSocketClosedForIdlenessIsNotASlowConsumer(t *testing.T) {
	t.Parallel()
	p := trtest.Serve(t, "--ping-interval", "100ms", "--idle-timeout", "300ms")
	u := "ws" + strings.TrimPrefix(p.URL, "http") + "/ws/chat?" +
		url.Values{"session_id": {"idle"}, "user_id": {"dev"}, "token": {"dev-token"}}.Encode()
	askWithoutReading(t, u, nil, `{"type":"heartbeat"}`, 1)
	waitMetric(t, p.URL, "tokenrelay_limit_hits_total", `limit="idle_timeout"`, 1)
	// A reply streams in the session during the socket's close handshake.
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("idle", nil)
	code, _, body := do(t, "POST", p.URL+"/api/chat", "", `{"session_id":"idle","user_id":"dev","message":"[sim tokens=200 rate=200] go"}`, nil)
	if code != 200 {
		t.Fatalf("POST /api/chat: %d %s", code, body)
	}
	c.UntilType(wait, "turn.end")
	if n := trtest.Metric(t, p.URL, slowCloses, ""); n != 0 {
		t.Fatalf("%s = %v after one socket closed for idleness, want 0", slowCloses, n)
	}
}
