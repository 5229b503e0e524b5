package e2e_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// TestResumeAfter joins mid-turn without and with "after": the snapshot is
// the text so far, and "after" gets exactly what follows the client's seq.
func TestResumeAfter(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "200", "--sim-tokens", "400")
	a := trtest.Dial(t, p.WSURL(), nil)
	a.Join("resume", nil)
	tr := startTurn(t, a, "resume", "tell me", 50)
	// A fresh join gets the snapshot, then live deltas continue from it.
	b := trtest.Dial(t, p.WSURL(), nil)
	j := b.Join("resume", nil)
	active := j.Obj("active")
	if active.Str("turn_id") != tr.ID || active.Int("seq") < 50 || active["from"] != nil {
		t.Fatalf("joined.active = %v", active)
	}
	tb := &trtest.Turn{ID: tr.ID, Seq: active.Int("seq")}
	tb.Text.WriteString(active.Str("text"))
	// A join with after gets only what follows.
	c := trtest.Dial(t, p.WSURL(), nil)
	jc := c.Join("resume", map[string]any{"after": map[string]any{"turn_id": tr.ID, "seq": 10}})
	ac := jc.Obj("active")
	if ac.Int("from") != 11 || ac.Int("seq") < 50 {
		t.Fatalf("joined.active with after = %v", ac)
	}
	tc := &trtest.Turn{ID: tr.ID, Seq: ac.Int("seq")}
	prefix := tr.Text.String()
	// Client c had deltas 1..10; rebuild them from a's text via seq count is
	// not possible, so compare suffixes at the end.
	tc.Text.WriteString(ac.Str("text"))
	finish(t, a, tr)
	finish(t, b, tb)
	finish(t, c, tc)
	full := storedTurn(t, p.URL, "resume", tr.ID).Content
	if tr.Text.String() != full || tb.Text.String() != full {
		t.Fatalf("texts differ from stored")
	}
	if !strings.HasSuffix(full, tc.Text.String()) || !strings.HasPrefix(full, prefix) {
		t.Fatalf("resumed text is not the rest of the turn")
	}
	// The part c skipped is exactly deltas 1..10: a's first 10 frames.
	if len(full)-len(tc.Text.String()) <= 0 {
		t.Fatal("after=10 returned the whole text")
	}
}

// killMidTurn starts serve with args, kills it (SIGKILL) once a client has
// seen n deltas of a turn of conv, and restarts it on the same data dir. The
// turn must then be stored as interrupted with a text that extends what the
// client saw. It returns the restarted server, the client's turn and the
// stored message.
func killMidTurn(t *testing.T, conv, text string, n int64, args ...string) (*trtest.Proc, *trtest.Turn, message) {
	t.Helper()
	p := trtest.Serve(t, args...)
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join(conv, nil)
	tr := startTurn(t, c, conv, text, n)
	p.Kill()
	q := p.Restart(t)
	m := storedTurn(t, q.URL, conv, tr.ID)
	if m.Status != "interrupted" {
		t.Fatalf("after kill -9 the turn is %s, want interrupted", m.Status)
	}
	if !strings.HasPrefix(m.Content, tr.Text.String()) {
		t.Fatalf("saved text (%d bytes) does not extend the %d bytes the client saw", len(m.Content), tr.Text.Len())
	}
	return q, tr, m
}

// TestKill9MidTurn kills serve while a turn streams and restarts it on the
// same data dir: the turn is interrupted with its text saved, joins see no
// active turn, and a new turn works.
func TestKill9MidTurn(t *testing.T) {
	q, tr, m := killMidTurn(t, "killed", "speak", 30, "--sim-rate", "100", "--sim-tokens", "2000")
	if len(m.Content) == 0 {
		t.Fatal("nothing saved")
	}
	d := trtest.Dial(t, q.WSURL(), nil)
	j := d.Join("killed", map[string]any{"after": map[string]any{"turn_id": tr.ID, "seq": tr.Seq}})
	if j["active"] != nil {
		t.Fatalf("active turn after restart: %v", j["active"])
	}
	// The resuming client gets the rest of the interrupted turn and its end.
	tr2 := &trtest.Turn{ID: tr.ID, Seq: tr.Seq}
	tr2.Text.WriteString(tr.Text.String())
	finish(t, d, tr2)
	if tr2.Status != "interrupted" || tr2.Text.String() != m.Content {
		t.Fatalf("resumed to %s %q, stored %q", tr2.Status, tr2.Text.String(), m.Content)
	}
	next := runTurn(t, d, "killed", "again [sim tokens=20 rate=0]", nil)
	if next.Status != "complete" {
		t.Fatalf("new turn after restart ended %s", next.Status)
	}
}

// TestKill9KeepsEveryDeltaSeen kills serve while a turn streams as fast as
// the simulator can: deltas are then announced from the delta journal
// before the stream has stored them, so the client has seen some the
// stream lacks when the process dies. The restart stores them from the
// journal before ending the turn, and the saved text extends everything the
// client saw.
func TestKill9KeepsEveryDeltaSeen(t *testing.T) {
	q, _, _ := killMidTurn(t, "journal", "fast [sim tokens=1000000 rate=0]", 3000, "--log-level", "info")
	for _, l := range strings.Split(q.Stderr(), "\n") {
		if strings.Contains(l, "journaled deltas") {
			t.Log(l)
		}
	}
}

// TestSlowReaderDoesNotDelayOthers stops reading one socket while another
// reads the same conversation.
func TestSlowReaderDoesNotDelayOthers(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "2000", "--sim-tokens", "20000", "--delta-timestamps", "--limit-outbound-bytes", "65536")
	fast := trtest.Dial(t, p.WSURL(), nil)
	slow := trtest.Dial(t, p.WSURL(), nil)
	fast.Join("slow", nil)
	slow.Join("slow", nil)
	// slow stops reading: its frames pile up in the client's buffer and
	// then in the kernel and the server's queue.
	slowConn := slow.Conn
	_ = slowConn
	fast.Send(map[string]any{"type": "send", "conversation_id": "slow", "text": "a long one", "id": "s"})
	tr := &trtest.Turn{}
	var worst time.Duration
	fast.Until(60*time.Second, func(f trtest.Frame) bool {
		if f.Type() == "turn.start" {
			tr.ID = f.Str("turn_id")
		}
		if f.Type() == "turn.delta" {
			if ts := f.Int("ts"); ts > 0 {
				if d := time.Since(time.UnixMicro(ts)); d > worst {
					worst = d
				}
			}
		}
		tr.Apply(f)
		return tr.Ends > 0
	})
	if len(tr.Errors) > 0 || tr.Status != "complete" {
		t.Fatalf("fast reader: %s %v", tr.Status, tr.Errors)
	}
	t.Logf("fast reader's worst token-to-screen latency with a stalled peer: %v", worst)
	if worst > 2*time.Second {
		t.Fatalf("the fast reader was held up %v", worst)
	}
}

// TestStalledSocketIsDropped: a socket that stops reading is closed by the
// server (4008 when the close frame still fits, otherwise dropped once a
// write has been blocked for --write-timeout), and resumes losslessly.
func TestStalledSocketIsDropped(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "0", "--write-timeout", "1s")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("flood", nil)
	// A raw socket that joins and then does not read.
	ctx := trtest.Ctx(t, 2*time.Minute)
	ws, _, err := websocket.Dial(ctx, p.WSURL(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.CloseNow()
	ws.SetReadLimit(-1)
	if err := ws.Write(ctx, websocket.MessageText, []byte(`{"type":"join","conversation_id":"flood"}`)); err != nil {
		t.Fatal(err)
	}
	// Turns of 200k tokens, until the kernel's buffers are full and a
	// write blocks past --write-timeout (merged frames are large, so it
	// takes several megabytes of text).
	streamed := map[string]string{}
	deadline := time.Now().Add(90 * time.Second)
	for i := 0; trtest.Metric(t, p.URL, "tokenrelay_slow_consumer_closes_total", "") == 0; i++ {
		if time.Now().After(deadline) || i == 30 {
			t.Fatal("the stalled socket was never closed")
		}
		tr := runTurn(t, c, "flood", fmt.Sprintf("[sim tokens=200000 rate=0] flood %d", i), nil)
		streamed[tr.ID] = tr.Text.String()
	}
	// Read what the stalled socket was sent: valid, contiguous frames.
	turns := map[string]*trtest.Turn{}
	var last *trtest.Turn
	for {
		_, data, err := ws.Read(ctx)
		if err != nil {
			code := websocket.CloseStatus(err)
			if code != 4008 && code != -1 {
				t.Fatalf("stalled socket ended with %v, want 4008 or a dropped connection", err)
			}
			break
		}
		var f trtest.Frame
		if err := json.Unmarshal(data, &f); err != nil {
			t.Fatalf("invalid frame %q", data)
		}
		if f.Type() == "turn.start" {
			last = &trtest.Turn{ID: f.Str("turn_id")}
			turns[last.ID] = last
		}
		if tr := turns[f.Str("turn_id")]; tr != nil {
			tr.Apply(f)
			if len(tr.Errors) > 0 {
				t.Fatalf("stalled socket: %v", tr.Errors)
			}
		}
	}
	for id, tr := range turns {
		if tr.Ends > 0 && tr.Text.String() != streamed[id] {
			t.Fatalf("stalled socket's turn %s differs from the fast client's", id)
		}
	}
	if last == nil || last.Ends > 0 {
		return // dropped between turns: nothing to resume
	}
	// Resume where the stalled socket stopped.
	r := trtest.Dial(t, p.WSURL(), nil)
	r.Join("flood", map[string]any{"after": map[string]any{"turn_id": last.ID, "seq": last.Seq}, "history": 0})
	finish(t, r, last)
	if last.Text.String() != streamed[last.ID] || last.Status != "complete" {
		t.Fatalf("resumed text (%d bytes, %s) differs from streamed (%d bytes)", last.Text.Len(), last.Status, len(streamed[last.ID]))
	}
}

// TestSSEPastRetention replays a finished turn whose events the bus no
// longer keeps: from the start it comes from the store, whole; a resume
// from within it is refused, not ended with a gap.
func TestSSEPastRetention(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "0", "--sim-tokens", "40", "--retention", "1s")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("expired", nil)
	tr := startTurn(t, c, "expired", "keep me", 1)
	finish(t, c, tr)
	get := func(query string) (int, string) {
		t.Helper()
		resp, err := http.Get(p.URL + "/v1/turns/" + tr.ID + "/events" + query)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, string(body)
	}
	// Until the events expire a resume is served; then it is refused.
	deadline := time.Now().Add(30 * time.Second)
	poll := time.NewTicker(100 * time.Millisecond)
	defer poll.Stop()
	for {
		code, body := get("?after=5")
		if code == http.StatusNotFound && strings.Contains(body, `"not_found"`) && strings.Contains(body, "--retention") {
			break
		}
		if code != http.StatusOK || time.Now().After(deadline) {
			t.Fatalf("resume after 5 while the events expire: %d %s", code, body)
		}
		<-poll.C
	}
	code, body := get("")
	want := "event: delta\nid: " + strconv.FormatInt(tr.Seq, 10) + "\ndata: "
	if code != http.StatusOK || !strings.HasPrefix(body, want) {
		t.Fatalf("replay past retention: %d %q, want it to start %q", code, body, want)
	}
	var d struct{ Text string }
	line, rest, _ := strings.Cut(strings.TrimPrefix(body, want), "\n")
	if err := json.Unmarshal([]byte(line), &d); err != nil || d.Text != tr.Text.String() {
		t.Fatalf("replay text %q (%v), want the streamed %q", d.Text, err, tr.Text.String())
	}
	if wantEnd := fmt.Sprintf(`event: end`+"\n"+`data: {"seq":%d,"status":"complete"}`, tr.Seq); !strings.Contains(rest, wantEnd) {
		t.Fatalf("replay's end: %q, want %q", rest, wantEnd)
	}

	// Over WebSocket the same: a join that follows the turn from its
	// start gets it whole; one from within it gets the final message in
	// its history and the end with the turn's real last seq, never an end
	// at the client's own seq that would pass for the whole answer.
	for _, have := range []int64{0, 5} {
		w := trtest.Dial(t, p.WSURL(), nil)
		w.Send(map[string]any{"type": "join", "conversation_id": "expired", "after": map[string]any{"turn_id": tr.ID, "seq": have}, "id": "j"})
		got := &trtest.Turn{ID: tr.ID, Seq: have}
		var history []any
		var endSeq int64
		for _, f := range w.Until(wait, func(f trtest.Frame) bool { got.Apply(f); return got.Ends > 0 }) {
			switch f.Type() {
			case "joined":
				history, _ = f["messages"].([]any)
			case "turn.end":
				endSeq = f.Int("seq")
			}
		}
		if got.Status != "complete" || endSeq != tr.Seq {
			t.Fatalf("join after %d past retention: ended %s at seq %d, want complete at %d", have, got.Status, endSeq, tr.Seq)
		}
		if have == 0 && got.Text.String() != tr.Text.String() {
			t.Fatalf("join from the start past retention: %q, want %q", got.Text.String(), tr.Text.String())
		}
		if last, _ := history[len(history)-1].(map[string]any); last["content"] != tr.Text.String() {
			t.Fatalf("join after %d past retention: history ends with %v", have, last)
		}
	}
}

// TestStalledSSEReaderIsDropped: an SSE client that stops reading is
// dropped after --write-timeout, as a WebSocket one is (and counted as a
// slow consumer), and does not hold up a graceful shutdown.
func TestStalledSSEReaderIsDropped(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "0", "--write-timeout", "1s", "--shutdown-timeout", "5s")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("sse-stall", nil)
	stall := func(turn string) net.Conn {
		t.Helper()
		conn, err := net.Dial("tcp", strings.TrimPrefix(p.URL, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		// A small receive buffer, and then no reads past the headers.
		if tc, ok := conn.(*net.TCPConn); ok {
			_ = tc.SetReadBuffer(4096)
		}
		fmt.Fprintf(conn, "GET /v1/turns/%s/events HTTP/1.1\r\nHost: %s\r\n\r\n", turn, strings.TrimPrefix(p.URL, "http://"))
		status, err := bufio.NewReaderSize(conn, 16).ReadString('\n')
		if err != nil || !strings.Contains(status, " 200 ") {
			t.Fatalf("SSE request: %q %v", status, err)
		}
		return conn
	}
	// A long answer streaming as fast as it can, to a reader that stalls.
	tr := startTurn(t, c, "sse-stall", "[sim tokens=5000000 rate=0] flood", 1)
	stall(tr.ID)
	trtest.WaitMetric(t, p.URL, "tokenrelay_sse_streams", "", wait, func(v float64) bool { return v == 1 })
	trtest.WaitMetric(t, p.URL, "tokenrelay_sse_streams", "", time.Minute, func(v float64) bool { return v == 0 })
	if n := trtest.Metric(t, p.URL, "tokenrelay_slow_consumer_closes_total", ""); n != 1 {
		t.Errorf("slow consumer closes after a stalled SSE stream was dropped: %v, want 1", n)
	}
	// Stalled again; then the server stops, without waiting for it.
	stall(tr.ID)
	trtest.WaitMetric(t, p.URL, "tokenrelay_sse_streams", "", wait, func(v float64) bool { return v == 1 })
	if err := p.Stop(); err != nil {
		t.Fatalf("stop with a stalled SSE reader: %v\n%s", err, p.Stderr())
	}
	if log := p.Stderr(); strings.Contains(log, "at the shutdown timeout") {
		t.Fatalf("shutdown waited out its timeout for a stalled SSE reader:\n%s", log)
	}
}

// TestSSE streams a turn as Server-Sent Events, live and as a replay, and
// resumes with Last-Event-ID.
func TestSSE(t *testing.T) {
	p := trtest.Serve(t, "--sim-rate", "300", "--sim-tokens", "150")
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join("sse", nil)
	tr := startTurn(t, c, "sse", "stream me", 1)
	read := func(header http.Header, query string) (string, int64, string) {
		req, _ := http.NewRequest("GET", p.URL+"/v1/turns/"+tr.ID+"/events"+query, nil)
		for k, v := range header {
			req.Header[k] = v
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
			t.Fatalf("content type %q", ct)
		}
		var text strings.Builder
		var last int64
		var event, status string
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			line := sc.Text()
			switch {
			case strings.HasPrefix(line, "event: "):
				event = strings.TrimPrefix(line, "event: ")
			case strings.HasPrefix(line, "id: "):
				fmt.Sscan(strings.TrimPrefix(line, "id: "), &last)
			case strings.HasPrefix(line, "data: "):
				var d struct {
					Text   string `json:"text"`
					Status string `json:"status"`
					Seq    int64  `json:"seq"`
				}
				json.Unmarshal([]byte(strings.TrimPrefix(line, "data: ")), &d)
				if event == "delta" {
					text.WriteString(d.Text)
				} else if event == "end" {
					status = d.Status
					if d.Seq != last {
						t.Fatalf("end seq %d, last delta id %d", d.Seq, last)
					}
					return text.String(), last, status
				}
			}
		}
		t.Fatalf("stream ended without an end event")
		return "", 0, ""
	}
	live, seq, status := read(nil, "")
	finish(t, c, tr)
	if live != tr.Text.String() || seq != tr.Seq || status != "complete" {
		t.Fatalf("live SSE %q seq %d %s; WS %q seq %d", live, seq, status, tr.Text.String(), tr.Seq)
	}
	replay, _, _ := read(nil, "")
	if replay != live {
		t.Fatalf("replay differs")
	}
	tail, _, _ := read(http.Header{"Last-Event-Id": {"100"}}, "")
	tail2, _, _ := read(nil, "?after=100")
	if tail != tail2 || !strings.HasSuffix(live, tail) || len(tail) >= len(live) || tail == "" {
		t.Fatalf("resume after 100: %q / %q", tail, tail2)
	}
	// An EventSource opened with ?after= reconnects to the same URL with
	// Last-Event-ID set to the last delta it saw: that one is where it is.
	tail3, _, _ := read(http.Header{"Last-Event-Id": {"100"}}, "?after=3")
	tail4, _, _ := read(http.Header{"Last-Event-Id": {"3"}}, "?after=100")
	if tail3 != tail || tail4 != tail {
		t.Fatalf("resume with Last-Event-ID 100 and after=3: %q; with 3 and 100: %q; want %q", tail3, tail4, tail)
	}
	if code := trtest.Get(t, p.URL+"/v1/turns/"+tr.ID+"/events?after=x", nil); code != 400 {
		t.Fatalf("bad after: %d", code)
	}
	// A cursor past every seq, however far, gets the end alone, on SSE
	// and on a WebSocket join; past 2^53-1 it is read as that.
	resp, err := http.Get(p.URL + "/v1/turns/" + tr.ID + "/events?after=9223372036854775807")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || strings.Contains(string(body), "event: delta") || !strings.Contains(string(body), `"seq":9007199254740991,`) {
		t.Fatalf("SSE after the largest int64: %v\n%s", err, body)
	}
	c2 := trtest.Dial(t, p.WSURL(), nil)
	j := c2.Join("sse", map[string]any{"after": map[string]any{"turn_id": tr.ID, "seq": int64(math.MaxInt64)}})
	if from, ok := j.Obj("active")["from"].(float64); ok && from < 0 {
		t.Fatalf("joined after the largest int64: %v", j)
	}
	for _, f := range c2.Until(wait, func(f trtest.Frame) bool { return f.Type() == "turn.end" }) {
		if f.Type() == "turn.delta" || f.Type() == "turn.end" && f.Int("seq") != 1<<53-1 {
			t.Fatalf("after the largest int64: %v", f)
		}
	}
}

// TestChaos runs random turns while clients disconnect at random points and
// resume, with and without "after", and one slow reader: every client ends
// with the stored text of every turn it followed, with contiguous seqs and
// one end per turn per connection.
func TestChaos(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos test skipped in -short mode")
	}
	p := trtest.Serve(t, "--sim-rate", "3000", "--limit-sends", "0", "--limit-connections", "0", "--limit-turns", "0")
	const (
		convs       = 4
		tabsPerConv = 4
		turnsEach   = 5
		minDrops    = 1000
	)
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
	t.Logf("turn lengths drawn from 1..5000 tokens")
	var drops atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 1000)
	type result struct {
		conv  string
		turns map[string]string   // turn → final text as the client assembled it
		trail map[string][]string // turn → how its frames came, to explain a mismatch
	}
	results := make(chan result, convs*tabsPerConv)
	stop := make(chan struct{})
	for ci := range convs {
		conv := fmt.Sprintf("chaos-%d", ci)
		// One producer per conversation: sends turns one after another.
		lengths := make([]int, turnsEach)
		for i := range lengths {
			lengths[i] = 1 + rng.IntN(5000)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := trtest.TryDial(t, p.WSURL(), nil)
			if err != nil {
				errs <- err
				return
			}
			c.Send(map[string]any{"type": "join", "conversation_id": conv, "history": 0})
			for i, n := range lengths {
				c.Send(map[string]any{"type": "send", "conversation_id": conv, "text": fmt.Sprintf("[sim tokens=%d] turn %d", n, i), "id": "s"})
				for {
					f, err := c.Next(60 * time.Second)
					if err != nil {
						errs <- fmt.Errorf("%s producer: %v", conv, err)
						return
					}
					if f.Type() == "error" {
						errs <- fmt.Errorf("%s producer: %v", conv, f)
						return
					}
					if f.Type() == "turn.end" {
						break
					}
				}
			}
		}()
		for tab := range tabsPerConv {
			seed := rng.Uint64()
			slow := ci == 0 && tab == 0
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := rand.New(rand.NewPCG(seed, 1))
				st := chaosClient{Tab: trtest.NewTab(conv), slow: slow}
				err := st.run(t, p.WSURL(), r, &drops, stop)
				if err != nil {
					errs <- fmt.Errorf("%s tab %d: %w", conv, tab, err)
				}
				final := map[string]string{}
				for id, tr := range st.Turns {
					if tr.Ends == 1 {
						final[id] = tr.Text.String()
					}
				}
				results <- result{conv, final, st.Trail}
			}()
		}
	}
	// Tabs keep dropping until the producers are done and enough drops happened.
	go func() {
		deadline := time.Now().Add(5 * time.Minute)
		for time.Now().Before(deadline) {
			if drops.Load() >= minDrops && allEnded(t, p.URL, convs, turnsEach) {
				break
			}
			time.Sleep(50 * time.Millisecond) // polling the store, not synchronising
		}
		close(stop)
	}()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.Logf("server log (warnings and errors):\n%s", p.Stderr())
		return
	}
	close(results)
	checked := 0
	for r := range results {
		stored := map[string]string{}
		for _, m := range messages(t, p.URL, r.conv, "?limit=500") {
			if m.Role == "assistant" {
				stored[m.MessageID] = m.Content
			}
		}
		if len(r.turns) != turnsEach {
			t.Errorf("%s: a client finished %d turns, want %d", r.conv, len(r.turns), turnsEach)
		}
		for id, text := range r.turns {
			if stored[id] != text {
				t.Errorf("%s turn %s: client text (%d bytes) differs from stored (%d bytes); its frames: %v", r.conv, id, len(text), len(stored[id]), r.trail[id])
			}
			checked++
		}
	}
	t.Logf("%d disconnects, %d (client, turn) texts checked", drops.Load(), checked)
	if t.Failed() {
		t.Logf("server log (warnings and errors):\n%s", p.Stderr())
	}
	if drops.Load() < minDrops {
		t.Fatalf("only %d disconnects", drops.Load())
	}
}

func allEnded(t *testing.T, base string, convs, turns int) bool {
	for ci := range convs {
		n := 0
		for _, m := range messages(t, base, fmt.Sprintf("chaos-%d", ci), "?limit=500") {
			if m.Role == "assistant" && m.Status != "queued" && m.Status != "streaming" {
				n++
			}
		}
		if n < turns {
			return false
		}
	}
	return true
}

// chaosClient is one tab that keeps reconnecting.
type chaosClient struct {
	*trtest.Tab
	slow bool
}

func (c *chaosClient) run(t *testing.T, url string, r *rand.Rand, drops *atomic.Int64, stop <-chan struct{}) error {
	for {
		select {
		case <-stop:
			return c.settle(t, url)
		default:
		}
		cl, err := trtest.TryDial(t, url, nil)
		if err != nil {
			return err
		}
		useAfter := r.IntN(3) > 0
		if err := c.Join(cl, useAfter); err != nil {
			return err
		}
		budget := 1 + r.IntN(40)
		for i := 0; i < budget; i++ {
			f, err := cl.Next(200 * time.Millisecond)
			if err != nil {
				break // idle conversation: drop anyway
			}
			if err := c.Apply(f); err != nil {
				return err
			}
			if c.slow && i%4 == 0 {
				time.Sleep(time.Millisecond) // the slow reader's behaviour
			}
		}
		_ = cl.Conn.CloseNow()
		drops.Add(1)
	}
}

// settle makes a last connection and reads until every turn it knows of
// has ended.
func (c *chaosClient) settle(t *testing.T, url string) error {
	cl, err := trtest.TryDial(t, url, nil)
	if err != nil {
		return err
	}
	defer cl.Conn.CloseNow()
	if err := c.Join(cl, true); err != nil {
		return err
	}
	for c.Active != "" {
		f, err := cl.Next(30 * time.Second)
		if err != nil {
			return fmt.Errorf("settling: %v", err)
		}
		if err := c.Apply(f); err != nil {
			return err
		}
	}
	return nil
}
