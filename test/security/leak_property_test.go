package security_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// TestNoCrossUserLeaks is a randomized property test of ownership: a few
// users, each with native sockets, a compat socket and SSE streams, work at
// random on a small shared set of conversation ids — join (also with after
// naming anyone's turn), leave, send, cancel, read, delete, compat history,
// cancel, chat and sockets — so ids are taken, deleted and taken over by
// other users while turns stream. Every id and every word of text a user
// makes carries its name, so the test can check, over every frame, SSE
// event and HTTP body each user receives, that no other user's name ever
// appears; and, following ownership from the server's answers, that every
// operation on another user's conversation or turn is refused with its
// documented code, that no turn is cancelled but by its owner, and that a
// user's conversation list names only conversations it owns.
//
// With TOKENRELAY_LEAK_CHAOS set, each user also works at once, unchecked
// but for what it receives, on ids of its own set, so that the server
// handles several users' requests at the same time (which makes a run
// depend on timing as well as on its seed).
//
// Three fixed seeds run by default; TOKENRELAY_LEAK_SEEDS (comma separated,
// or "random") and TOKENRELAY_LEAK_OPS run others, and TOKENRELAY_LEAK_ARGS
// gives the server more flags. The operations depend on
// the seed alone; what the server answers may also depend on timing (a send
// while a turn runs), which the model accepts either way.
func TestNoCrossUserLeaks(t *testing.T) {
	t.Parallel()
	seeds := []int64{1, 2, 3}
	if s := os.Getenv("TOKENRELAY_LEAK_SEEDS"); s != "" {
		seeds = nil
		for _, f := range strings.Split(s, ",") {
			if f == "random" {
				seeds = append(seeds, time.Now().UnixNano())
				continue
			}
			n, err := strconv.ParseInt(f, 10, 64)
			if err != nil {
				t.Fatalf("TOKENRELAY_LEAK_SEEDS: %v", err)
			}
			seeds = append(seeds, n)
		}
	}
	ops := 500
	if s := os.Getenv("TOKENRELAY_LEAK_OPS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil {
			t.Fatalf("TOKENRELAY_LEAK_OPS: %v", err)
		}
		ops = n
	}
	args := []string{"--limit-sends", "0", "--limit-new-conversations", "0", "--limit-connections", "0",
		"--limit-turns", "0", "--sim-rate", "100"}
	// More flags for the server, e.g. "--retention 1s".
	args = append(args, strings.Fields(os.Getenv("TOKENRELAY_LEAK_ARGS"))...)
	p := serveJWT(t, args...)
	for _, seed := range seeds {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			runLeakSeed(t, p, seed, ops)
		})
	}
}

// leakRun is one seed's run: the users, the model of who owns what, and
// everything each user received.
type leakRun struct {
	t     *testing.T
	p     *trtest.Proc
	seed  int64
	ops   *rand.Rand // one number for each operation: the seed of its rng
	rng   *rand.Rand
	users []*leakUser
	convs []string

	owner map[string]*leakUser // conversation → owner, nil when nobody has it
	turns map[string]*leakTurn
	order []string // turn ids in the order they were asked for (so that the
	// operations depend on the seed alone), accepted or not
	asked map[string]*leakTurn // those turns as asked for

	op    int
	trace []string

	mu       sync.Mutex
	received []leakPayload // every frame and body, with who got it
	// named are the ids of others the current operation names, which the
	// answer to it (an error, an ack, an HTTP body) may quote; request is
	// the id of its WebSocket frame.
	named   []string
	request string
	sse     sync.WaitGroup
}

type leakUser struct {
	name, token string
	ws          [2]*leakConn
	compat      *leakConn
	n           int
}

type leakTurn struct {
	id, msg, conv string
	user          *leakUser
	deleted       bool // its conversation was deleted
	mayCancel     bool // its owner cancelled it, or deleted its conversation
}

type leakPayload struct {
	user  *leakUser
	named []string // ids it may quote (see leakRun.named)
	where string
	op    int
	data  []byte
	frame trtest.Frame // a WebSocket frame, nil for HTTP and SSE
}

// leakConn is a WebSocket whose frames are read as they come and kept, so
// that the server never finds it slow.
type leakConn struct {
	r      *leakRun
	u      *leakUser
	c      *trtest.Client
	where  string
	mu     sync.Mutex
	frames []trtest.Frame
	more   chan struct{}
	closed bool
}

func runLeakSeed(t *testing.T, p *trtest.Proc, seed int64, ops int) {
	r := &leakRun{t: t, p: p, seed: seed, ops: rand.New(rand.NewSource(seed)),
		owner: map[string]*leakUser{}, turns: map[string]*leakTurn{}, asked: map[string]*leakTurn{}}
	t.Logf("seed %d, %d operations (rerun with TOKENRELAY_LEAK_SEEDS=%d TOKENRELAY_LEAK_OPS=%d)", seed, ops, seed, ops)
	defer func() {
		if t.Failed() {
			t.Logf("seed %d: the last operations:\n%s", seed, strings.Join(r.trace[max(0, len(r.trace)-40):], "\n"))
		}
	}()
	// Conversation ids are shared by all users and fresh for each seed.
	for i := range 5 {
		r.convs = append(r.convs, fmt.Sprintf("s%d-c%d", seed, i))
	}
	for i := range 4 {
		name := fmt.Sprintf("usr%d", i)
		u := &leakUser{name: name, token: tokenFor(t, name)}
		r.users = append(r.users, u)
	}
	stop := make(chan struct{})
	var chaos sync.WaitGroup
	if os.Getenv("TOKENRELAY_LEAK_CHAOS") != "" {
		for i, u := range r.users {
			chaos.Add(1)
			go func() {
				defer chaos.Done()
				r.chaos(u, rand.New(rand.NewSource(seed*31+int64(i))), stop)
			}()
		}
	}
	for i := 0; i < ops && !t.Failed(); i++ {
		r.setOp(i)
		r.step()
	}
	close(stop)
	chaos.Wait()
	r.finish()
}

// mark is what a user's ids and text are made of: its name.
func (r *leakRun) next(u *leakUser, kind string) string {
	u.n++
	return fmt.Sprintf("%s.%d.%s%d", u.name, r.seed, kind, u.n)
}

func (r *leakRun) logf(format string, args ...any) {
	r.trace = append(r.trace, fmt.Sprintf("op %d: ", r.op)+fmt.Sprintf(format, args...))
}

func (r *leakRun) errorf(format string, args ...any) {
	r.t.Helper()
	r.t.Errorf("seed %d op %d: %s", r.seed, r.op, fmt.Sprintf(format, args...))
}

func (r *leakRun) record(u *leakUser, where string, data []byte, f trtest.Frame) {
	r.mu.Lock()
	defer r.mu.Unlock()
	pl := leakPayload{user: u, where: where, op: r.op, data: data, frame: f}
	if f == nil || (f.Type() == "error" || f.Type() == "ack") && f.Str("id") == r.request {
		pl.named = r.named
	}
	r.received = append(r.received, pl)
}

// setOp starts operation i.
func (r *leakRun) setOp(i int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.op = i
}

// name notes that the current operation names id.
func (r *leakRun) name(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.named = append(r.named, id)
}

// native returns u's i-th native socket, dialled again if it was closed.
func (r *leakRun) native(u *leakUser, i int) *leakConn {
	if c := u.ws[i]; c != nil && !c.isClosed() {
		return c
	}
	u.ws[i] = r.dial(u, fmt.Sprintf("%s ws%d", u.name, i), r.p.WSURL(), &trtest.DialOptions{Token: u.token})
	return u.ws[i]
}

func (r *leakRun) dial(u *leakUser, where, wsURL string, opts *trtest.DialOptions) *leakConn {
	c := &leakConn{r: r, u: u, c: trtest.Dial(r.t, wsURL, opts), where: where, more: make(chan struct{}, 1)}
	go c.pump()
	return c
}

func (c *leakConn) pump() {
	for {
		f, err := c.c.Next(time.Hour)
		if f != nil {
			// Recorded before the driver can see it, so while the request
			// it may answer is still the current one.
			b, _ := json.Marshal(f)
			c.r.record(c.u, c.where, b, f)
		}
		c.mu.Lock()
		if err != nil {
			c.closed = true
		} else {
			c.frames = append(c.frames, f)
		}
		c.mu.Unlock()
		select {
		case c.more <- struct{}{}:
		default:
		}
		if err != nil {
			return
		}
	}
}

func (c *leakConn) isClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

// mark is where the next frame will be.
func (c *leakConn) mark() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.frames)
}

// await returns the first frame from index from on that matches, or nil
// when the socket closes first; it fails the test after wait.
func (c *leakConn) await(from int, match func(trtest.Frame) bool) trtest.Frame {
	c.r.t.Helper()
	deadline := time.After(wait)
	for {
		c.mu.Lock()
		for ; from < len(c.frames); from++ {
			if match(c.frames[from]) {
				f := c.frames[from]
				c.mu.Unlock()
				return f
			}
		}
		closed := c.closed
		c.mu.Unlock()
		if closed {
			return nil
		}
		select {
		case <-c.more:
		case <-deadline:
			c.r.t.Fatalf("seed %d op %d: %s: no answer within %v", c.r.seed, c.r.op, c.where, wait)
		}
	}
}

// request sends frame with a fresh id on c and returns the answer to it.
func (c *leakConn) request(frame map[string]any) trtest.Frame {
	c.r.t.Helper()
	id := fmt.Sprintf("r%d", c.r.op)
	frame["id"] = id
	c.r.mu.Lock()
	c.r.request = id
	c.r.mu.Unlock()
	from := c.mark()
	if err := c.c.TrySend(frame); err != nil {
		return nil
	}
	return c.await(from, func(f trtest.Frame) bool {
		return f.Str("id") == id && (f.Type() == "ack" || f.Type() == "error" || f.Type() == "joined" || f.Type() == "pong")
	})
}

// httpDo performs an HTTP request as u, records its body and returns the
// status and the body.
func (r *leakRun) httpDo(u *leakUser, method, path, body string) (int, []byte) {
	r.t.Helper()
	code, _, b := do(r.t, method, r.p.URL+path, u.token, body, nil)
	r.record(u, method+" "+path, b, nil)
	return code, b
}

// wantCode checks an HTTP answer against the model: status want (one of
// them), and for a native 403/404 the matching error code.
func (r *leakRun) wantCode(what string, code int, body []byte, want ...int) bool {
	r.t.Helper()
	for _, w := range want {
		if code == w {
			return true
		}
	}
	r.errorf("%s: %d %s, want %v", what, code, body, want)
	return false
}

func (r *leakRun) wantWS(what string, f trtest.Frame, types ...string) bool {
	r.t.Helper()
	if f == nil {
		r.logf("%s: the socket closed", what)
		return false
	}
	got := f.Type()
	if got == "error" {
		got = "error " + f.Str("code")
	}
	for _, w := range types {
		if got == w {
			return true
		}
	}
	r.errorf("%s: %v, want %v", what, f, types)
	return false
}

// pickTurn picks a known turn of anyone, or an unknown id.
func (r *leakRun) pickTurn(u *leakUser) (string, *leakTurn) {
	if len(r.order) == 0 || r.rng.Intn(10) == 0 {
		return r.next(u, "nosuch"), nil
	}
	// Recent turns are likelier to be running.
	i := len(r.order) - 1 - r.rng.Intn(min(len(r.order), 12))
	if r.rng.Intn(4) == 0 {
		i = r.rng.Intn(len(r.order))
	}
	id := r.order[i]
	r.name(id)
	if tr := r.turns[id]; tr != nil {
		return id, tr
	}
	return id, nil
}

// prompt is a reply of n tokens of u's name, at rate tokens a second.
func (r *leakRun) prompt(u *leakUser, rngs ...*rand.Rand) string {
	rng := r.rng
	if len(rngs) > 0 {
		rng = rngs[0]
	}
	n := 1 + rng.Intn(60)
	rate := []int{0, 20, 100, 400}[rng.Intn(4)]
	return fmt.Sprintf("[sim echo=1 rate=%d] %s", rate, strings.Repeat(u.name, n))
}

func (r *leakRun) ownerName(conv string) string {
	if o := r.owner[conv]; o != nil {
		return o.name
	}
	return "nobody"
}

// deleted records that u deleted conv.
func (r *leakRun) deleted(u *leakUser, conv string) {
	r.owner[conv] = nil
	for _, tr := range r.turns {
		if tr.conv == conv && tr.user == u && !tr.deleted {
			tr.deleted, tr.mayCancel = true, true
		}
	}
}

func (r *leakRun) addTurn(u *leakUser, conv, msg, id string) {
	if tr := r.turns[id]; tr != nil {
		if tr.user != u || tr.conv != conv || tr.msg != msg {
			r.errorf("%s's send of %s in %s was answered with turn %s of %s in %s", u.name, msg, conv, id, tr.user.name, tr.conv)
		}
		return
	}
	r.turns[id] = &leakTurn{id: id, msg: msg, conv: conv, user: u}
}

// cancelWant is what a cancel of turn (nil: unknown) by u must answer:
// "ok", "forbidden" or "not_found".
func cancelWant(u *leakUser, tr *leakTurn) string {
	switch {
	case tr == nil || tr.deleted:
		return "not_found"
	case tr.user != u:
		return "forbidden"
	}
	return "ok"
}

func (r *leakRun) step() {
	// Each operation draws from its own rng, so that how many numbers one
	// draws (which may depend on timing) does not change the next.
	r.rng = rand.New(rand.NewSource(r.ops.Int63()))
	r.mu.Lock()
	r.named, r.request = nil, ""
	r.mu.Unlock()
	u := r.users[r.rng.Intn(len(r.users))]
	conv := r.convs[r.rng.Intn(len(r.convs))]
	if r.rng.Intn(2) == 0 {
		// Half the time one of u's own or a free one, so that turns run.
		var open []string
		for _, c := range r.convs {
			if o := r.owner[c]; o == nil || o == u {
				open = append(open, c)
			}
		}
		if len(open) > 0 {
			conv = open[r.rng.Intn(len(open))]
		}
	}
	o := r.owner[conv]
	mine, free := o == u, o == nil
	switch k := r.rng.Intn(112); {
	case k < 14: // join, sometimes resuming anyone's turn
		c := r.native(u, r.rng.Intn(2))
		frame := map[string]any{"type": "join", "conversation_id": conv, "history": r.rng.Intn(5)}
		if r.rng.Intn(2) == 0 {
			tid, _ := r.pickTurn(u)
			frame["after"] = map[string]any{"turn_id": tid, "seq": r.rng.Intn(4)}
		}
		r.logf("%s %s join %s (of %s) %v", c.where, u.name, conv, r.ownerName(conv), frame["after"])
		f := c.request(frame)
		if mine || free {
			if r.wantWS("join", f, "joined") {
				r.owner[conv] = u
			}
		} else {
			r.wantWS("join of another's", f, "error forbidden")
		}
	case k < 18:
		c := r.native(u, r.rng.Intn(2))
		r.logf("%s leave %s", c.where, conv)
		r.wantWS("leave", c.request(map[string]any{"type": "leave", "conversation_id": conv}), "ack")
	case k < 34: // send, or retry a message
		c := r.native(u, r.rng.Intn(2))
		msg, tid := r.next(u, "m"), r.next(u, "t")
		var retry *leakTurn
		if r.rng.Intn(6) == 0 {
			// The newest of u's sends in conv, whether it was taken or
			// not (so that what happens next depends on the seed alone).
			for _, id := range r.order {
				if a := r.asked[id]; a.user == u && a.conv == conv {
					retry = a
				}
			}
			if retry != nil {
				msg, tid = retry.msg, retry.id
			}
		}
		if retry == nil {
			r.order = append(r.order, tid)
			r.asked[tid] = &leakTurn{id: tid, msg: msg, conv: conv, user: u}
		}
		frame := map[string]any{"type": "send", "conversation_id": conv, "text": r.prompt(u), "message_id": msg, "turn_id": tid}
		r.logf("%s send %s/%s in %s (of %s)", c.where, msg, tid, conv, r.ownerName(conv))
		f := c.request(frame)
		switch {
		case mine || free:
			want := []string{"ack", "error turn_active"}
			if retry != nil {
				// A retry of a turn deleted with its conversation: the
				// turn id stays taken.
				want = append(want, "error bad_request")
			}
			if r.wantWS("send", f, want...) && f.Type() == "ack" {
				r.owner[conv] = u
				r.addTurn(u, conv, f.Str("message_id"), f.Str("turn_id"))
				if retry != nil && f.Str("turn_id") != retry.id {
					r.errorf("retry of %s answered turn %s, want %s", msg, f.Str("turn_id"), retry.id)
				}
			}
		default:
			r.wantWS("send in another's", f, "error forbidden")
		}
	case k < 38: // send naming another user's turn id in one's own conversation
		if !mine || len(r.order) == 0 {
			return
		}
		tr := r.turns[r.order[r.rng.Intn(len(r.order))]]
		if tr == nil || tr.user == u {
			return
		}
		r.name(tr.id)
		c := r.native(u, r.rng.Intn(2))
		r.logf("%s send in %s with %s's turn id %s", c.where, conv, tr.user.name, tr.id)
		f := c.request(map[string]any{"type": "send", "conversation_id": conv, "text": r.prompt(u), "message_id": r.next(u, "m"), "turn_id": tr.id})
		r.wantWS("send with another's turn id", f, "error bad_request", "error turn_active")
	case k < 48: // cancel over WebSocket
		c := r.native(u, r.rng.Intn(2))
		tid, tr := r.pickTurn(u)
		want := cancelWant(u, tr)
		r.logf("%s cancel %s (want %s)", c.where, tid, want)
		f := c.request(map[string]any{"type": "cancel", "turn_id": tid})
		if want == "ok" {
			tr.mayCancel = true
			if r.wantWS("cancel", f, "ack") && f.Str("turn_id") != tid {
				r.errorf("cancel of %s acked %v", tid, f)
			}
		} else {
			r.wantWS("cancel", f, "error "+want)
		}
	case k < 54: // cancel over HTTP
		tid, tr := r.pickTurn(u)
		want := cancelWant(u, tr)
		r.logf("%s POST cancel %s (want %s)", u.name, tid, want)
		if want == "ok" {
			tr.mayCancel = true
		}
		code, b := r.httpDo(u, "POST", "/v1/turns/"+tid+"/cancel", "")
		r.wantCode("HTTP cancel", code, b, map[string]int{"ok": 200, "forbidden": 403, "not_found": 404}[want])
	case k < 60:
		r.logf("%s GET messages %s (of %s)", u.name, conv, r.ownerName(conv))
		code, b := r.httpDo(u, "GET", "/v1/conversations/"+conv+"/messages?limit=100", "")
		switch {
		case mine:
			r.wantCode("GET own messages", code, b, 200)
		case free:
			r.wantCode("GET messages of nobody's", code, b, 404)
		default:
			r.wantCode("GET another's messages", code, b, 403)
		}
	case k < 64:
		r.logf("%s GET conversations", u.name)
		code, b := r.httpDo(u, "GET", "/v1/conversations", "")
		var list struct {
			Conversations []struct {
				ID string `json:"conversation_id"`
			} `json:"conversations"`
		}
		_ = json.Unmarshal(b, &list)
		for _, cv := range list.Conversations {
			if strings.HasPrefix(cv.ID, fmt.Sprintf("s%d-", r.seed)) && r.owner[cv.ID] != u {
				r.errorf("%s's list names %s, which is %s's", u.name, cv.ID, r.ownerName(cv.ID))
			}
		}
		r.wantCode("GET conversations", code, b, 200)
	case k < 70:
		r.logf("%s DELETE %s (of %s)", u.name, conv, r.ownerName(conv))
		code, b := r.httpDo(u, "DELETE", "/v1/conversations/"+conv, "")
		switch {
		case mine:
			if r.wantCode("DELETE own", code, b, 204) {
				r.deleted(u, conv)
			}
		case free:
			r.wantCode("DELETE nobody's", code, b, 404)
		default:
			r.wantCode("DELETE another's", code, b, 403)
		}
	case k < 75: // POST a message
		msg, tid := r.next(u, "m"), r.next(u, "t")
		r.order = append(r.order, tid)
		r.asked[tid] = &leakTurn{id: tid, msg: msg, conv: conv, user: u}
		body, _ := json.Marshal(map[string]any{"text": r.prompt(u), "message_id": msg, "turn_id": tid})
		r.logf("%s POST message %s/%s in %s (of %s)", u.name, msg, tid, conv, r.ownerName(conv))
		code, b := r.httpDo(u, "POST", "/v1/conversations/"+conv+"/messages", string(body))
		if mine || free {
			if r.wantCode("POST message", code, b, 202, 409) && code == 202 {
				r.owner[conv] = u
				r.addTurn(u, conv, msg, tid)
			}
		} else {
			r.wantCode("POST in another's", code, b, 403)
		}
	case k < 82: // SSE of anyone's turn
		tid, tr := r.pickTurn(u)
		want := cancelWant(u, tr)
		path := "/v1/turns/" + tid + "/events"
		if r.rng.Intn(3) == 0 {
			path += "?after=" + strconv.Itoa(r.rng.Intn(5))
		}
		r.logf("%s SSE %s (want %s)", u.name, path, want)
		r.openSSE(u, path, map[string]int{"ok": 200, "forbidden": 403, "not_found": 404}[want], "")
	case k < 87: // a compat socket
		claim := u
		if r.rng.Intn(8) == 0 {
			claim = r.users[r.rng.Intn(len(r.users))]
		}
		if u.compat != nil {
			_ = u.compat.c.Conn.CloseNow()
		}
		q := url.Values{"session_id": {conv}, "user_id": {claim.name}, "token": {u.token}}
		wsURL := strings.Replace(r.p.WSURL(), "/v1/ws", "/ws/chat", 1) + "?" + q.Encode()
		r.logf("%s compat socket on %s (of %s) as %s", u.name, conv, r.ownerName(conv), claim.name)
		c := r.dial(u, u.name+" compat "+conv, wsURL, nil)
		u.compat = c
		f := c.await(0, func(trtest.Frame) bool { return true })
		switch {
		case claim != u || !mine && !free:
			if f == nil || f.Type() != "error" || f.Str("error") != "Authentication failed" {
				r.errorf("compat socket of %s on %s (of %s) as %s: %v, want Authentication failed", u.name, conv, r.ownerName(conv), claim.name, f)
			} else if c.await(1, func(trtest.Frame) bool { return false }); c.c.CloseStatus() != 1003 {
				r.errorf("compat socket refused with close %d, want 1003", c.c.CloseStatus())
			}
		case f == nil || f.Type() != "welcome":
			r.errorf("compat socket of %s on %s (of %s): %v, want welcome", u.name, conv, r.ownerName(conv), f)
		default:
			r.owner[conv] = u
		}
	case k < 91:
		r.logf("%s compat GET history %s (of %s)", u.name, conv, r.ownerName(conv))
		code, b := r.httpDo(u, "GET", "/api/history/"+conv, "")
		if mine || free {
			r.wantCode("compat history", code, b, 200)
		} else {
			r.wantCode("compat history of another's", code, b, 403)
		}
	case k < 94:
		r.logf("%s compat DELETE history %s (of %s)", u.name, conv, r.ownerName(conv))
		code, b := r.httpDo(u, "DELETE", "/api/history/"+conv, "")
		if mine || free {
			if r.wantCode("compat clear", code, b, 200) && mine {
				r.deleted(u, conv)
			}
		} else {
			r.wantCode("compat clear of another's", code, b, 403)
		}
	case k < 97:
		tid, tr := r.pickTurn(u)
		if coin := r.rng.Intn(2); tr != nil && coin == 0 {
			tid = tr.msg // the user message a reply answers
			r.name(tid)
		}
		body, _ := json.Marshal(map[string]string{"session_id": conv, "message_id": tid})
		r.logf("%s compat cancel %s in %s (of %s)", u.name, tid, conv, r.ownerName(conv))
		if mine && tr != nil && tr.user == u {
			tr.mayCancel = true
		}
		code, b := r.httpDo(u, "POST", "/api/cancel", string(body))
		if mine || free {
			r.wantCode("compat cancel", code, b, 200)
		} else {
			r.wantCode("compat cancel in another's", code, b, 403)
		}
	case k < 102: // compat reconnect naming anyone's turn
		c := u.compat
		if c == nil || c.isClosed() {
			return
		}
		tid, tr := r.pickTurn(u)
		if coin := r.rng.Intn(2); tr != nil && coin == 0 {
			tid = tr.msg
			r.name(tid)
		}
		r.logf("%s reconnect %s", c.where, tid)
		from := c.mark()
		if c.c.TrySend(map[string]any{"type": "reconnect", "messageId": tid, "lastChunkIndex": r.rng.Intn(3)}) != nil {
			return
		}
		f := c.await(from, func(f trtest.Frame) bool { return f.Type() == "recovery_status" })
		if f != nil && (tr == nil || tr.user != u) && f.Str("status") != "not_found" {
			r.errorf("%s reconnect naming %s's %s: %v, want not_found", c.where, tr.user.name, tid, f)
		}
	case k < 105: // page own messages before another user's message id
		if !mine || len(r.order) == 0 {
			return
		}
		tr := r.turns[r.order[r.rng.Intn(len(r.order))]]
		if tr == nil || tr.user == u {
			return
		}
		r.name(tr.msg)
		r.logf("%s GET messages of %s before %s", u.name, conv, tr.msg)
		code, b := r.httpDo(u, "GET", "/v1/conversations/"+conv+"/messages?before="+tr.msg, "")
		r.wantCode("GET messages before another's message", code, b, 200, 400, 404)
	case k < 108: // a message id of another user's, in a conversation of one's own
		if len(r.order) == 0 {
			return
		}
		tr := r.turns[r.order[r.rng.Intn(len(r.order))]]
		if tr == nil || tr.user == u {
			return
		}
		r.name(tr.msg)
		priv := r.next(u, "own")
		tid := r.next(u, "t")
		body, _ := json.Marshal(map[string]any{"text": r.prompt(u), "message_id": tr.msg, "turn_id": tid})
		r.logf("%s POST in %s message id %s of %s", u.name, priv, tr.msg, tr.user.name)
		code, b := r.httpDo(u, "POST", "/v1/conversations/"+priv+"/messages", string(body))
		var ans struct {
			TurnID string `json:"turn_id"`
		}
		_ = json.Unmarshal(b, &ans)
		if r.wantCode("POST with another's message id", code, b, 202, 400) && code == 202 && ans.TurnID != tid {
			r.errorf("POST with %s's message id %s answered turn %s, want %s", tr.user.name, tr.msg, ans.TurnID, tid)
		}
		code, b = r.httpDo(u, "DELETE", "/v1/conversations/"+priv, "")
		r.wantCode("DELETE own", code, b, 204, 404)
	case k < 110: // SSE of anyone's turn with Last-Event-ID
		tid, tr := r.pickTurn(u)
		want := cancelWant(u, tr)
		r.logf("%s SSE %s with Last-Event-ID (want %s)", u.name, tid, want)
		r.openSSE(u, "/v1/turns/"+tid+"/events", map[string]int{"ok": 200, "forbidden": 403, "not_found": 404}[want], "1")
	default: // compat chat, sometimes claiming another user_id
		claim := u
		if r.rng.Intn(6) == 0 {
			claim = r.users[r.rng.Intn(len(r.users))]
		}
		body, _ := json.Marshal(map[string]string{"session_id": conv, "message": r.prompt(u), "user_id": claim.name})
		r.logf("%s compat chat in %s (of %s) as %s", u.name, conv, r.ownerName(conv), claim.name)
		code, b := r.httpDo(u, "POST", "/api/chat", string(body))
		switch {
		case claim != u || !mine && !free:
			r.wantCode("compat chat in another's", code, b, 403)
		case r.wantCode("compat chat", code, b, 200, 409) && code == 200:
			r.owner[conv] = u
		}
	}
}

// openSSE opens an SSE stream as u, checks its status against want, and
// reads it in the background until it ends.
func (r *leakRun) openSSE(u *leakUser, path string, want int, lastEventID string) {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	req, err := http.NewRequestWithContext(ctx, "GET", r.p.URL+path, nil)
	if err != nil {
		r.t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+u.token)
	if lastEventID != "" {
		req.Header.Set("Last-Event-ID", lastEventID)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		cancel()
		r.t.Fatalf("SSE %s: %v", path, err)
	}
	if resp.StatusCode != want {
		b, _ := io.ReadAll(resp.Body)
		r.errorf("SSE %s as %s: %d %s, want %d", path, u.name, resp.StatusCode, b, want)
	}
	r.sse.Add(1)
	op := r.op
	r.mu.Lock()
	named := r.named
	r.mu.Unlock()
	go func() {
		defer r.sse.Done()
		defer cancel()
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		r.mu.Lock()
		r.received = append(r.received, leakPayload{user: u, where: "SSE " + path, op: op, data: b, named: named})
		r.mu.Unlock()
	}()
}

// finish waits for every turn to end and every socket to have heard all
// it will, then checks all that each user received.
func (r *leakRun) finish() {
	t := r.t
	for _, u := range r.users {
		deadline := time.Now().Add(wait)
		for {
			var list struct {
				Conversations []struct {
					Active string `json:"active_turn_id"`
				} `json:"conversations"`
			}
			trtest.Do(t, "GET", r.p.URL+"/v1/conversations", u.token, nil, &list)
			active := 0
			for _, c := range list.Conversations {
				if c.Active != "" {
					active++
				}
			}
			if active == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("seed %d: %s still has %d turns running", r.seed, u.name, active)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	r.setOp(-1)
	for _, u := range r.users {
		for i := range u.ws {
			if c := u.ws[i]; c != nil && !c.isClosed() {
				c.request(map[string]any{"type": "ping"})
			}
		}
		if u.compat != nil {
			_ = u.compat.c.Conn.CloseNow()
		}
	}
	r.sse.Wait()

	r.mu.Lock()
	defer r.mu.Unlock()
	ends := map[string]string{} // turn → status, as its owner heard it
	for _, pl := range r.received {
		data := pl.data
		for _, id := range pl.named {
			data = bytes.ReplaceAll(data, []byte(id), nil)
		}
		for _, other := range r.users {
			if other != pl.user && bytes.Contains(data, []byte(other.name)) {
				t.Errorf("seed %d: %s received %s's data (%s, during op %d): %.400s", r.seed, pl.user.name, other.name, pl.where, pl.op, pl.data)
			}
		}
		if f := pl.frame; f != nil && f.Type() == "turn.end" {
			if tr := r.turns[f.Str("turn_id")]; tr != nil && tr.user == pl.user {
				ends[tr.id] = f.Str("status")
			}
		}
	}
	for id, st := range ends {
		if st == "cancelled" && !r.turns[id].mayCancel {
			t.Errorf("seed %d: turn %s of %s was cancelled, though its owner never cancelled it", r.seed, id, r.turns[id].user.name)
		}
	}
	kinds := map[string]int{}
	for _, pl := range r.received {
		k := strings.Fields(pl.where)[0]
		if pl.frame != nil {
			k = pl.frame.Type() + " " + pl.frame.Str("code")
		}
		kinds[k]++
	}
	t.Logf("seed %d: %d turns, %d payloads received: %v", r.seed, len(r.turns), len(r.received), kinds)
}

// chaos has u join, send, delete, read and open compat sockets at random on
// a set of ids of its own, at the same time as the other users do, until
// stop; what it receives is checked with the rest.
func (r *leakRun) chaos(u *leakUser, rng *rand.Rand, stop chan struct{}) {
	convs := []string{fmt.Sprintf("x%d-c0", r.seed), fmt.Sprintf("x%d-c1", r.seed), fmt.Sprintf("x%d-c2", r.seed)}
	c, err := trtest.TryDial(r.t, r.p.WSURL(), &trtest.DialOptions{Token: u.token})
	if err != nil {
		r.t.Errorf("seed %d: chaos dial: %v", r.seed, err)
		return
	}
	go func() {
		for {
			f, err := c.Next(time.Hour)
			if err != nil {
				return
			}
			b, _ := json.Marshal(f)
			r.record(u, u.name+" chaos", b, f)
		}
	}()
	httpDo := func(method, path, body string) {
		req, _ := http.NewRequest(method, r.p.URL+path, strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+u.token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		r.record(u, "chaos "+method+" "+path, b, nil)
	}
	var compat *trtest.Client
	for n := 0; ; n++ {
		select {
		case <-stop:
			_ = c.Conn.CloseNow()
			if compat != nil {
				_ = compat.Conn.CloseNow()
			}
			return
		default:
		}
		conv := convs[rng.Intn(len(convs))]
		switch rng.Intn(7) {
		case 0:
			_ = c.TrySend(map[string]any{"type": "join", "conversation_id": conv})
		case 1:
			_ = c.TrySend(map[string]any{"type": "send", "conversation_id": conv, "text": r.prompt(u, rng),
				"message_id": fmt.Sprintf("%s.x.m%d", u.name, n), "turn_id": fmt.Sprintf("%s.%d.x.t%d", u.name, r.seed, n)})
		case 2:
			httpDo("DELETE", "/v1/conversations/"+conv, "")
		case 3:
			httpDo("GET", "/v1/conversations/"+conv+"/messages", "")
		case 4:
			httpDo("GET", "/api/history/"+conv, "")
		case 5:
			if compat != nil {
				_ = compat.Conn.CloseNow()
			}
			q := url.Values{"session_id": {conv}, "user_id": {u.name}, "token": {u.token}}
			cc, err := trtest.TryDial(r.t, strings.Replace(r.p.WSURL(), "/v1/ws", "/ws/chat", 1)+"?"+q.Encode(), nil)
			if err != nil {
				continue
			}
			compat = cc
			go func() {
				for {
					f, err := cc.Next(time.Hour)
					if err != nil {
						return
					}
					b, _ := json.Marshal(f)
					r.record(u, u.name+" chaos compat", b, f)
				}
			}()
		case 6:
			_ = c.TrySend(map[string]any{"type": "leave", "conversation_id": conv})
		}
		time.Sleep(time.Duration(rng.Intn(3)) * time.Millisecond)
	}
}
