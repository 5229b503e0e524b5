package main

import (
	"context"
	"fmt"
	"time"
)

// runLong measures resume cost against answer length: for each length it
// runs one turn of that many tokens (over about secs seconds) and, while it
// runs past half way and again once it has finished, opens probe
// connections that join without after (history 1: the whole answer so far
// comes in one frame) and with after (only the tail should come).
func runLong(ctx context.Context, e *env, lengths []int, secs float64, probes int, r *Result) error {
	b := newBench(e.cfg, e.d, e.nextRunID())
	defer func() {
		b.closeAll()
		_, _, _, _, v := b.totals()
		r.Violations.Add(v)
		r.ViolationDetails = append(r.ViolationDetails, b.violations...)
		if r.Events == nil {
			r.Events = map[string]int64{}
		}
		for k, n := range b.errs.snapshot() {
			r.Events["long: "+k] += n
		}
	}()
	rows := &r.Long
	one := 1
	for _, n := range lengths {
		rate := float64(n) / secs
		cs := &convState{b: b, id: fmt.Sprintf("l-%s-%d", b.runID, n), ev: make(chan convEvent, 8)}
		ends := make(chan string, 4)
		s, err := b.connect(ctx, connOpts{conv: cs, sender: true, ends: ends})
		if err != nil {
			return err
		}
		cs.conns = []*conn{s}
		if _, err := s.join(ctx, cs.id, nil, zeroHistory); err != nil {
			return fmt.Errorf("long %d: join: %w", n, err)
		}
		turn := fmt.Sprintf("t-%s-%d", b.runID, n)
		cs.turn.Store(&turn)
		e.logf("resume: a %d-token turn at %.0f tok/s", n, rate)
		text := fmt.Sprintf("[sim tokens=%d rate=%g] trbench long %s", n, rate, b.runID)
		if err := s.write(ctx, clientFrame{Type: "send", ID: "s", ConversationID: cs.id, Text: text, MessageID: "m" + turn[1:], TurnID: turn}); err != nil {
			return err
		}
		ended := false
		deadline := time.Now().Add(time.Duration(secs*float64(time.Second)) + 120*time.Second)
		for cs.seq.Load() < int64(n/2) && time.Now().Before(deadline) && !ended {
			select {
			case <-ends:
				ended = true
			case <-time.After(5 * time.Millisecond):
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		measure := func(state string) {
			var fresh, resume, catch Histogram
			var freshBytes, resumeBytes int
			for range probes {
				c, err := b.connect(ctx, connOpts{})
				if err != nil {
					continue
				}
				ji, err := c.join(ctx, cs.id, nil, &one)
				c.close()
				c.trk.Abandon()
				if err != nil {
					b.count("long probe: " + shortErr(err))
					continue
				}
				fresh.Record(ji.ttff.Microseconds())
				freshBytes += ji.bytes

				have := max(cs.seq.Load()-10, 1)
				trk := NewTracker()
				trk.Snapshot(turn, 0, have)
				pe := make(chan string, 2)
				c, err = b.connect(ctx, connOpts{trk: trk, ends: pe})
				if err != nil {
					continue
				}
				t0 := time.Now()
				ji, err = c.join(ctx, cs.id, &after{TurnID: turn, Seq: have}, zeroHistory)
				if err == nil && state == "finished" {
					select {
					case <-pe:
						catch.Record(time.Since(t0).Microseconds())
					case <-time.After(10 * time.Second):
						b.count("long probe: no turn.end after resuming a finished turn")
					}
				}
				c.close()
				trk.Abandon()
				if err != nil {
					b.count("long probe: " + shortErr(err))
					continue
				}
				resume.Record(ji.ttff.Microseconds())
				resumeBytes += ji.bytes
			}
			kb := func(total int, h *Histogram) float64 {
				if h.Count() == 0 {
					return 0
				}
				return float64(total) / float64(h.Count()) / 1024
			}
			*rows = append(*rows, LongRow{Tokens: n, State: state, Join: "no after", FirstMS: fresh.Summarize(), FrameKiB: kb(freshBytes, &fresh)})
			row := LongRow{Tokens: n, State: state, Join: "after", FirstMS: resume.Summarize(), FrameKiB: kb(resumeBytes, &resume)}
			if catch.Count() > 0 {
				s := catch.Summarize()
				row.CatchUpMS = &s
			}
			*rows = append(*rows, row)
		}
		if !ended {
			measure("running")
			select {
			case <-ends:
			case <-time.After(time.Until(deadline)):
				b.count(fmt.Sprintf("long %d: no turn.end", n))
			case <-ctx.Done():
				return ctx.Err()
			}
		} else {
			b.count(fmt.Sprintf("long %d: ended before half way; no running probe", n))
		}
		measure("finished")
		s.close()
	}
	for k, v := range b.errs.snapshot() {
		e.logf("resume: %s: %d", k, v)
	}
	return nil
}
