package security_test

import (
	"context"
	"encoding/json"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// latencySample is one turn.delta as the victim saw it.
type latencySample struct {
	at      time.Time     // when the frame was read
	latency time.Duration // read time minus the producer's "ts"
	from    int64
	seq     int64
}

// TestConnectionFloodDoesNotSlowOthers has one user hold its 20 allowed
// connections and then make 5,000 more connection attempts, 50 at a time,
// while another user streams a turn with --delta-timestamps. Every attempt
// past the limit must be closed with 4009, and the other user's stream must
// go on without gaps or stalls. The token-to-screen latency (the time from
// the producer emitting a delta to the client reading it) before and during
// the flood is logged; only gross regressions fail the test.
//
// It does not run in parallel with the rest of the suite, so that the
// figures it logs are the server's, not the other tests'.
func TestConnectionFloodDoesNotSlowOthers(t *testing.T) {
	const (
		attempts    = 5000
		concurrency = 50
		limit       = 20
		rate        = 100 // victim's tokens per second
	)
	if testing.Short() {
		t.Skip("5,000 connection attempts skipped in -short mode")
	}
	p := serveJWT(t, "--delta-timestamps", "--limit-connections", "20")

	// The victim streams a long turn, timestamping every frame as it is read.
	victimTok := tokenFor(t, "victim")
	ctx := trtest.Ctx(t, 2*time.Minute)
	h := http.Header{"Authorization": {"Bearer " + victimTok}}
	vws, _, err := websocket.Dial(ctx, p.WSURL(), &websocket.DialOptions{HTTPHeader: h})
	if err != nil {
		t.Fatal(err)
	}
	defer vws.CloseNow()
	vws.SetReadLimit(-1)
	write := func(v any) {
		b, _ := json.Marshal(v)
		if err := vws.Write(ctx, websocket.MessageText, b); err != nil {
			t.Fatal(err)
		}
	}
	var (
		mu      sync.Mutex
		samples []latencySample
		turnID  string
		ended   = make(chan string, 1)
		readErr = make(chan error, 1)
	)
	go func() {
		for {
			_, data, err := vws.Read(ctx)
			at := time.Now()
			if err != nil {
				readErr <- err
				return
			}
			var f struct {
				Type   string `json:"type"`
				TurnID string `json:"turn_id"`
				Seq    int64  `json:"seq"`
				From   int64  `json:"from"`
				TS     int64  `json:"ts"`
				Status string `json:"status"`
				Code   string `json:"code"`
			}
			if json.Unmarshal(data, &f) != nil {
				continue
			}
			switch f.Type {
			case "turn.start":
				mu.Lock()
				turnID = f.TurnID
				mu.Unlock()
			case "turn.delta":
				if f.From == 0 {
					f.From = f.Seq
				}
				s := latencySample{at: at, from: f.From, seq: f.Seq}
				if f.TS > 0 {
					s.latency = at.Sub(time.UnixMicro(f.TS))
				}
				mu.Lock()
				samples = append(samples, s)
				mu.Unlock()
			case "turn.end":
				ended <- f.Status
			case "error":
				readErr <- &websocket.CloseError{Reason: "error frame " + f.Code}
				return
			}
		}
	}()
	write(map[string]any{"type": "join", "conversation_id": "victim"})
	write(map[string]any{"type": "send", "conversation_id": "victim", "text": "[sim tokens=100000 rate=100] keep talking", "id": "s"})

	// The flooder holds all of its connections.
	floodTok := &trtest.DialOptions{Token: tokenFor(t, "flooder")}
	for range limit {
		c := trtest.Dial(t, p.WSURL(), floodTok)
		c.Send(`{"type":"ping","id":"p"}`)
		reply(t, c, "p")
	}

	time.Sleep(3 * time.Second) // the baseline: the victim's stream alone
	floodStart := time.Now()
	var refused, other atomic.Int64
	var otherMu sync.Mutex
	var otherSeen []string
	next := make(chan struct{})
	var wg sync.WaitGroup
	for range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range next {
				code, err := attempt(ctx, p.WSURL(), floodTok.Token)
				if code == 4009 {
					refused.Add(1)
					continue
				}
				other.Add(1)
				otherMu.Lock()
				if len(otherSeen) < 5 {
					otherSeen = append(otherSeen, err.Error())
				}
				otherMu.Unlock()
			}
		}()
	}
	for range attempts {
		next <- struct{}{}
	}
	close(next)
	wg.Wait()
	floodEnd := time.Now()
	time.Sleep(500 * time.Millisecond)

	// The victim may still open another connection.
	if code := closeCode(t, p.WSURL(), &trtest.DialOptions{Token: victimTok}, 200*time.Millisecond); code != -1 {
		t.Fatalf("the victim's second connection: close %d", code)
	}
	mu.Lock()
	id := turnID
	mu.Unlock()
	write(map[string]any{"type": "cancel", "turn_id": id, "id": "c"})
	select {
	case st := <-ended:
		if st != "cancelled" {
			t.Fatalf("victim's turn ended %s", st)
		}
	case err := <-readErr:
		t.Fatalf("victim's connection: %v", err)
	case <-time.After(wait):
		t.Fatal("victim's turn did not end")
	}

	if n := refused.Load(); n != attempts {
		t.Errorf("%d of %d attempts closed with 4009; %d otherwise: %v", n, attempts, other.Load(), otherSeen)
	}
	mu.Lock()
	defer mu.Unlock()
	// Contiguous: every seq exactly once.
	var last int64
	for _, s := range samples {
		if s.from != last+1 {
			t.Fatalf("victim's deltas: from %d after %d", s.from, last)
		}
		last = s.seq
	}
	var base, flood []time.Duration
	var floodSeqs int64
	var maxGap time.Duration
	prev := floodStart
	for _, s := range samples {
		switch {
		case s.at.Before(floodStart):
			base = append(base, s.latency)
		case s.at.Before(floodEnd):
			flood = append(flood, s.latency)
			floodSeqs += s.seq - s.from + 1
			maxGap = max(maxGap, s.at.Sub(prev))
			prev = s.at
		}
	}
	dur := floodEnd.Sub(floodStart)
	b50, b99, bmax := quantiles(base)
	f50, f99, fmax := quantiles(flood)
	t.Logf("5,000 connection attempts past the limit, %d at a time: %v (%.0f attempts/s), all refused with 4009: %v",
		concurrency, dur.Round(time.Millisecond), attempts/dur.Seconds(), refused.Load() == attempts)
	t.Logf("victim's token-to-screen latency (%d tok/s): alone p50 %v p99 %v max %v (%d deltas); during the flood p50 %v p99 %v max %v (%d frames, %d deltas, longest gap %v)",
		rate, b50, b99, bmax, len(base), f50, f99, fmax, len(flood), floodSeqs, maxGap.Round(time.Millisecond))
	// Gross regressions only: the stream kept flowing.
	if fmax > 2*time.Second || maxGap > 2*time.Second {
		t.Errorf("the victim's stream stalled during the flood: max latency %v, longest gap %v", fmax, maxGap)
	}
	if want := int64(dur.Seconds() * rate / 4); floodSeqs < want {
		t.Errorf("the victim got %d deltas during a %v flood, want at least %d", floodSeqs, dur, want)
	}
}

// attempt opens one connection with token and returns the close code the
// server ends it with.
func attempt(ctx context.Context, wsURL, token string) (websocket.StatusCode, error) {
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, wsURL, &websocket.DialOptions{HTTPHeader: http.Header{"Authorization": {"Bearer " + token}}})
	if err != nil {
		return -1, err
	}
	defer ws.CloseNow()
	_, _, err = ws.Read(ctx)
	return websocket.CloseStatus(err), err
}

// quantiles returns p50, p99 and the maximum of ds.
func quantiles(ds []time.Duration) (p50, p99, pmax time.Duration) {
	if len(ds) == 0 {
		return 0, 0, 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	at := func(q float64) time.Duration { return s[int(q*float64(len(s)-1))].Round(10 * time.Microsecond) }
	return at(0.5), at(0.99), s[len(s)-1].Round(10 * time.Microsecond)
}
