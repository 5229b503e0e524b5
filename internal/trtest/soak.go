package trtest

import (
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Message is a stored message as the HTTP API returns it.
type Message struct {
	MessageID string `json:"message_id"`
	Role      string `json:"role"`
	Content   string `json:"content"`
	Status    string `json:"status"`
	TurnID    string `json:"turn_id"`
	ReplyTo   string `json:"reply_to"`
	CreatedAt string `json:"created_at"`
}

// Running reports whether m is an unfinished turn.
func (m Message) Running() bool {
	return m.Role == "assistant" && (m.Status == "queued" || m.Status == "streaming")
}

// StoredMessages returns the last 500 stored messages of conv through the
// gateway at base; for goroutines, it returns the error.
func StoredMessages(base, conv string) ([]Message, error) {
	resp, err := http.Get(base + "/v1/conversations/" + conv + "/messages?limit=500")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET messages of %s: %d", conv, resp.StatusCode)
	}
	var body struct {
		Messages []Message `json:"messages"`
	}
	return body.Messages, json.NewDecoder(resp.Body).Decode(&body)
}

// Readyz asks base's /readyz; err is set when nothing answered (the port
// is closed).
func Readyz(base string) (code int, failing string, err error) {
	resp, err := http.Get(base + "/readyz")
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	var body struct {
		Failing string `json:"failing"`
	}
	_ = json.NewDecoder(resp.Body).Decode(&body)
	return resp.StatusCode, body.Failing, nil
}

// WaitShuttingDown polls the /readyz of the server at base, just sent
// SIGTERM, until it answers 503 naming "shutdown", as a load balancer's
// health check would; a refused connection first fails t: the balancer
// would learn of the stop from refused clients.
func WaitShuttingDown(t *testing.T, base string) {
	t.Helper()
	for {
		code, failing, err := Readyz(base)
		if err != nil {
			t.Fatalf("/readyz after SIGTERM: %v before any 503 \"shutdown\"", err)
		}
		if code == http.StatusServiceUnavailable && failing == "shutdown" {
			return
		}
		time.Sleep(5 * time.Millisecond) // polling: the signal is on its way
	}
}

// wsURL is the native WebSocket endpoint of the gateway at base.
func wsURL(base string) string { return "ws" + strings.TrimPrefix(base, "http") + "/v1/ws" }

// Tab is one browser tab of a conversation that reconnects and resumes:
// it records every turn it gets and checks the delivery rules as it goes.
// A Tab is used by one goroutine.
type Tab struct {
	Conv   string
	Turns  map[string]*Turn    // turn → what the tab has of it
	Active string              // the turn being followed, unfinished
	Trail  map[string][]string // turn → what the tab got of it, in order
}

// NewTab is a tab of conv that has nothing yet.
func NewTab(conv string) *Tab {
	return &Tab{Conv: conv, Turns: map[string]*Turn{}, Trail: map[string][]string{}}
}

// Note adds a line to the trail of turn.
func (c *Tab) Note(turn, format string, args ...any) {
	c.Trail[turn] = append(c.Trail[turn], fmt.Sprintf(format, args...))
}

// Join joins the tab's conversation on cl with a long history, and with
// "after" for the turn it follows when useAfter is set, and applies the
// answer. An error starting "resume from" is a broken resume.
func (c *Tab) Join(cl *Client, useAfter bool) error {
	m := map[string]any{"type": "join", "conversation_id": c.Conv, "history": 500}
	tr := c.Turns[c.Active]
	if useAfter && tr != nil {
		m["after"] = map[string]any{"turn_id": tr.ID, "seq": tr.Seq}
	}
	if err := cl.TrySend(m); err != nil {
		return fmt.Errorf("join: %v", err)
	}
	for {
		f, err := cl.Next(30 * time.Second)
		if err != nil {
			return fmt.Errorf("join: %v", err)
		}
		if f.Type() != "joined" {
			if f.Type() == "error" {
				return fmt.Errorf("join: %v", f)
			}
			continue
		}
		withAfter := m["after"] != nil
		// History: adopt finished turns the tab does not follow.
		for _, x := range f["messages"].([]any) {
			msg := Frame(x.(map[string]any))
			if msg.Str("role") != "assistant" {
				continue
			}
			id := msg.Str("message_id")
			if withAfter && id == c.Active {
				continue // the server sends the rest and the end
			}
			if old := c.Turns[id]; old == nil || old.Ends == 0 {
				c.Note(id, "history %s %dB", msg.Str("status"), len(msg.Str("content")))
				tr := &Turn{ID: id, Ends: 1, Status: msg.Str("status")}
				tr.Text.WriteString(msg.Str("content"))
				c.Turns[id] = tr
				if c.Active == id {
					c.Active = ""
				}
			}
		}
		if a := f.Obj("active"); a != nil {
			id := a.Str("turn_id")
			c.Note(id, "joined active (after %v) seq %d %dB", withAfter, a.Int("seq"), len(a.Str("text")))
			if withAfter && id == c.Active {
				if a.Int("from") != tr.Seq+1 {
					return fmt.Errorf("resume from %d, had %d", a.Int("from"), tr.Seq)
				}
			} else {
				tr = &Turn{ID: id}
				c.Turns[id] = tr
			}
			tr.Text.WriteString(a.Str("text"))
			tr.Seq = a.Int("seq")
			c.Active = id
		} else if !withAfter && c.Active != "" {
			c.Active = ""
		}
		return nil
	}
}

// Apply folds a frame into the tab; it returns the first delivery rule
// the frame breaks.
func (c *Tab) Apply(f Frame) error {
	switch f.Type() {
	case "turn.start":
		id := f.Str("turn_id")
		c.Note(id, "turn.start")
		if _, ok := c.Turns[id]; ok {
			return fmt.Errorf("turn.start for known turn %s", id)
		}
		c.Turns[id] = &Turn{ID: id}
		c.Active = id
	case "turn.delta", "turn.end":
		if f.Type() == "turn.end" || len(c.Trail[f.Str("turn_id")]) < 100 {
			c.Note(f.Str("turn_id"), "%s seq %d %dB", f.Type(), f.Int("seq"), len(f.Str("text")))
		}
		tr := c.Turns[f.Str("turn_id")]
		if tr == nil {
			return fmt.Errorf("%s for unknown turn %s", f.Type(), f.Str("turn_id"))
		}
		tr.Apply(f)
		if len(tr.Errors) > 0 {
			return fmt.Errorf("turn %s: %v", tr.ID, tr.Errors)
		}
		if tr.Ends > 0 && c.Active == tr.ID {
			c.Active = ""
		}
	case "error":
		return fmt.Errorf("error frame %v", f)
	}
	return nil
}

// dialUntilUp dials the gateway that pick names, asking it again at each
// attempt, until one answers (it is restarting), or returns nil once stop
// is closed.
func dialUntilUp(t testing.TB, pick func() string, stop <-chan struct{}) *Client {
	for {
		if cl, err := TryDial(t, wsURL(pick()), nil); err == nil {
			return cl
		}
		select {
		case <-stop:
			return nil
		case <-time.After(20 * time.Millisecond): // a client's reconnect backoff
		}
	}
}

// follow makes c a tab that follows its conversation, reconnecting through
// pick and resuming with "after" whenever its connection ends. Once settle
// is closed it joins one last time and returns when it has every turn to
// its end.
func (c *Tab) follow(t testing.TB, pick func() string, settle <-chan struct{}) error {
	settling := false
	for {
		select {
		case <-settle:
			settling = true
		default:
		}
		cl := dialUntilUp(t, pick, nil)
		if c.Active != "" {
			c.Note(c.Active, "reconnected")
		}
		if err := c.Join(cl, true); err != nil {
			_ = cl.Conn.CloseNow()
			if strings.HasPrefix(err.Error(), "resume from") {
				return err
			}
			continue // the server went away during the join
		}
		for {
			if settling && c.Active == "" {
				_ = cl.Conn.CloseNow()
				return nil
			}
			if !settling {
				select {
				case <-settle:
					settling = true
				default:
				}
				if settling {
					break // one last join, which sees every stored turn
				}
			}
			f, err := cl.Next(200 * time.Millisecond)
			if errors.Is(err, ErrClosed) {
				break
			}
			if err != nil || f.Type() == "error" {
				continue // quiet, or a join refused while the server stops
			}
			if err := c.Apply(f); err != nil {
				_ = cl.Conn.CloseNow()
				return fmt.Errorf("%w; its frames: %v", err, c.Trail[f.Str("turn_id")])
			}
		}
		_ = cl.Conn.CloseNow()
	}
}

// soakTexts are the prompts of SoakRestarts: answers short and long, slow
// and as fast as the simulator goes.
var soakTexts = []string{
	"[sim tokens=3 rate=0] tiny",
	"[sim tokens=40 rate=400] short",
	"[sim tokens=400 rate=300] medium",
	"[sim tokens=3000 rate=1500] long",
	"[sim tokens=30000 rate=0] flood",
	"[sim tokens=150 rate=60] slow",
}

// soakHistory is how many tiny turns each conversation starts with, so
// that a tab's join reads more ended turns than a view remembers.
const soakHistory = 40

// soakWait bounds a producer's wait for the next frame of its turn.
const soakWait = 20 * time.Second

// producer sends the turns of one conversation one after another. A
// message whose connection ended before its turn's end is sent again with
// the same message_id, which names the same turn; some turns it cancels.
type producer struct {
	conv    string
	rng     *rand.Rand
	cancels int
}

func (p *producer) run(t testing.TB, pick func() string, stop <-chan struct{}) error {
	for i := 0; ; i++ {
		select {
		case <-stop:
			return nil
		default:
		}
		mid := fmt.Sprintf("%s-m%d", p.conv, i)
		text, cancelAt := soakTexts[p.rng.IntN(len(soakTexts))], int64(-1)
		if i < soakHistory {
			text = soakTexts[0]
		} else if p.rng.IntN(5) == 0 {
			cancelAt = int64(p.rng.IntN(50))
		}
		if err := p.turn(t, pick, mid, text+" "+mid, cancelAt, stop); err != nil {
			return err
		}
	}
}

func (p *producer) turn(t testing.TB, pick func() string, mid, text string, cancelAt int64, stop <-chan struct{}) error {
	turn := ""
	for {
		base := pick()
		cl := dialUntilUp(t, func() string { return base }, stop)
		if cl == nil {
			return nil
		}
		ended, err := p.attempt(cl, base, mid, text, &turn, &cancelAt)
		_ = cl.Conn.CloseNow()
		if ended || err != nil {
			return err
		}
	}
}

// attempt sends message mid on cl and follows its turn; it reports
// whether the turn has ended, false when the connection ended first.
func (p *producer) attempt(cl *Client, base, mid, text string, turn *string, cancelAt *int64) (bool, error) {
	if cl.TrySend(map[string]any{"type": "join", "conversation_id": p.conv, "history": 0}) != nil {
		return false, nil
	}
	if *turn != "" {
		// Joined first: an end stored after this read comes live.
		ms, err := StoredMessages(base, p.conv)
		if err != nil {
			return false, nil
		}
		for _, m := range ms {
			if m.MessageID == *turn && !m.Running() {
				return true, nil
			}
		}
	}
	if cl.TrySend(map[string]any{"type": "send", "conversation_id": p.conv, "text": text, "message_id": mid, "id": mid}) != nil {
		return false, nil
	}
	for {
		f, err := cl.Next(soakWait)
		if errors.Is(err, ErrClosed) {
			return false, nil
		}
		if err != nil {
			return false, fmt.Errorf("%s (turn %q): %v", mid, *turn, err)
		}
		switch f.Type() {
		case "error":
			// Refused while the server stops: it closes the socket next.
			if f.Str("id") == mid && f.Str("code") != "unavailable" {
				return false, fmt.Errorf("%s: %v", mid, f)
			}
		case "ack":
			if f.Str("id") == mid {
				*turn = f.Str("turn_id")
			}
		case "turn.delta":
			if f.Str("turn_id") == *turn && *cancelAt >= 0 && f.Int("seq") >= *cancelAt {
				_ = cl.TrySend(map[string]any{"type": "cancel", "turn_id": *turn, "id": "c"})
				p.cancels++
				*cancelAt = -1
			}
		case "turn.end":
			if *turn != "" && f.Str("turn_id") == *turn {
				return true, nil
			}
		}
	}
}

// SoakRig is what SoakRestarts runs against.
type SoakRig struct {
	// Pick names the gateway (its HTTP base) a client connects to now, as
	// a load balancer would. It is called from many goroutines.
	Pick func() string
	// Restart makes the k-th restart, at a random point of the load.
	Restart  func(t *testing.T, k int, rng *rand.Rand)
	Restarts int
	// Logs are the processes' warnings and errors, shown on a failure.
	Logs func() string
}

// SoakConvs is how many conversations SoakRestarts keeps busy; they are
// named "restart-0" and on.
const SoakConvs = 4

// SoakRestarts keeps conversations busy (short and long answers, some
// cancelled) with tabs that follow them with a long history, reconnecting
// through rig.Pick and resuming with "after" each time, while rig makes
// its restarts. Then every tab must have had every turn exactly once, to
// one end, with the stored text, and every message must be stored once
// with one reply.
func SoakRestarts(t *testing.T, rig SoakRig) {
	const followers = 2
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 3))
	stop, settle := make(chan struct{}), make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, SoakConvs*(followers+1))
	prods := make([]*producer, SoakConvs)
	tabs := make([][]*Tab, SoakConvs)
	for ci := range SoakConvs {
		conv := fmt.Sprintf("restart-%d", ci)
		prods[ci] = &producer{conv: conv, rng: rand.New(rand.NewPCG(rng.Uint64(), 4))}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := prods[ci].run(t, rig.Pick, stop); err != nil {
				errs <- fmt.Errorf("%s producer: %w", conv, err)
			}
		}()
		for fi := range followers {
			c := NewTab(conv)
			tabs[ci] = append(tabs[ci], c)
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := c.follow(t, rig.Pick, settle); err != nil {
					errs <- fmt.Errorf("%s tab %d: %w", conv, fi, err)
				}
			}()
		}
	}
	for k := range rig.Restarts {
		rig.Restart(t, k, rng)
	}
	close(stop)
	// The producers stop after their turn in flight; then every tab joins
	// once more and reads to the last end.
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	for ci := 0; ci < SoakConvs; {
		ms, err := StoredMessages(rig.Pick(), fmt.Sprintf("restart-%d", ci))
		if err != nil {
			t.Fatal(err)
		}
		if n := len(ms); n > 0 && ms[n-1].Running() {
			time.Sleep(20 * time.Millisecond) // polling the store, not synchronising
			continue
		}
		ci++
	}
	close(settle)
	select {
	case <-done:
	case <-time.After(time.Minute):
		t.Fatal("the tabs did not settle within a minute")
	}
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	statuses, checked, cancels := map[string]int{}, 0, 0
	for ci := range SoakConvs {
		conv := fmt.Sprintf("restart-%d", ci)
		ms, err := StoredMessages(rig.Pick(), conv)
		if err != nil {
			t.Fatal(err)
		}
		stored, users, replies := map[string]Message{}, map[string]int{}, map[string]int{}
		for _, m := range ms {
			if m.Role == "user" {
				users[m.MessageID]++
				continue
			}
			stored[m.MessageID] = m
			replies[m.ReplyTo]++
			statuses[m.Status]++
		}
		for id, n := range users {
			if n != 1 || replies[id] != 1 {
				t.Errorf("%s: message %s stored %d times with %d replies", conv, id, n, replies[id])
			}
		}
		for fi, c := range tabs[ci] {
			for id, m := range stored {
				tr := c.Turns[id]
				switch {
				case tr == nil:
					t.Errorf("%s tab %d: never had turn %s", conv, fi, id)
				case tr.Ends != 1 || tr.Text.String() != m.Content || (tr.Status != "" && tr.Status != m.Status):
					t.Errorf("%s tab %d: turn %s ended %d times (%s), %d bytes; stored %s, %d bytes; its frames: %v",
						conv, fi, id, tr.Ends, tr.Status, tr.Text.Len(), m.Status, len(m.Content), c.Trail[id])
				}
				checked++
			}
			if len(c.Turns) != len(stored) {
				t.Errorf("%s tab %d: had %d turns, %d stored", conv, fi, len(c.Turns), len(stored))
			}
		}
		cancels += prods[ci].cancels
	}
	t.Logf("%d restarts; turns %v; %d cancels sent; %d (tab, turn) pairs checked", rig.Restarts, statuses, cancels, checked)
	if t.Failed() {
		t.Logf("logs (warnings and errors):\n%s", rig.Logs())
	}
}

// Balancer picks a gateway round robin among those in rotation, as a load
// balancer whose health check is /readyz does. It is safe for concurrent
// use.
type Balancer struct {
	mu   sync.Mutex
	urls []string
	out  []bool // taken out of rotation by a failed health check
	next int
}

// NewBalancer balances over the gateways at urls (their HTTP bases).
func NewBalancer(urls ...string) *Balancer {
	return &Balancer{urls: urls, out: make([]bool, len(urls))}
}

// Pick returns the next gateway in rotation, or the first when none is
// (its client retries).
func (b *Balancer) Pick() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	for range b.urls {
		i := b.next % len(b.urls)
		b.next++
		if !b.out[i] {
			return b.urls[i]
		}
	}
	return b.urls[0]
}

func (b *Balancer) rotate(i int, in bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.out[i] = !in
}

// Restart restarts g, the balancer's i-th gateway, as a rolling restart
// does: SIGTERM; out of rotation once its /readyz answers 503 "shutdown"
// (it drains meanwhile); started again on its address once it has exited
// cleanly; back in rotation when ready. It returns the new process.
func (b *Balancer) Restart(t *testing.T, i int, g *Proc) *Proc {
	t.Helper()
	g.Signal(syscall.SIGTERM)
	WaitShuttingDown(t, g.URL) // the balancer's health check
	b.rotate(i, false)
	select {
	case <-g.Done():
	case <-time.After(time.Minute):
		t.Fatalf("gateway %d: still running a minute after SIGTERM\n%s", i, g.Stderr())
	}
	if err := g.ExitErr(); err != nil {
		t.Fatalf("gateway %d: exit after SIGTERM: %v\n%s", i, err, g.Stderr())
	}
	q := g.Restart(t) // on its address
	b.rotate(i, true)
	return q
}

// Procs keeps every process a soak starts, for the logs its failure
// prints (SoakRig.Logs).
type Procs struct {
	mu    sync.Mutex
	procs []*Proc
}

// Add records p and returns it.
func (ps *Procs) Add(p *Proc) *Proc {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	ps.procs = append(ps.procs, p)
	return p
}

// Logs returns the standard error of every process recorded, each under
// its command's name.
func (ps *Procs) Logs() string {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	var b strings.Builder
	for _, p := range ps.procs {
		fmt.Fprintf(&b, "== %v\n%s", p.Args[0], p.Stderr())
	}
	return b.String()
}

// RestartWorker stops worker i, w, with SIGTERM and starts it again with
// the same arguments, recorded in ps. It fails t when the worker exits
// badly or its turns were still ending at its --shutdown-timeout.
func (ps *Procs) RestartWorker(t *testing.T, i int, w *Proc) *Proc {
	t.Helper()
	stopped := time.Now()
	if err := w.Stop(); err != nil {
		t.Fatalf("worker %d: exit after SIGTERM: %v\n%s", i, err, w.Stderr())
	}
	if strings.Contains(w.Stderr(), "leaving them to recovery") {
		t.Fatalf("worker %d: turns still ending at its --shutdown-timeout\n%s", i, w.Stderr())
	}
	t.Logf("worker %d stopped in %v", i, time.Since(stopped).Round(time.Millisecond))
	return ps.Add(Start(t, w.Args...))
}
