package main

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

var zeroHistory = new(int) // join with "history":0: the load needs no old messages

// runStream runs the stream scenario and its variants (cancel, reconnect,
// resume under load): p.Turns conversations, each with p.Watchers joined
// connections of which the first also sends, each running one turn after
// another at p.Rate tokens/s, measured for p.Duration after p.Warmup.
func runStream(ctx context.Context, e *env, name string, p streamParams) (*Result, error) {
	b := newBench(e.cfg, e.d, e.nextRunID())
	r := &Result{Scenario: name, Label: e.cfg.Label, Params: p, Started: time.Now()}
	if p.Turns <= 0 || p.Watchers <= 0 {
		return nil, fmt.Errorf("%s: need --turns and --watchers > 0", name)
	}
	if p.Tokens <= 0 {
		p.Tokens = max(20, int(p.Rate*5))
		r.Params.Tokens = p.Tokens
	}
	base := e.server.settledRSS(ctx, 3)
	r.ServerRSSBase = base.RSS

	// Connect: every conversation's watchers join it; the sender first.
	e.logf("%s: connecting %d × %d connections", name, p.Turns, p.Watchers)
	t0 := time.Now()
	convs := make([]*convState, p.Turns)
	for i := range convs {
		convs[i] = &convState{b: b, idx: i, id: fmt.Sprintf("c-%s-%d", b.runID, i), conns: make([]*conn, p.Watchers), ev: make(chan convEvent, 8)}
	}
	var failed atomic.Int64
	eachWatcher(p.Turns, p.Watchers, e.cfg.DialConcurrency, func(i, w int) {
		cs := convs[i]
		c, err := b.connect(ctx, connOpts{conv: cs, sender: w == 0})
		if err == nil {
			_, err = c.join(ctx, cs.id, nil, zeroHistory)
			if err != nil {
				b.count("join: " + shortErr(err))
				c.close()
			}
		}
		if err != nil {
			failed.Add(1)
			return
		}
		cs.conns[w] = c
	})
	if ctx.Err() != nil {
		b.closeAll()
		return nil, ctx.Err()
	}
	// A conversation whose sender failed is left out; a missing watcher
	// only lowers that conversation's fan-out.
	live := convs[:0]
	watchers := 0
	for _, cs := range convs {
		var kept []*conn
		for _, c := range cs.conns {
			if c != nil {
				kept = append(kept, c)
			}
		}
		if cs.conns[0] == nil {
			for _, c := range kept {
				c.close()
			}
			continue
		}
		cs.conns = kept
		watchers += len(kept)
		live = append(live, cs)
	}
	convs = live
	r.Conns = watchers
	r.ConnFailures = failed.Load()
	r.SetupS = time.Since(t0).Seconds()
	if len(convs) == 0 {
		b.closeAll()
		return nil, fmt.Errorf("%s: no conversation could connect (%v)", name, b.errs.snapshot())
	}
	joined := e.server.settledRSS(ctx, 5)
	r.ServerRSSJoined = joined.RSS
	r.SetupCPUs = (joined.CPU - base.CPU).Seconds()
	rt0 := e.server.scrape(ctx)
	r.RSSPerConn = r.rssPerUnit(base.RSS, joined.RSS, float64(watchers), "connection", "while connecting")

	// Drive the turns.
	e.logf("%s: %d conversations connected in %.1fs; running %s warm-up + %s", name, len(convs), r.SetupS, p.Warmup, p.Duration)
	stopSending := time.Now().Add(p.Warmup + p.Duration)
	dctx, dcancel := context.WithDeadline(ctx, stopSending.Add(2*p.turnDur()+20*time.Second))
	defer dcancel()
	stagger := min(p.turnDur(), max(p.Warmup, time.Second))
	var drivers sync.WaitGroup
	for _, cs := range convs {
		drivers.Add(1)
		go func() {
			defer drivers.Done()
			cs.driver(dctx, p, time.Duration(rand.Int64N(int64(stagger)+1)), stopSending)
		}()
	}

	// Sample how many turns run at once, to state the load truthfully.
	var activeSum, activeN atomic.Int64
	sctx, scancel := context.WithCancel(ctx)
	var side sync.WaitGroup
	side.Add(1)
	go func() {
		defer side.Done()
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-sctx.Done():
				return
			case <-t.C:
				if b.recording.Load() {
					activeSum.Add(b.sends.Load() - b.ends.Load())
					activeN.Add(1)
				}
			}
		}
	}()

	if !sleepCtx(ctx, p.Warmup) {
		scancel()
		dcancel()
		b.closeAll()
		return nil, ctx.Err()
	}
	m0 := e.server.scrape(ctx)
	s0 := e.server.sample()
	self0 := selfCPU()
	tot0, idle0 := machineIdle()
	sends0 := b.sends.Load()
	b.recording.Store(true)
	wstart := time.Now()
	if p.StormPct > 0 && p.StormEvery > 0 {
		side.Add(1)
		go func() {
			defer side.Done()
			b.storms(sctx, convs, p)
		}()
	}
	if p.ProbeRate > 0 {
		side.Add(1)
		go func() {
			defer side.Done()
			b.probes(sctx, convs, p)
		}()
	}
	if e.cfg.PprofURL != "" && p.Duration >= 2*time.Second {
		side.Add(1)
		go func() {
			defer side.Done()
			e.cpuProfile(sctx, name, p.Duration-time.Second, r)
		}()
	}
	sleepCtx(ctx, p.Duration)
	b.recording.Store(false)
	window := time.Since(wstart)
	s1 := e.server.sample()
	self1 := selfCPU()
	tot1, idle1 := machineIdle()
	m1 := e.server.scrape(ctx)
	r.TurnsSent = b.sends.Load() - sends0
	scancel()
	side.Wait()

	e.logf("%s: window done; letting the last turns end", name)
	drivers.Wait()
	// Watchers get a turn's end a moment after its sender does.
	deadline := time.Now().Add(10 * time.Second)
	for b.openTurns() > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	b.closeAll()

	frames, deltaFrames, deltas, bytes, v := b.totals()
	w := window.Seconds()
	r.WindowS = w
	r.Violations = v
	if activeN.Load() > 0 {
		r.AvgActive = float64(activeSum.Load()) / float64(activeN.Load())
	}
	r.OfferedTokS = p.Rate * r.AvgActive
	r.TokensPerDelt = 1
	if s := b.usageSeqs.Load(); s > 0 {
		r.TokensPerDelt = float64(b.usageTokens.Load()) / float64(s)
	}
	r.DeltasS = float64(deltas) / w
	r.TokensS = r.DeltasS * r.TokensPerDelt
	r.FramesS = float64(frames) / w
	r.DeltaFramesS = float64(deltaFrames) / w
	r.BytesS = float64(bytes) / w
	if r.OfferedTokS > 0 {
		r.KeepUp = r.TokensS / (r.OfferedTokS * float64(watchers) / float64(len(convs)))
	}
	lat := b.latency().Summarize()
	r.Latency = &lat
	if b.cancel.Count() > 0 || p.CancelFrac > 0 {
		s := b.cancel.Summarize()
		r.Cancel = &s
	}
	if b.resume.Count() > 0 || p.ProbeRate > 0 || p.StormPct > 0 {
		s := b.resume.Summarize()
		r.Resume = &s
	}
	if b.dial.Count() > 0 {
		s := b.dial.Summarize()
		r.Dial = &s
	}
	if s0.RSS > 0 {
		cpu := (s1.CPU - s0.CPU).Seconds()
		r.ServerCPUs = cpu / w
		if r.TokensS > 0 {
			r.ServerCPUPer1k = cpu / (r.TokensS * w / 1000)
		}
		r.ServerRSSLoaded = s1.RSS
		r.RSSPerTurn = r.rssPerUnit(joined.RSS, s1.RSS, r.AvgActive, "active turn", "from the connections joined to the window's end")
		r.ServerThreads = s1.Thread
	}
	r.ClientCPUs = (self1 - self0).Seconds() / w
	if tot1 > tot0 {
		r.MachineBusy = 1 - float64(idle1-idle0)/float64(tot1-tot0)
		r.OtherCPUs = max(0, r.MachineBusy*float64(runtime.NumCPU())-r.ServerCPUs-r.ClientCPUs)
	}
	r.ServerCounters = counterDelta(m0, m1)
	r.ServerCancel = bucketDelta(m0, m1, "tokenrelay_cancel_to_end_seconds")
	r.WorkerCancel = bucketDelta(m0, m1, "tokenrelay_worker_cancel_to_end_seconds")
	r.setGC()
	r.RuntimePer = runtimeDelta(rt0, m1, r.AvgActive)
	r.Events = b.errs.snapshot()
	r.ViolationDetails = b.violations
	return r, nil
}

// storms drops p.StormPct % of the non-sender watchers every p.StormEvery;
// each resumes on a new connection with join … after, carrying its
// tracker over so that the delivery rules are checked across the gap.
func (b *bench) storms(ctx context.Context, convs []*convState, p streamParams) {
	t := time.NewTicker(p.StormEvery)
	defer t.Stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	sem := make(chan struct{}, b.cfg.DialConcurrency)
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, cs := range convs {
			cs.connsMu.Lock()
			n := len(cs.conns)
			cs.connsMu.Unlock()
			for w := 1; w < n; w++ {
				if rand.Float64()*100 >= p.StormPct {
					continue
				}
				select {
				case sem <- struct{}{}:
				case <-ctx.Done():
					return
				}
				cs.connsMu.Lock()
				c := cs.conns[w]
				cs.connsMu.Unlock()
				wg.Add(1)
				go func() {
					defer wg.Done()
					defer func() { <-sem }()
					b.count("reconnects")
					b.reconnect(ctx, cs, c)
				}()
			}
		}
	}
}

// reconnect replaces connection old of cs (dropped by a storm, or by the
// server): close, dial, join with after. The new connection keeps old's
// tracker, so the delivery rules are checked across the gap.
func (b *bench) reconnect(ctx context.Context, cs *convState, old *conn) {
	if b.stopping.Load() {
		return
	}
	cs.connsMu.Lock()
	w := slices.Index(cs.conns, old)
	cs.connsMu.Unlock()
	if w < 0 {
		return // replaced already
	}
	old.close()
	// Name a turn in after only while waiting for its end: the server
	// answers an after naming an ended turn with its end, again.
	turn, seq, ok := old.trk.Position()
	var a *after
	if ok && !old.trk.Ended(turn) {
		a = &after{TurnID: turn, Seq: seq}
	}
	// Use a context that outlives the storm so a resume is not cut short.
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	var nc *conn
	var err error
	for try := 0; ; try++ {
		if nc, err = b.connect(rctx, connOpts{trk: old.trk, conv: cs, sender: old.sender}); err == nil {
			break
		}
		if try == 5 || b.stopping.Load() || !sleepCtx(rctx, time.Duration(200<<try)*time.Millisecond) {
			b.count("reconnect lost a watcher")
			return
		}
	}
	nc.open.Store(old.open.Swap(0))
	cs.connsMu.Lock()
	cs.conns[w] = nc
	cs.connsMu.Unlock()
	if _, err := nc.join(rctx, cs.id, a, zeroHistory); err != nil {
		b.count("resume join: " + shortErr(err))
	}
}

// probes opens a new connection p.ProbeRate times a second that resumes a
// random running turn from its sender's position, measures join → first
// frame, and leaves.
func (b *bench) probes(ctx context.Context, convs []*convState, p streamParams) {
	t := time.NewTicker(time.Duration(float64(time.Second) / p.ProbeRate))
	defer t.Stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	sem := make(chan struct{}, 32)
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		cs := convs[rand.IntN(len(convs))]
		tp, seq := cs.turn.Load(), cs.seq.Load()
		if tp == nil || seq == 0 {
			b.count("resume probe: no running turn picked")
			continue
		}
		select {
		case sem <- struct{}{}:
		default:
			b.count("resume probe: skipped (32 in flight)")
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			trk := NewTracker()
			trk.Snapshot(*tp, 0, seq) // the probe "has" the turn up to seq
			pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 20*time.Second)
			defer cancel()
			c, err := b.connect(pctx, connOpts{trk: trk})
			if err != nil {
				return
			}
			c.open.Store(1)
			if _, err := c.join(pctx, cs.id, &after{TurnID: *tp, Seq: seq}, zeroHistory); err != nil {
				b.count("resume probe join: " + shortErr(err))
			}
			c.close()
			c.open.Store(0)
			trk.Abandon()
		}()
	}
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// cpuProfile fetches a CPU profile of the server over d and saves it.
func (e *env) cpuProfile(ctx context.Context, name string, d time.Duration, r *Result) {
	secs := max(1, int(d.Seconds()))
	u := strings.TrimSuffix(e.cfg.PprofURL, "/") + "/debug/pprof/profile?seconds=" + strconv.Itoa(secs)
	req, err := http.NewRequestWithContext(context.WithoutCancel(ctx), http.MethodGet, u, nil)
	if err != nil {
		return
	}
	resp, err := (&http.Client{Timeout: d + 30*time.Second}).Do(req)
	if err != nil {
		r.Notes = append(r.Notes, "cpu profile: "+err.Error())
		return
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		r.Notes = append(r.Notes, fmt.Sprintf("cpu profile: status %d %v", resp.StatusCode, err))
		return
	}
	path := fmt.Sprintf("%s-%s-%d.pb.gz", e.cfg.PprofOut, strings.ReplaceAll(name, " ", "-"), e.runs.Load())
	if err := os.WriteFile(path, data, 0o644); err != nil {
		r.Notes = append(r.Notes, "cpu profile: "+err.Error())
		return
	}
	r.Notes = append(r.Notes, fmt.Sprintf("server CPU profile over %ds of the window: %s", secs, path))
}
