package e2e_test

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/store/postgres/pgtest"
	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

const wait = 20 * time.Second

// runTurn sends text on c (joined to conv) and collects the turn to its end.
func runTurn(t *testing.T, c *trtest.Client, conv, text string, extra map[string]any) *trtest.Turn {
	t.Helper()
	m := map[string]any{"type": "send", "conversation_id": conv, "text": text, "id": "s"}
	for k, v := range extra {
		m[k] = v
	}
	c.Send(m)
	var tr *trtest.Turn
	c.Until(wait, func(f trtest.Frame) bool {
		switch f.Type() {
		case "error":
			t.Fatalf("send failed: %v", f)
		case "turn.start":
			if tr == nil {
				tr = &trtest.Turn{ID: f.Str("turn_id")}
			}
		}
		if tr != nil {
			tr.Apply(f)
			return tr.Ends > 0
		}
		return false
	})
	if len(tr.Errors) > 0 {
		t.Fatalf("delivery rule violations: %v", tr.Errors)
	}
	return tr
}

// message is a stored message as the HTTP API returns it.
type message = trtest.Message

func messages(t *testing.T, base, conv, query string) []message {
	t.Helper()
	ms, _ := messagePage(t, base, conv, query)
	return ms
}

// messagePage is one page of a conversation's messages and its has_more.
func messagePage(t *testing.T, base, conv, query string) ([]message, bool) {
	t.Helper()
	var body struct {
		Messages []message `json:"messages"`
		HasMore  *bool     `json:"has_more"`
	}
	if code := trtest.Get(t, base+"/v1/conversations/"+conv+"/messages"+query, &body); code != 200 || body.HasMore == nil {
		t.Fatalf("GET messages%s: %d, has_more %v", query, code, body.HasMore)
	}
	return body.Messages, *body.HasMore
}

func storedTurn(t *testing.T, base, conv, turn string) message {
	t.Helper()
	for _, m := range messages(t, base, conv, "?limit=500") {
		if m.MessageID == turn {
			return m
		}
	}
	t.Fatalf("turn %s not stored", turn)
	return message{}
}

func TestTurnStreamsAndIsStored(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "200", "--sim-tokens", "60")
	c := trtest.Dial(t, p.WSURL(), nil)
	j := c.Join("conv-1", nil)
	if msgs := j["messages"].([]any); len(msgs) != 0 || j["active"] != nil {
		t.Fatalf("fresh conversation joined with %v", j)
	}
	tr := runTurn(t, c, "conv-1", "hello there", nil)
	if tr.Status != "complete" || tr.Seq != 60 {
		t.Fatalf("turn ended %s at seq %d, want complete at 60", tr.Status, tr.Seq)
	}
	m := storedTurn(t, p.URL, "conv-1", tr.ID)
	if m.Content != tr.Text.String() || m.Status != "complete" || m.Role != "assistant" {
		t.Fatalf("stored %q (%s), streamed %q", m.Content, m.Status, tr.Text.String())
	}
	if _, err := time.Parse("2006-01-02T15:04:05.000Z", m.CreatedAt); err != nil {
		t.Fatalf("created_at %q is not RFC 3339 with milliseconds in UTC", m.CreatedAt)
	}
	// The same prompt gives the same text.
	c2 := trtest.Dial(t, p.WSURL(), nil)
	c2.Join("conv-2", nil)
	tr2 := runTurn(t, c2, "conv-2", "hello there", nil)
	if tr2.Text.String() != tr.Text.String() {
		t.Fatalf("same prompt, different replies:\n%q\n%q", tr.Text.String(), tr2.Text.String())
	}
}

func TestTwoConnectionsSeeTheSameTurn(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "300", "--sim-tokens", "80")
	a := trtest.Dial(t, p.WSURL(), nil)
	b := trtest.Dial(t, p.WSURL(), nil)
	a.Join("shared", nil)
	b.Join("shared", nil)
	a.Send(map[string]any{"type": "send", "conversation_id": "shared", "text": "from a", "message_id": "m-a", "id": "1"})
	collect := func(c *trtest.Client) (*trtest.Turn, string) {
		var tr *trtest.Turn
		var userMsg string
		c.Until(wait, func(f trtest.Frame) bool {
			switch f.Type() {
			case "message":
				userMsg = f.Obj("message").Str("message_id")
			case "turn.start":
				tr = &trtest.Turn{ID: f.Str("turn_id")}
			}
			if tr != nil {
				tr.Apply(f)
				return tr.Ends > 0
			}
			return false
		})
		return tr, userMsg
	}
	ta, ma := collect(a)
	tb, mb := collect(b)
	if ma != "m-a" || mb != "m-a" {
		t.Fatalf("user message seen as %q and %q, want m-a live on both", ma, mb)
	}
	if ta.Text.String() != tb.Text.String() || ta.Seq != tb.Seq || len(ta.Errors)+len(tb.Errors) > 0 {
		t.Fatalf("connections differ: %q/%v vs %q/%v", ta.Text.String(), ta.Errors, tb.Text.String(), tb.Errors)
	}
}

func TestDuplicateMessageIDStartsNothing(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "0", "--sim-tokens", "5")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("dup", nil)
	tr := runTurn(t, c, "dup", "once", map[string]any{"message_id": "m1", "turn_id": "t1"})
	c.Send(map[string]any{"type": "send", "conversation_id": "dup", "text": "once", "message_id": "m1", "id": "again"})
	fs := c.Until(wait, func(f trtest.Frame) bool { return f.Str("id") == "again" })
	ack := fs[len(fs)-1]
	if ack.Type() != "ack" || ack.Str("message_id") != "m1" || ack.Str("turn_id") != tr.ID {
		t.Fatalf("retry answered %v, want ack naming m1 and %s", ack, tr.ID)
	}
	for _, f := range fs {
		if f.Type() == "turn.start" || f.Type() == "message" {
			t.Fatalf("retry started something: %v", f)
		}
	}
	if n := len(messages(t, p.URL, "dup", "")); n != 2 {
		t.Fatalf("%d messages stored, want 2", n)
	}
}

func TestSendWhileTurnActive(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "20", "--sim-tokens", "200")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("busy", nil)
	c.Send(map[string]any{"type": "send", "conversation_id": "busy", "text": "first", "turn_id": "t-first", "id": "1"})
	c.Until(wait, func(f trtest.Frame) bool { return f.Type() == "ack" && f.Str("id") == "1" })
	c.Send(map[string]any{"type": "send", "conversation_id": "busy", "text": "second", "id": "2"})
	fs := c.Until(wait, func(f trtest.Frame) bool { return f.Str("id") == "2" })
	e := fs[len(fs)-1]
	if e.Type() != "error" || e.Str("code") != "turn_active" || e.Str("turn_id") != "t-first" {
		t.Fatalf("second send answered %v, want turn_active naming t-first", e)
	}
}

func TestBadInputKeepsConnectionAndStoresNothing(t *testing.T) {
	p := trtest.Serve(t)
	c := trtest.Dial(t, p.WSURL(), nil)
	long := strings.Repeat("x", 129)
	tests := []struct {
		name  string
		frame string
	}{
		{"invalid json", `{"type":"send",`},
		{"not an object", `[1,2]`},
		{"unknown type", `{"type":"dance","id":"x"}`},
		{"missing type", `{"conversation_id":"c"}`},
		{"join without conversation", `{"type":"join"}`},
		{"conversation id with slash", `{"type":"join","conversation_id":"a/b"}`},
		{"conversation id too long", `{"type":"join","conversation_id":"` + long + `"}`},
		{"send without text", `{"type":"send","conversation_id":"bad"}`},
		{"send bad message id", `{"type":"send","conversation_id":"bad","text":"hi","message_id":"a b"}`},
		{"send bad turn id", `{"type":"send","conversation_id":"bad","text":"hi","turn_id":"x*"}`},
		{"cancel without turn", `{"type":"cancel"}`},
		{"history out of range", `{"type":"join","conversation_id":"bad","history":501}`},
		{"wrong field type", `{"type":"send","conversation_id":"bad","text":5}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c.Send(tt.frame)
			f, err := c.Next(wait)
			if err != nil {
				t.Fatal(err)
			}
			if f.Type() != "error" || f.Str("code") != "bad_request" || f.Str("message") == "" {
				t.Fatalf("got %v, want a bad_request error", f)
			}
		})
	}
	// Still open, and nothing was stored.
	c.Send(`{"type":"ping","id":"p"}`)
	if f, err := c.Next(wait); err != nil || f.Type() != "pong" {
		t.Fatalf("after bad frames: %v %v", f, err)
	}
	var convs struct {
		Conversations []any `json:"conversations"`
	}
	trtest.Get(t, p.URL+"/v1/conversations", &convs)
	if len(convs.Conversations) != 0 {
		t.Fatalf("bad frames stored conversations: %v", convs.Conversations)
	}
}

// TestConversationList: the list is cut at limit, and has_more says
// whether it was.
func TestConversationList(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "0", "--sim-tokens", "3")
	for i := range 3 {
		body := map[string]any{"text": fmt.Sprintf("hello %d", i)}
		if code := trtest.Do(t, "POST", p.URL+fmt.Sprintf("/v1/conversations/list-%d/messages", i), "", body, nil); code != 202 {
			t.Fatalf("POST %d: %d", i, code)
		}
	}
	for _, tt := range []struct {
		query string
		n     int
		more  bool
	}{{"", 3, false}, {"?limit=2", 2, true}, {"?limit=3", 3, false}} {
		var list struct {
			Conversations []struct {
				ConversationID string `json:"conversation_id"`
			} `json:"conversations"`
			HasMore *bool `json:"has_more"`
		}
		if code := trtest.Get(t, p.URL+"/v1/conversations"+tt.query, &list); code != 200 || list.HasMore == nil {
			t.Fatalf("GET /v1/conversations%s: %d, has_more %v", tt.query, code, list.HasMore)
		}
		if len(list.Conversations) != tt.n || *list.HasMore != tt.more {
			t.Errorf("%s: %d conversations, has_more %v; want %d, %v", tt.query, len(list.Conversations), *list.HasMore, tt.n, tt.more)
		}
	}
}

func TestHistoryPagingAndRestartKeepsIt(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "0", "--sim-tokens", "3")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("paged", nil)
	for i := range 5 {
		runTurn(t, c, "paged", fmt.Sprintf("question %d", i), nil)
	}
	all := messages(t, p.URL, "paged", "?limit=500")
	if len(all) != 10 {
		t.Fatalf("%d messages, want 10", len(all))
	}
	page := messages(t, p.URL, "paged", "?limit=4")
	if len(page) != 4 || page[3].MessageID != all[9].MessageID {
		t.Fatalf("newest page wrong: %+v", page)
	}
	older := messages(t, p.URL, "paged", "?limit=4&before="+page[0].MessageID)
	if len(older) != 4 || older[3].MessageID != all[5].MessageID || older[0].MessageID != all[2].MessageID {
		t.Fatalf("older page wrong: %+v", older)
	}
	// has_more says whether older messages exist, also when a page is
	// exactly full.
	for _, tt := range []struct {
		query string
		n     int
		more  bool
	}{
		{"?limit=4", 4, true},
		{"?limit=9", 9, true},
		{"?limit=10", 10, false},
		{"?limit=4&before=" + older[0].MessageID, 2, false},
		{"?limit=2&before=" + all[2].MessageID, 2, false},
		{"?limit=2&before=" + all[3].MessageID, 2, true},
		{"?limit=2&before=" + all[0].MessageID, 0, false},
	} {
		if got, more := messagePage(t, p.URL, "paged", tt.query); len(got) != tt.n || more != tt.more {
			t.Errorf("%s: %d messages, has_more %v; want %d, %v", tt.query, len(got), more, tt.n, tt.more)
		}
	}
	if err := p.Stop(); err != nil {
		t.Fatalf("stop: %v\n%s", err, p.Stderr())
	}
	q := p.Restart(t)
	again := messages(t, q.URL, "paged", "?limit=500")
	if len(again) != 10 {
		t.Fatalf("after restart %d messages, want 10", len(again))
	}
	for i := range again {
		if again[i] != all[i] {
			t.Fatalf("after restart message %d = %+v, want %+v", i, again[i], all[i])
		}
	}
}

func TestServeRefusesToStart(t *testing.T) {
	bin := trtest.Binary(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ro := filepath.Join(t.TempDir(), "ro")
	if err := os.MkdirAll(ro, 0o500); err != nil {
		t.Fatal(err)
	}
	running := trtest.Serve(t) // holds its data dir
	natsFile := t.TempDir()
	if err := os.WriteFile(filepath.Join(natsFile, "nats"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		args  []string
		want  string
		alone bool // refused before anything runs: the reason is all it prints
	}{
		{"port taken", []string{"--addr", ln.Addr().String(), "--data-dir", t.TempDir()}, "address already in use", false},
		{"data dir not writable", []string{"--addr", "127.0.0.1:0", "--data-dir", "/proc/tokenrelay"}, "not writable", false},
		{"bad flag", []string{"--sim-rate", "fast"}, "invalid value", true},
		{"unknown flag", []string{"--bogus"}, "not defined: -bogus", true},
		{"negative limit", []string{"--addr", "127.0.0.1:0", "--data-dir", t.TempDir(), "--limit-turns", "-2"}, "must not be negative", true},
		{"rate not a number", []string{"--addr", "127.0.0.1:0", "--data-dir", t.TempDir(), "--sim-rate", "NaN"}, "must be a finite number", true},
		{"rate infinite", []string{"--addr", "127.0.0.1:0", "--data-dir", t.TempDir(), "--sim-rate", "Inf"}, "must be a finite number", true},
		{"header without a name", []string{"--addr", "127.0.0.1:0", "--data-dir", t.TempDir(), "--provider", "openai",
			"--openai-base-url", "http://127.0.0.1:1/v1", "--openai-header", "sk-not-to-be-printed"}, "has no header name", true},
		{"no auth on a public address", []string{"--addr", "0.0.0.0:0", "--data-dir", t.TempDir()}, "without authentication", false},
		{"address without a port", []string{"--addr", "nonsense", "--data-dir", t.TempDir()}, "missing port in address", true},
		{"data dir in use", []string{"--addr", "127.0.0.1:0", "--data-dir", running.DataDir}, "in use by another tokenrelay", false},
		{"retention too short", []string{"--addr", "127.0.0.1:0", "--data-dir", t.TempDir(), "--retention", "500ms"}, "--retention must be 0", false},
		{"nats store dir is a file", []string{"--addr", "127.0.0.1:0", "--data-dir", natsFile}, "not a directory", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// A serve that starts after all is stopped, and fails the test.
			cmd := exec.CommandContext(trtest.Ctx(t, 20*time.Second), bin, append([]string{"serve"}, tt.args...)...)
			out, err := cmd.CombinedOutput()
			if err == nil {
				t.Fatalf("serve started; output:\n%s", out)
			}
			lines := strings.Split(strings.TrimSpace(string(out)), "\n")
			last := lines[len(lines)-1]
			if !strings.Contains(last, tt.want) || !strings.HasPrefix(last, "tokenrelay:") {
				t.Fatalf("last line %q, want a one-line reason containing %q\n%s", last, tt.want, out)
			}
			if tt.alone && len(lines) != 1 {
				t.Fatalf("%d lines, want the reason alone:\n%s", len(lines), out)
			}
			if strings.Contains(string(out), "sk-not-to-be-printed") {
				t.Fatalf("a header value, which may be a secret, was printed:\n%s", out)
			}
		})
	}
}

func TestSIGTERMShutsDownCleanly(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "20", "--sim-tokens", "500")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("term", nil)
	c.Send(map[string]any{"type": "send", "conversation_id": "term", "text": "long", "id": "1"})
	var tr *trtest.Turn
	c.Until(wait, func(f trtest.Frame) bool {
		if f.Type() == "turn.start" {
			tr = &trtest.Turn{ID: f.Str("turn_id")}
		}
		if tr != nil {
			tr.Apply(f)
		}
		return tr != nil && tr.Seq >= 3
	})
	if err := p.Stop(); err != nil {
		t.Fatalf("exit after SIGTERM: %v\n%s", err, p.Stderr())
	}
	// The client hears the turn end as interrupted, then 1001.
	for {
		f, err := c.Next(wait)
		if err != nil {
			break
		}
		tr.Apply(f)
	}
	if tr.Ends != 1 || tr.Status != "interrupted" {
		t.Fatalf("turn ended %d times with %q, want once interrupted", tr.Ends, tr.Status)
	}
	if code := c.CloseStatus(); code != 1001 {
		t.Fatalf("close code %d, want 1001", code)
	}
	q := p.Restart(t)
	m := storedTurn(t, q.URL, "term", tr.ID)
	if m.Status != "interrupted" || m.Content != tr.Text.String() {
		t.Fatalf("stored %s %q, streamed %q", m.Status, m.Content, tr.Text.String())
	}
}

// queuedTurn starts serve with one worker slot, keeps it busy with a turn
// of conversation "busy", and sends turn "queued-turn" of conversation
// "waiting", which stays queued behind it; c follows both.
func queuedTurn(t *testing.T) (p *trtest.Proc, c *trtest.Client) {
	t.Helper()
	p = trtest.Serve(t, "--sim-rate", "20", "--sim-tokens", "500", "--worker-concurrency", "1")
	c = trtest.Dial(t, p.WSURL(), nil)
	c.Join("busy", nil)
	c.Join("waiting", nil)
	c.Send(map[string]any{"type": "send", "conversation_id": "busy", "text": "long", "id": "1"})
	c.Until(wait, func(f trtest.Frame) bool { return f.Type() == "turn.delta" })
	c.Send(map[string]any{"type": "send", "conversation_id": "waiting", "text": "next", "turn_id": "queued-turn", "id": "2"})
	if f := c.Until(wait, func(f trtest.Frame) bool { return f.Str("id") == "2" }); f[len(f)-1].Type() != "ack" {
		t.Fatalf("send: %v", f[len(f)-1])
	}
	return p, c
}

// A turn still queued when serve stops (its one worker slot busy) ends as
// interrupted before the connection closes, as a running one does, instead
// of staying queued until the next start.
func TestSIGTERMEndsQueuedTurns(t *testing.T) {
	p, c := queuedTurn(t)
	if err := p.Stop(); err != nil {
		t.Fatalf("exit after SIGTERM: %v\n%s", err, p.Stderr())
	}
	var status string
	for {
		f, err := c.Next(wait)
		if err != nil {
			break
		}
		if f.Type() == "turn.end" && f.Str("turn_id") == "queued-turn" {
			status = f.Str("status")
		}
	}
	if status != "interrupted" {
		t.Fatalf("the queued turn's end before the close: %q, want interrupted\n%s", status, p.Stderr())
	}
	if code := c.CloseStatus(); code != 1001 {
		t.Fatalf("close code %d, want 1001", code)
	}
}

// migrate checks the flags it takes like every command: a bad log level
// stops it with the reason and status 1 before it touches the store.
func TestMigrateChecksItsFlags(t *testing.T) {
	db := "sqlite://" + t.TempDir() + "/m.db"
	out, err := exec.CommandContext(trtest.Ctx(t, 20*time.Second), trtest.Binary(t), "migrate", "--log-level", "bogus", "--store-url", db).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "--log-level") {
		t.Fatalf("migrate --log-level bogus: %v\n%s", err, out)
	}
	out, err = exec.CommandContext(trtest.Ctx(t, 20*time.Second), trtest.Binary(t), "migrate", "--store-url", db).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "migrations applied") {
		t.Fatalf("migrate: %v\n%s", err, out)
	}
}

// A serve whose bus is its own ends the unfinished turns in its store as
// its own when it starts and stops, but only when no other process uses
// the store: a second serve on the same --store-url leaves the first one's
// running answers alone, at its start and at its stop.
func TestServesSharingAStoreLeaveEachOthersTurns(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		t.Run(kind, func(t *testing.T) {
			dir := t.TempDir()
			url := "sqlite://" + filepath.Join(dir, "shared.db")
			if kind == "postgres" {
				url = pgtest.SchemaURL(t)
			}
			a := trtest.Serve(t, "--store-url", url)
			c := trtest.Dial(t, a.WSURL(), nil)
			c.Join("mine", nil)
			tr := startTurn(t, c, "mine", "[sim tokens=60 rate=40] a", 1)
			b := trtest.Serve(t, "--store-url", url)
			if err := b.Stop(); err != nil {
				t.Fatalf("stop the second serve: %v", err)
			}
			if n := strings.Count(b.Stderr(), "other tokenrelay processes use this store"); n != 2 {
				t.Errorf("the second serve said %d times that it left the turns alone, want 2 (start, stop):\n%s", n, b.Stderr())
			}
			finish(t, c, tr)
			if tr.Status != "complete" || tr.Seq != 60 {
				t.Fatalf("the first serve's turn ended %s at seq %d, want complete at 60", tr.Status, tr.Seq)
			}
			if m := storedTurn(t, a.URL, "mine", tr.ID); m.Status != "complete" || m.Content != tr.Text.String() {
				t.Fatalf("stored %s %q, want complete %q", m.Status, m.Content, tr.Text.String())
			}
		})
	}
}
