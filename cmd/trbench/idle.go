package main

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// runIdle opens n connections, each joined to its own new conversation,
// holds them for hold, and reports the server's memory per connection:
// (RSS with n joined − RSS before) / n, and its CPU while they idle.
// With compat the connections speak the legacy protocol (COMPAT.md): each
// opens /ws/chat on its own new session as user dev and gets its welcome.
func runIdle(ctx context.Context, e *env, n int, hold time.Duration, compat bool) (*Result, error) {
	b := newBench(e.cfg, e.d, e.nextRunID())
	r := &Result{Scenario: "idle", Label: e.cfg.Label, Started: time.Now()}
	r.Params.Watchers = 1
	proto := "native"
	if compat {
		if _, err := compatURL(e.cfg.URL, "", compatUser, compatToken); err != nil {
			return nil, fmt.Errorf("idle compat: %w", err)
		}
		r.Params.Protocol = "compat"
		proto = "compat"
		r.Notes = append(r.Notes, "legacy /ws/chat protocol: join→1st frame is from the dial's end to the welcome frame")
	}
	base := e.server.settledRSS(ctx, 5)
	r.ServerRSSBase = base.RSS
	rt0 := e.server.scrape(ctx)

	e.logf("idle: opening %d %s connections", n, proto)
	b.recording.Store(true)
	t0 := time.Now()
	sem := make(chan struct{}, e.cfg.DialConcurrency)
	var wg sync.WaitGroup
	var ok, failed atomic.Int64
	for i := range n {
		if ctx.Err() != nil {
			break
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			var err error
			if compat {
				session := fmt.Sprintf("ic-%s-%d", b.runID, i)
				var u string
				if u, err = compatURL(e.cfg.URL, session, compatUser, compatToken); err != nil {
					b.count("compat url: " + shortErr(err))
				} else {
					_, err = b.connectCompat(ctx, u, session)
				}
			} else {
				var c *conn
				if c, err = b.connect(ctx, connOpts{}); err == nil {
					if _, err = c.join(ctx, fmt.Sprintf("i-%s-%d", b.runID, i), nil, zeroHistory); err != nil {
						b.count("join: " + shortErr(err))
						c.close()
					}
				}
			}
			if err != nil {
				failed.Add(1)
				return
			}
			ok.Add(1)
		}()
		if i > 0 && i%2000 == 0 {
			e.logf("idle: %d dialled", i)
		}
	}
	wg.Wait()
	b.recording.Store(false)
	r.SetupS = time.Since(t0).Seconds()
	r.Conns = int(ok.Load())
	r.ConnFailures = failed.Load()
	e.logf("idle: %d joined in %.1fs (%d failed); holding %s", r.Conns, r.SetupS, r.ConnFailures, hold)

	joined := e.server.settledRSS(ctx, 10)
	self0 := selfCPU()
	tot0, idle0 := machineIdle()
	sleepCtx(ctx, hold)
	held := e.server.sample()
	rt1 := e.server.scrape(ctx)
	r.RuntimePer = runtimeDelta(rt0, rt1, float64(r.Conns))
	r.SetupCPUs = (joined.CPU - base.CPU).Seconds()
	self1 := selfCPU()
	tot1, idle1 := machineIdle()
	w := held.At.Sub(joined.At).Seconds()
	r.WindowS = w
	r.ServerRSSJoined = joined.RSS
	r.ServerRSSLoaded = held.RSS
	if base.RSS > 0 && r.Conns > 0 {
		r.RSSPerConn = r.rssPerUnit(base.RSS, held.RSS, float64(r.Conns), "connection", "by the hold's end")
		r.ServerCPUs = (held.CPU - joined.CPU).Seconds() / w
		r.ServerThreads = held.Thread
		atJoin, _ := rssGrowth(base.RSS, joined.RSS, float64(r.Conns))
		r.Notes = append(r.Notes, fmt.Sprintf("RSS per connection right after joining: %s; after the hold: %s",
			rssKiB(atJoin), rssKiB(r.RSSPerConn)))
	}
	r.ClientCPUs = (self1 - self0).Seconds() / w
	if tot1 > tot0 {
		r.MachineBusy = 1 - float64(idle1-idle0)/float64(tot1-tot0)
		r.OtherCPUs = max(0, r.MachineBusy*float64(runtime.NumCPU())-r.ServerCPUs-r.ClientCPUs)
	}
	j := b.join.Summarize()
	r.Join = &j
	d := b.dial.Summarize()
	r.Dial = &d
	b.closeAll()
	_, _, _, _, r.Violations = b.totals()
	r.Events = b.errs.snapshot()
	r.ViolationDetails = b.violations
	return r, nil
}
