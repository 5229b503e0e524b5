package e2e_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// restartTexts are the prompts of TestRestartsUnderLoad: answers short and
// long, slow and as fast as the simulator goes.
var restartTexts = []string{
	"[sim tokens=3 rate=0] tiny",
	"[sim tokens=40 rate=400] short",
	"[sim tokens=400 rate=300] medium",
	"[sim tokens=3000 rate=1500] long",
	"[sim tokens=30000 rate=0] flood",
	"[sim tokens=150 rate=60] slow",
}

// tryMessages is messages for goroutines: it returns the error.
func tryMessages(base, conv string) ([]message, error) {
	resp, err := http.Get(base + "/v1/conversations/" + conv + "/messages?limit=500")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET messages of %s: %d", conv, resp.StatusCode)
	}
	var body struct {
		Messages []message `json:"messages"`
	}
	return body.Messages, json.NewDecoder(resp.Body).Decode(&body)
}

// running reports whether m is an unfinished turn.
func running(m message) bool {
	return m.Role == "assistant" && (m.Status == "queued" || m.Status == "streaming")
}

// wsURL is the native WebSocket endpoint of the gateway at base.
func wsURL(base string) string { return "ws" + strings.TrimPrefix(base, "http") + "/v1/ws" }

// dialUntilUp dials the gateway that pick names, asking it again at each
// attempt, until one answers (it is restarting), or returns nil once stop
// is closed.
func dialUntilUp(t *testing.T, pick func() string, stop <-chan struct{}) *trtest.Client {
	for {
		if cl, err := trtest.TryDial(t, wsURL(pick()), nil); err == nil {
			return cl
		}
		select {
		case <-stop:
			return nil
		case <-time.After(20 * time.Millisecond): // a client's reconnect backoff
		}
	}
}

// follow makes c a tab that follows its conversation with a long history, reconnecting and resuming with "after" whenever its connection
// ends. Once settle is closed it joins one last time and returns when it
// has every turn to its end.
func (c *chaosClient) follow(t *testing.T, pick func() string, settle <-chan struct{}) error {
	settling := false
	for {
		select {
		case <-settle:
			settling = true
		default:
		}
		cl := dialUntilUp(t, pick, nil)
		if c.active != "" {
			c.note(c.active, "reconnected")
		}
		if err := c.join(cl, true); err != nil {
			_ = cl.Conn.CloseNow()
			if strings.HasPrefix(err.Error(), "resume from") {
				return err
			}
			continue // the server went away during the join
		}
		for {
			if settling && c.active == "" {
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
			if errors.Is(err, trtest.ErrClosed) {
				break
			}
			if err != nil || f.Type() == "error" {
				continue // quiet, or a join refused while the server stops
			}
			if err := c.apply(f); err != nil {
				_ = cl.Conn.CloseNow()
				return fmt.Errorf("%w; its frames: %v", err, c.trail[f.Str("turn_id")])
			}
		}
		_ = cl.Conn.CloseNow()
	}
}

// restartHistory is how many tiny turns each conversation starts with, so
// that a tab's join reads more ended turns than a view remembers.
const restartHistory = 40

// restartProducer sends the turns of one conversation one after another.
// A message whose connection ended before its turn's end is sent again
// with the same message_id, which names the same turn; some turns it
// cancels.
type restartProducer struct {
	conv    string
	rng     *rand.Rand
	cancels int
}

func (p *restartProducer) run(t *testing.T, pick func() string, stop <-chan struct{}) error {
	for i := 0; ; i++ {
		select {
		case <-stop:
			return nil
		default:
		}
		mid := fmt.Sprintf("%s-m%d", p.conv, i)
		text, cancelAt := restartTexts[p.rng.IntN(len(restartTexts))], int64(-1)
		if i < restartHistory {
			text = restartTexts[0]
		} else if p.rng.IntN(5) == 0 {
			cancelAt = int64(p.rng.IntN(50))
		}
		if err := p.turn(t, pick, mid, text+" "+mid, cancelAt, stop); err != nil {
			return err
		}
	}
}

func (p *restartProducer) turn(t *testing.T, pick func() string, mid, text string, cancelAt int64, stop <-chan struct{}) error {
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
func (p *restartProducer) attempt(cl *trtest.Client, base, mid, text string, turn *string, cancelAt *int64) (bool, error) {
	if cl.TrySend(map[string]any{"type": "join", "conversation_id": p.conv, "history": 0}) != nil {
		return false, nil
	}
	if *turn != "" {
		// Joined first: an end stored after this read comes live.
		ms, err := tryMessages(base, p.conv)
		if err != nil {
			return false, nil
		}
		for _, m := range ms {
			if m.MessageID == *turn && !running(m) {
				return true, nil
			}
		}
	}
	if cl.TrySend(map[string]any{"type": "send", "conversation_id": p.conv, "text": text, "message_id": mid, "id": mid}) != nil {
		return false, nil
	}
	for {
		f, err := cl.Next(wait)
		if errors.Is(err, trtest.ErrClosed) {
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

// restartRig is what a restart soak runs against.
type restartRig struct {
	// pick names the gateway (its HTTP base) a client connects to now, as a
	// load balancer would.
	pick func() string
	// restart makes the k-th restart, at a random point of the load.
	restart  func(t *testing.T, k int, rng *rand.Rand)
	restarts int
	// logs are the processes' warnings and errors, shown on a failure.
	logs func() string
}

// soakRestarts keeps conversations busy (short and long answers, some
// cancelled) with tabs that follow them with a long history, reconnecting
// through rig.pick and resuming with "after" each time, while rig makes
// its restarts. Then every tab must have had every turn exactly once, to
// one end, with the stored text, and every message must be stored once
// with one reply.
func soakRestarts(t *testing.T, rig restartRig) {
	const (
		convs     = 4
		followers = 2
	)
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 3))
	stop, settle := make(chan struct{}), make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, convs*(followers+1))
	prods := make([]*restartProducer, convs)
	tabs := make([][]*chaosClient, convs)
	for ci := range convs {
		conv := fmt.Sprintf("restart-%d", ci)
		prods[ci] = &restartProducer{conv: conv, rng: rand.New(rand.NewPCG(rng.Uint64(), 4))}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := prods[ci].run(t, rig.pick, stop); err != nil {
				errs <- fmt.Errorf("%s producer: %w", conv, err)
			}
		}()
		for fi := range followers {
			c := &chaosClient{conv: conv, turns: map[string]*trtest.Turn{}, trail: map[string][]string{}}
			tabs[ci] = append(tabs[ci], c)
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := c.follow(t, rig.pick, settle); err != nil {
					errs <- fmt.Errorf("%s tab %d: %w", conv, fi, err)
				}
			}()
		}
	}
	for k := range rig.restarts {
		rig.restart(t, k, rng)
	}
	close(stop)
	// The producers stop after their turn in flight; then every tab joins
	// once more and reads to the last end.
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	for ci := 0; ci < convs; {
		ms, err := tryMessages(rig.pick(), fmt.Sprintf("restart-%d", ci))
		if err != nil {
			t.Fatal(err)
		}
		if n := len(ms); n > 0 && running(ms[n-1]) {
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
	for ci := range convs {
		conv := fmt.Sprintf("restart-%d", ci)
		ms, err := tryMessages(rig.pick(), conv)
		if err != nil {
			t.Fatal(err)
		}
		stored, users, replies := map[string]message{}, map[string]int{}, map[string]int{}
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
				tr := c.turns[id]
				switch {
				case tr == nil:
					t.Errorf("%s tab %d: never had turn %s", conv, fi, id)
				case tr.Ends != 1 || tr.Text.String() != m.Content || (tr.Status != "" && tr.Status != m.Status):
					t.Errorf("%s tab %d: turn %s ended %d times (%s), %d bytes; stored %s, %d bytes; its frames: %v",
						conv, fi, id, tr.Ends, tr.Status, tr.Text.Len(), m.Status, len(m.Content), c.trail[id])
				}
				checked++
			}
			if len(c.turns) != len(stored) {
				t.Errorf("%s tab %d: had %d turns, %d stored", conv, fi, len(c.turns), len(stored))
			}
		}
		cancels += prods[ci].cancels
	}
	t.Logf("%d restarts; turns %v; %d cancels sent; %d (tab, turn) pairs checked", rig.restarts, statuses, cancels, checked)
	if t.Failed() {
		t.Logf("logs (warnings and errors):\n%s", rig.logs())
	}
}

// TestRestartsUnderLoad runs soakRestarts while serve is stopped at random
// points, by SIGKILL and SIGTERM in turn, and started again on the same
// data dir and port. No turn of a stopped server is left running once the
// new one is ready.
func TestRestartsUnderLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("restart soak skipped in -short mode")
	}
	const convs = 4 // soakRestarts' conversations
	p := trtest.Serve(t, "--limit-sends", "0", "--limit-connections", "0", "--limit-turns", "0")
	var mu sync.Mutex
	srv := func() *trtest.Proc { mu.Lock(); defer mu.Unlock(); return p }
	soakRestarts(t, restartRig{
		pick:     func() string { return srv().URL }, // the same after every restart
		restarts: 8,
		logs:     func() string { return srv().Stderr() },
		restart: func(t *testing.T, k int, rng *rand.Rand) {
			time.Sleep(time.Duration(100+rng.IntN(1500)) * time.Millisecond) // a random point of the load
			old := srv()
			stoppedAt := time.Now()
			if k%2 == 0 {
				old.Kill()
			} else if err := old.Stop(); err != nil {
				t.Fatalf("restart %d: exit after SIGTERM: %v\n%s", k, err, old.Stderr())
			}
			q := old.Restart(t)
			mu.Lock()
			p = q
			mu.Unlock()
			// The previous run's turns were ended at its stop or at this start.
			for ci := range convs {
				ms, err := tryMessages(q.URL, fmt.Sprintf("restart-%d", ci))
				if err != nil {
					t.Fatal(err)
				}
				for _, m := range ms {
					created, _ := time.Parse(time.RFC3339Nano, m.CreatedAt)
					if running(m) && created.Before(stoppedAt) {
						t.Fatalf("restart %d: turn %s of the stopped server is still %s", k, m.MessageID, m.Status)
					}
				}
			}
		},
	})
}
