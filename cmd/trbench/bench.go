package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"
)

const latShards = 16

// bench is the state of one scenario run: its connections, histograms and
// tallies. Readers record into it without locks (atomics only; the token
// latency histogram is sharded by connection).
type bench struct {
	cfg   *config
	d     *dialer
	runID string

	recording atomic.Bool // samples and counters count only while set
	stopping  atomic.Bool // the run is closing its connections: no more resumes

	lat    [latShards]Histogram // token-to-screen, µs
	join   Histogram            // join → joined, fresh joins, µs
	resume Histogram            // join(after) → joined, µs
	cancel Histogram            // cancel sent → turn.end(cancelled), µs
	dial   Histogram            // WebSocket dial, µs

	usageTokens, usageSeqs atomic.Int64 // completed turns: completion tokens and deltas
	sends, ends            atomic.Int64 // turns sent and ended (all time)
	errs                   errorCounts

	mu         sync.Mutex
	violations []string      // the first few violations in detail; guarded by mu
	conns      []*conn       // every connection of the run, for the totals; guarded by mu
	compat     []*compatConn // legacy-protocol connections (idle compat=1); guarded by mu
	next       int           // guarded by mu
}

func newBench(cfg *config, d *dialer, runID string) *bench {
	return &bench{cfg: cfg, d: d, runID: runID}
}

func (b *bench) latShard(idx int) *Histogram { return &b.lat[idx%latShards] }

func (b *bench) count(name string) { b.errs.add(name, 1) }

const keepViolations = 10

func (b *bench) violationSample(s string) {
	b.mu.Lock()
	if len(b.violations) < keepViolations {
		b.violations = append(b.violations, s)
	}
	b.mu.Unlock()
}

// latency merges the shards.
func (b *bench) latency() *Histogram {
	var h Histogram
	for i := range b.lat {
		h.Merge(&b.lat[i])
	}
	return &h
}

// connOpts say what a new connection is for.
type connOpts struct {
	trk    *Tracker    // carried over from the connection it replaces; nil: new
	conv   *convState  // its conversation; nil: none (a probe)
	sender bool        // it sends the conversation's turns
	ends   chan string // receives the ids of ended turns; nil: none
}

// connect dials a connection and starts its reader.
func (b *bench) connect(ctx context.Context, o connOpts) (*conn, error) {
	t0 := time.Now()
	ws, err := b.d.dial(ctx)
	if err != nil {
		b.count("dial: " + shortErr(err))
		return nil, err
	}
	if b.recording.Load() {
		b.dial.Record(time.Since(t0).Microseconds())
	}
	b.mu.Lock()
	idx := b.next
	b.next++
	c := newConn(b, ws, idx, o.trk, o.ends)
	c.conv, c.sender = o.conv, o.sender
	b.conns = append(b.conns, c)
	b.mu.Unlock()
	c.start()
	return c, nil
}

// totals adds up the connections' counters and violations. Call it after
// the readers have ended.
func (b *bench) totals() (frames, deltaFrames, deltas, bytes int64, v Violations) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, c := range b.conns {
		frames += c.c.frames.Load()
		deltaFrames += c.c.deltaFrames.Load()
		deltas += c.c.deltas.Load()
		bytes += c.c.bytes.Load()
	}
	conns := append([]*conn(nil), b.conns...)
	b.mu.Unlock()
	seen := map[*Tracker]bool{}
	for _, c := range conns {
		if seen[c.trk] {
			continue // carried over to a reconnected connection
		}
		seen[c.trk] = true
		c.trk.Finish()
		v.Add(c.trk.V)
	}
	b.mu.Lock()
	return
}

// openTurns is how many turns the live connections have seen start and
// not end.
func (b *bench) openTurns() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	var n int64
	for _, c := range b.conns {
		n += c.open.Load()
	}
	return n
}

// closeAll closes every connection and waits for the readers; a resume
// in flight may add one, so it goes round until none is left. Legacy
// connections are closed with a close handshake, native ones dropped.
func (b *bench) closeAll() {
	b.stopping.Store(true)
	b.closeCompat()
	done := 0
	for {
		b.mu.Lock()
		conns := append([]*conn(nil), b.conns[done:]...)
		b.mu.Unlock()
		if len(conns) == 0 {
			return
		}
		done += len(conns)
		closeEach(conns)
		time.Sleep(50 * time.Millisecond)
	}
}

// eachWatcher calls fn for every watcher w of every conversation i (the
// watchers of conversation 0 first, in order), at most limit calls at once,
// and returns when all have returned: a scenario's dials.
func eachWatcher(convs, watchers, limit int, fn func(i, w int)) {
	sem := make(chan struct{}, limit)
	var wg sync.WaitGroup
	for i := range convs {
		for w := range watchers {
			sem <- struct{}{}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				fn(i, w)
			}()
		}
	}
	wg.Wait()
}

// closeEach closes conns, 64 at a time.
func closeEach[C interface{ close() }](conns []C) {
	sem := make(chan struct{}, 64)
	var wg sync.WaitGroup
	for _, c := range conns {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.close()
			<-sem
		}()
	}
	wg.Wait()
}

// convState is one conversation of a stream scenario and the driver that
// sends its turns one after another.
type convState struct {
	b     *bench
	id    string
	idx   int
	conns []*conn // conns[0] sends; guarded by connsMu (reconnects replace entries)

	connsMu  sync.Mutex
	turn     atomic.Pointer[string] // the turn being run, set by the driver
	seq      atomic.Int64           // the sender's last seq of that turn
	cancelAt atomic.Int64           // UnixNano a cancel was sent for it; 0 = none
	ev       chan convEvent         // sender reader → driver
}

type convEvent struct {
	end    bool
	turn   string
	status string
	id     string // error: the request id
	code   string
}

func (cs *convState) onEnd(now time.Time, turn, status string, completion, seq int64) {
	b := cs.b
	b.ends.Add(1)
	if cur := cs.turn.Load(); cur != nil && *cur == turn {
		if at := cs.cancelAt.Swap(0); at != 0 {
			if status == "cancelled" {
				if b.recording.Load() {
					b.cancel.Record(now.Sub(time.Unix(0, at)).Microseconds())
				}
			} else {
				b.count("cancel: turn ended " + status + " first")
			}
		}
	}
	if status == "complete" && completion > 0 {
		b.usageTokens.Add(completion)
		b.usageSeqs.Add(seq)
	}
	if status != "complete" && status != "cancelled" {
		b.count("turn ended " + status)
	}
	select {
	case cs.ev <- convEvent{end: true, turn: turn, status: status}:
	default:
	}
}

func (cs *convState) onError(id, code string) {
	select {
	case cs.ev <- convEvent{id: id, code: code}:
	default:
	}
}

// streamParams shape a stream-like scenario.
type streamParams struct {
	Turns      int           `json:"turns"`               // conversations, each running one turn at a time
	Rate       float64       `json:"rate"`                // tokens/s per turn (sim directive)
	Tokens     int           `json:"tokens"`              // tokens per turn
	Watchers   int           `json:"watchers"`            // connections joined per conversation, the sender included
	Warmup     time.Duration `json:"warmup_ns"`           // before the measured window
	Duration   time.Duration `json:"duration_ns"`         // the measured window
	CancelFrac float64       `json:"cancel_fraction"`     // turns cancelled at a random point
	StormPct   float64       `json:"storm_pct"`           // % of non-sender watchers dropped per storm
	StormEvery time.Duration `json:"storm_every_ns"`      // storm period
	ProbeRate  float64       `json:"resume_probes_per_s"` // resume probes per second
	Protocol   string        `json:"protocol,omitempty"`  // idle: "compat" for the legacy /ws/chat protocol; empty: native
}

func (p streamParams) turnDur() time.Duration {
	if p.Rate <= 0 {
		return time.Second
	}
	return time.Duration(float64(p.Tokens) / p.Rate * float64(time.Second))
}

// driver runs the conversation's turns until stop, then lets the last one
// finish (or gives up at ctx's end).
func (cs *convState) driver(ctx context.Context, p streamParams, stagger time.Duration, stopSending time.Time) {
	b := cs.b
	if stagger > 0 {
		select {
		case <-time.After(stagger):
		case <-ctx.Done():
			return
		}
	}
	rng := rand.New(rand.NewPCG(uint64(cs.idx), uint64(time.Now().UnixNano())))
	turnWait := 2*p.turnDur() + 15*time.Second
	failures := 0
	for k := 0; time.Now().Before(stopSending) && ctx.Err() == nil; k++ {
		cs.connsMu.Lock()
		sender := cs.conns[0]
		cs.connsMu.Unlock()
		turn := fmt.Sprintf("t-%s-%d-%d", b.runID, cs.idx, k)
		cs.seq.Store(0)
		cs.cancelAt.Store(0)
		cs.turn.Store(&turn)
		sendID := fmt.Sprintf("s%d", k)
		text := fmt.Sprintf("[sim tokens=%d rate=%g] trbench %s conversation %d turn %d", p.Tokens, p.Rate, b.runID, cs.idx, k)
		if err := sender.write(ctx, clientFrame{Type: "send", ID: sendID, ConversationID: cs.id, Text: text, MessageID: "m" + turn[1:], TurnID: turn}); err != nil {
			// The sender is being resumed on a new connection: try again.
			b.count("send write: " + shortErr(err))
			if failures++; failures > 10 || !sleepCtx(ctx, 500*time.Millisecond) {
				return
			}
			continue
		}
		failures = 0
		b.sends.Add(1)
		var cancelC <-chan time.Time
		var cancelT *time.Timer
		if p.CancelFrac > 0 && rng.Float64() < p.CancelFrac {
			cancelT = time.NewTimer(time.Duration((0.05 + 0.9*rng.Float64()) * float64(p.turnDur())))
			cancelC = cancelT.C
		}
		timeout := time.NewTimer(turnWait)
	wait:
		for {
			select {
			case ev := <-cs.ev:
				if ev.end && ev.turn == turn {
					break wait
				}
				if !ev.end && ev.id == sendID {
					b.sends.Add(-1)
					time.Sleep(200 * time.Millisecond) // e.g. rate_limited or turn_active
					break wait
				}
			case <-cancelC:
				cancelC = nil
				cs.cancelAt.Store(time.Now().UnixNano())
				if err := sender.write(ctx, clientFrame{Type: "cancel", ID: "c" + sendID, TurnID: turn}); err != nil {
					b.count("cancel write: " + shortErr(err))
				}
			case <-timeout.C:
				b.count("turn: no turn.end within " + turnWait.Round(time.Second).String())
				break wait
			case <-ctx.Done():
				break wait
			}
		}
		timeout.Stop()
		if cancelT != nil {
			cancelT.Stop()
		}
	}
}

// shortErr trims an error to its last cause, for tallies.
func shortErr(err error) string {
	s := err.Error()
	for i := len(s) - 2; i >= 0; i-- {
		if s[i] == ':' && s[i+1] == ' ' {
			return s[i+2:]
		}
	}
	return s
}
