package e2e_test

import (
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// TestGatewayDrainsOnSIGTERM: a gateway told to stop answers /readyz 503
// ("shutdown") at once, so that a load balancer stops sending it clients,
// while it goes on serving for its drain (--shutdown-drain): open sockets get their deltas, a new one is served. Then it
// closes them with 1001, and a client resumes on another gateway with no
// gap and one end, the stored text.
func TestGatewayDrainsOnSIGTERM(t *testing.T) {
	t.Parallel()
	_, natsURL, storeURL := trtest.ScaleOutDeps(t)
	common := []string{"--nats-url", natsURL, "--store-url", storeURL}
	trtest.Start(t, append([]string{"worker"}, common...)...)
	a := trtest.Start(t, append([]string{"gateway", "--addr", "127.0.0.1:0", "--shutdown-drain", "5s"}, common...)...)
	b := trtest.Start(t, append([]string{"gateway", "--addr", "127.0.0.1:0"}, common...)...)
	a.WaitReady(t)
	b.WaitReady(t)

	const conv = "drain"
	c := trtest.Dial(t, a.WSURL(), nil)
	c.Join(conv, nil)
	tr := startTurn(t, c, conv, "a long one [sim tokens=2400 rate=300]", 10)

	a.Signal(syscall.SIGTERM)
	trtest.WaitShuttingDown(t, a.URL)
	// Draining: the open socket is served, and so is a new one.
	had := tr.Seq
	c.Until(wait, func(f trtest.Frame) bool { tr.Apply(f); return tr.Seq > had })
	late := trtest.Dial(t, a.WSURL(), nil)
	late.Join(conv, nil)

	applyUntilClosed(c, tr)
	if code := c.CloseStatus(); code != websocket.StatusGoingAway {
		t.Fatalf("close code %d after the drain, want 1001", code)
	}
	if tr.Ends > 0 {
		t.Fatal("the turn ended during the drain: make it longer")
	}
	re := trtest.Dial(t, b.WSURL(), nil)
	j := re.Join(conv, map[string]any{"after": map[string]any{"turn_id": tr.ID, "seq": tr.Seq}})
	act := j.Obj("active")
	if act == nil || act.Int("from") != tr.Seq+1 {
		t.Fatalf("resume after seq %d: active %v", tr.Seq, act)
	}
	tr.Text.WriteString(act.Str("text"))
	tr.Seq = act.Int("seq")
	finish(t, re, tr)
	m := storedTurn(t, b.URL, conv, tr.ID)
	if tr.Ends != 1 || tr.Status != "complete" || m.Content != tr.Text.String() {
		t.Fatalf("resumed client: %d ends, %s, %d bytes; stored %s, %d bytes", tr.Ends, tr.Status, tr.Text.Len(), m.Status, len(m.Content))
	}
	<-a.Done()
	if err := a.ExitErr(); err != nil {
		t.Fatalf("gateway exit after SIGTERM: %v\n%s", err, a.Stderr())
	}
}

// TestServeDrainsOnSIGTERM: serve with --shutdown-drain answers /readyz 503
// at once on SIGTERM and lets its turns go on for the drain; then the turn
// still running ends interrupted, announced before the close with 1001,
// with the text its client had.
func TestServeDrainsOnSIGTERM(t *testing.T) {
	t.Parallel()
	p := trtest.Serve(t, "--shutdown-drain", "1s")
	const conv = "serve-drain"
	c := trtest.Dial(t, p.WSURL(), nil)
	c.Join(conv, nil)
	tr := startTurn(t, c, conv, "a long one [sim tokens=3000 rate=300]", 10)
	p.Signal(syscall.SIGTERM)
	trtest.WaitShuttingDown(t, p.URL)
	had := tr.Seq
	c.Until(wait, func(f trtest.Frame) bool { tr.Apply(f); return tr.Seq > had })
	applyUntilClosed(c, tr)
	if code := c.CloseStatus(); code != websocket.StatusGoingAway || tr.Ends != 1 || tr.Status != "interrupted" || len(tr.Errors) > 0 {
		t.Fatalf("close %d; turn ended %d times, %s, errors %v; want 1001 after one end, interrupted", code, tr.Ends, tr.Status, tr.Errors)
	}
	<-p.Done()
	if err := p.ExitErr(); err != nil {
		t.Fatalf("serve exit after SIGTERM: %v\n%s", err, p.Stderr())
	}
	q := p.Restart(t)
	if m := storedTurn(t, q.URL, conv, tr.ID); m.Status != "interrupted" || m.Content != tr.Text.String() {
		t.Fatalf("stored %s, %d bytes; the client had %d bytes", m.Status, len(m.Content), tr.Text.Len())
	}
}

// applyUntilClosed applies c's frames to tr until c closes or is quiet
// for wait.
func applyUntilClosed(c *trtest.Client, tr *trtest.Turn) {
	for {
		f, err := c.Next(wait)
		if err != nil {
			return
		}
		tr.Apply(f)
	}
}

// TestSecondSignalCutsDrainShort: a gateway or serve draining after a
// SIGTERM or SIGINT (here for ten minutes) stops draining at a second
// signal, as an operator pressing Ctrl-C again expects, and shuts down as
// it would after its drain: its sockets get 1001 and it exits cleanly.
func TestSecondSignalCutsDrainShort(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name  string
		start func(t *testing.T) *trtest.Proc
		sig   syscall.Signal
	}{
		{"gateway", func(t *testing.T) *trtest.Proc {
			g, _ := trtest.StartScaleOut(t, "--shutdown-drain", "10m")
			return g
		}, syscall.SIGTERM},
		{"serve", func(t *testing.T) *trtest.Proc { return trtest.Serve(t, "--shutdown-drain", "10m") }, syscall.SIGINT},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			p := tt.start(t)
			c := trtest.Dial(t, p.WSURL(), nil)
			c.Join("hurry", nil)
			p.Signal(tt.sig)
			trtest.WaitShuttingDown(t, p.URL) // draining
			p.Signal(tt.sig)
			select {
			case <-p.Done():
			case <-time.After(time.Minute):
				t.Fatalf("still draining a minute after the second %v", tt.sig)
			}
			if err := p.ExitErr(); err != nil {
				t.Fatalf("exit: %v\n%s", err, p.Stderr())
			}
			if code := c.CloseStatus(); code != websocket.StatusGoingAway {
				t.Fatalf("socket closed with %d, want 1001", code)
			}
		})
	}
}
