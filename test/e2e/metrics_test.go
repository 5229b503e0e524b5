package e2e_test

import (
	"bufio"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// metricsOf scrapes base/metrics into a map from "name{labels}" (as written
// in the exposition) to value.
func metricsOf(t *testing.T, base string) map[string]string {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out := map[string]string{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		if i := strings.LastIndexByte(line, ' '); i > 0 {
			out[line[:i]] = line[i+1:]
		}
	}
	return out
}

// sseEnd reads GET base/v1/turns/{turn}/events to its end event and returns
// that event's data.
func sseEnd(t *testing.T, base, turn string) string {
	t.Helper()
	resp, err := http.Get(base + "/v1/turns/" + url.PathEscape(turn) + "/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("SSE of %s: %d", turn, resp.StatusCode)
	}
	sc := bufio.NewScanner(resp.Body)
	end := false
	for sc.Scan() {
		line := sc.Text()
		if line == "event: end" {
			end = true
		} else if end && strings.HasPrefix(line, "data: ") {
			return strings.TrimPrefix(line, "data: ")
		}
	}
	t.Fatalf("SSE of %s ended without an end event: %v", turn, sc.Err())
	return ""
}

// Once every connection has closed and every turn has ended, serve's gauges
// are back at zero and its counters add up: every turn sent (over a
// WebSocket, over HTTP, through the compatible paths) ends once in
// tokenrelay_turns_total, whatever ended it, and each cancel counts once
// under the outcome its answer gave.
func TestMetricsAddUpWhenAllIsClosed(t *testing.T) {
	p := trtest.Serve(t)
	base := p.URL

	a1 := trtest.Dial(t, p.WSURL(), nil)
	a2 := trtest.Dial(t, p.WSURL(), nil)
	b := trtest.Dial(t, p.WSURL(), nil)
	a1.Join("m-a", nil)
	a2.Join("m-a", nil)
	b.Join("m-b", nil)

	// A turn that completes, then its message sent again (a retry: no
	// new turn), then a Stop of it (already ended).
	done := runTurn(t, a1, "m-a", "one [sim tokens=5 rate=0]", map[string]any{"message_id": "m-a-1"})
	if done.Status != "complete" {
		t.Fatalf("first turn ended %s", done.Status)
	}
	a1.Send(map[string]any{"type": "send", "conversation_id": "m-a", "text": "one [sim tokens=5 rate=0]", "message_id": "m-a-1", "id": "dup"})
	if f := a1.Until(wait, func(f trtest.Frame) bool { return f.Str("id") == "dup" }); f[len(f)-1].Str("turn_id") != done.ID {
		t.Fatalf("the retried send answered %v", f[len(f)-1])
	}
	a1.Send(map[string]any{"type": "cancel", "turn_id": done.ID, "id": "late"})
	if f := a1.Until(wait, func(f trtest.Frame) bool { return f.Str("id") == "late" }); f[len(f)-1]["already"] != true {
		t.Fatalf("the late cancel answered %v", f[len(f)-1])
	}

	// A turn stopped while it streams, and stopped again.
	long := startTurn(t, a1, "m-a", "two [sim tokens=5000 rate=50]", 2)
	a2.Send(map[string]any{"type": "cancel", "turn_id": long.ID, "id": "stop"})
	if f := a2.Until(wait, func(f trtest.Frame) bool { return f.Str("id") == "stop" }); f[len(f)-1].Str("status") != "cancelled" {
		t.Fatalf("the cancel answered %v", f[len(f)-1])
	}
	finish(t, a1, long)
	a2.Send(map[string]any{"type": "cancel", "turn_id": long.ID, "id": "again"})
	a2.Until(wait, func(f trtest.Frame) bool { return f.Str("id") == "again" })

	// A Stop of a turn that does not exist.
	a2.Send(map[string]any{"type": "cancel", "turn_id": "no-such-turn", "id": "unknown"})
	if f := a2.Until(wait, func(f trtest.Frame) bool { return f.Str("id") == "unknown" }); f[len(f)-1].Str("code") != "not_found" {
		t.Fatalf("the cancel of an unknown turn answered %v", f[len(f)-1])
	}

	// A turn the model fails.
	failed := runTurn(t, b, "m-b", "three [sim tokens=50 rate=0 error_after=3]", nil)
	if failed.Status != "error" {
		t.Fatalf("the failing turn ended %s", failed.Status)
	}

	// A turn sent over HTTP and followed over SSE only.
	var posted struct {
		TurnID string `json:"turn_id"`
	}
	if code := trtest.Do(t, "POST", base+"/v1/conversations/m-sse/messages", "", map[string]any{"text": "four [sim tokens=5 rate=0]"}, &posted); code != 202 {
		t.Fatalf("POST message: %d", code)
	}
	if end := sseEnd(t, base, posted.TurnID); !strings.Contains(end, `"complete"`) {
		t.Fatalf("SSE end %s", end)
	}

	// A turn of the compatible protocol, watched by its page's socket.
	page := trtest.Dial(t, "ws"+strings.TrimPrefix(base, "http")+"/ws/chat?session_id=m-compat&user_id=dev&token=dev-token", nil)
	page.UntilType(wait, "welcome")
	var chatAnswer map[string]any
	if code := trtest.Do(t, "POST", base+"/api/chat", "", map[string]any{"session_id": "m-compat", "message": "five [sim tokens=5 rate=0]", "user_id": "dev"}, &chatAnswer); code != 200 {
		t.Fatalf("POST /api/chat: %d", code)
	}
	page.Until(wait, func(f trtest.Frame) bool { return f.Type() == "message" && f.Obj("data")["is_complete"] == true })

	// A turn whose every watcher goes away while it streams: an SSE
	// reader and the sockets drop, then a Stop over HTTP ends it.
	open := startTurn(t, b, "m-b", "six [sim tokens=5000 rate=50]", 2)
	resp, err := http.Get(base + "/v1/turns/" + open.ID + "/events")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bufio.NewReader(resp.Body).ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	trtest.WaitMetric(t, base, "tokenrelay_sse_streams", "", wait, func(v float64) bool { return v == 1 })
	resp.Body.Close()
	for _, c := range []*trtest.Client{a1, a2, b, page} {
		_ = c.Conn.CloseNow()
	}
	trtest.WaitMetric(t, base, "tokenrelay_connections", "", wait, func(v float64) bool { return v == 0 })
	trtest.WaitMetric(t, base, "tokenrelay_sse_streams", "", wait, func(v float64) bool { return v == 0 })
	var stopped struct{ Status string }
	if code := trtest.Do(t, "POST", base+"/v1/turns/"+open.ID+"/cancel", "", nil, &stopped); code != 200 || stopped.Status != "cancelled" {
		t.Fatalf("POST cancel: %d %+v", code, stopped)
	}
	trtest.WaitMetric(t, base, "tokenrelay_turns_running", "", wait, func(v float64) bool { return v == 0 })

	m := metricsOf(t, base)
	want := map[string]string{
		"tokenrelay_connections":                                    "0",
		"tokenrelay_sse_streams":                                    "0",
		"tokenrelay_turns_running":                                  "0",
		"tokenrelay_connections_total":                              "4",
		"tokenrelay_sends_total":                                    "6",
		`tokenrelay_turns_total{status="complete"}`:                 "3",
		`tokenrelay_turns_total{status="cancelled"}`:                "2",
		`tokenrelay_turns_total{status="error"}`:                    "1",
		`tokenrelay_cancel_requests_total{outcome="cancelled"}`:     "2",
		`tokenrelay_cancel_requests_total{outcome="already_ended"}`: "2",
		`tokenrelay_cancel_requests_total{outcome="not_found"}`:     "1",
		"tokenrelay_provider_requests_total":                        "6",
		`tokenrelay_joins_total{kind="fresh"}`:                      "4",
		"tokenrelay_cancel_to_end_seconds_count":                    "2",
		"tokenrelay_turn_duration_seconds_count":                    "6",
	}
	var bad []string
	for k, v := range want {
		if m[k] != v {
			bad = append(bad, k+" = "+m[k]+", want "+v)
		}
	}
	if len(bad) > 0 {
		t.Fatalf("metrics after everything closed:\n%s", strings.Join(bad, "\n"))
	}
}

// A turn that serve's recovery ends, after the process running it was
// killed, counts in the new run's tokenrelay_turns_total as interrupted,
// and the new run's gauges start at zero.
func TestRecoveredTurnCounts(t *testing.T) {
	p := trtest.Serve(t)
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("m-recover", nil)
	tr := startTurn(t, c, "m-recover", "long [sim tokens=5000 rate=50]", 2)
	p.Kill()
	p = p.Restart(t)
	if got := storedTurn(t, p.URL, "m-recover", tr.ID); got.Status != "interrupted" {
		t.Fatalf("the killed run's turn is %s after the restart", got.Status)
	}
	m := metricsOf(t, p.URL)
	want := map[string]string{
		`tokenrelay_turns_total{status="interrupted"}`: "1",
		"tokenrelay_turns_running":                     "0",
		"tokenrelay_connections":                       "0",
	}
	for k, v := range want {
		if m[k] != v {
			t.Errorf("%s = %q after the restart, want %s", k, m[k], v)
		}
	}
}
