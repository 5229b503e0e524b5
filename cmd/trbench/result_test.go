package main

import (
	"strings"
	"testing"
)

func TestPrintServerGC(t *testing.T) {
	before := map[string]float64{"go_memstats_alloc_bytes_total": 1000, "go_memstats_mallocs_total": 50, "go_gc_duration_seconds_count": 3, "tokenrelay_frames_sent_total": 10}
	after := map[string]float64{"go_memstats_alloc_bytes_total": 301000, "go_memstats_mallocs_total": 2550, "go_gc_duration_seconds_count": 13, "tokenrelay_frames_sent_total": 210}
	r := &Result{Scenario: "stream", WindowS: 20, ServerCounters: counterDelta(before, after)}
	r.setGC()
	var b strings.Builder
	r.print(&b)
	out := b.String()
	if !strings.Contains(out, "10 collections in 20s (one every 2.0s), 1500 bytes in 12.5 objects allocated per frame sent") {
		t.Errorf("no server GC row in:\n%s", out)
	}
	if !strings.Contains(out, "frames_sent_total=200") || strings.Contains(out, "go_memstats") || strings.Contains(out, "go_gc") {
		t.Errorf("server counters should list tokenrelay's counters only:\n%s", out)
	}
}

func TestServerCancelHistogram(t *testing.T) {
	const h = "tokenrelay_cancel_to_end_seconds"
	b := func(le string) string { return h + `_bucket{le="` + le + `"}` }
	// Cumulative buckets: 10 samples before the window, 100 more in it:
	// 60 within 1 ms, 35 in (1, 2] ms, 4 in (2, 16] ms, 1 past 16 ms.
	before := map[string]float64{b("0.001"): 5, b("0.002"): 8, b("0.016"): 10, b("+Inf"): 10}
	after := map[string]float64{b("0.001"): 65, b("0.002"): 103, b("0.016"): 109, b("+Inf"): 110,
		"tokenrelay_sends_total": 7}
	got := bucketDelta(before, after, h)
	want := &BucketSummary{Count: 100, P50: 1, P90: 2, P99: 16}
	if got == nil || *got != *want {
		t.Fatalf("bucketDelta = %+v, want %+v", got, want)
	}
	r := &Result{Scenario: "cancel", Cancel: &Summary{Count: 100}, ServerCancel: got, ServerCounters: counterDelta(before, after)}
	var sb strings.Builder
	r.print(&sb)
	if out := sb.String(); !strings.Contains(out, "gateway: to end") ||
		!strings.Contains(out, "p50 ≤ 1  p90 ≤ 2  p99 ≤ 16 ms  (n=100; the server's histogram)") ||
		strings.Contains(out, "_bucket") {
		t.Errorf("report:\n%s", out)
	}
	// The slowest percent past the largest bound, and no samples at all.
	after[b("0.016")] = 107
	if got := bucketDelta(before, after, h); got.P99 != -1 {
		t.Errorf("p99 past the last bound = %v, want -1", got.P99)
	}
	if got := bucketDelta(before, before, h); got != nil {
		t.Errorf("no samples in the window: %+v, want nil", got)
	}
}
