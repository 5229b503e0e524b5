package main

import (
	"path/filepath"
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

// TestRSSThatFellIsNotAFigure: RSS growth per connection or per active
// turn is reported only when RSS grew; when it fell (the runtime gave
// freed memory back meanwhile) the difference says nothing about
// connections or turns, and a negative figure is not printed, compared
// or put in the history.
func TestRSSThatFellIsNotAFigure(t *testing.T) {
	tests := []struct {
		name     string
		from, to int64
		n        float64
		want     float64
		ok       bool
	}{
		{"grew", 100 << 20, 110 << 20, 1024, 10 << 10, true},
		{"fell", 120 << 20, 110 << 20, 1000, 0, false},
		{"no sample", 0, 110 << 20, 1000, 0, false},
		{"no units", 100 << 20, 110 << 20, 0, 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := rssGrowth(tt.from, tt.to, tt.n)
			if got != tt.want || ok != tt.ok {
				t.Fatalf("rssGrowth(%d, %d, %v) = %v, %v; want %v, %v", tt.from, tt.to, tt.n, got, ok, tt.want, tt.ok)
			}
		})
	}

	var noted Result
	if per := noted.rssPerUnit(120<<20, 104<<20, 1000, "connection", "while connecting"); per != 0 ||
		len(noted.Notes) != 1 || !strings.Contains(noted.Notes[0], "RSS per connection not measured: RSS fell from 120.0 MiB to 104.0 MiB while connecting") {
		t.Errorf("rssPerUnit of RSS that fell: %v, notes %q", per, noted.Notes)
	}

	// A report of an earlier version holds the negative figure itself.
	r := &Result{Scenario: "cancel", Params: streamParams{Turns: 1000, Rate: 20, Watchers: 1}, ServerRSSBase: 120 << 20,
		ServerRSSJoined: 104 << 20, ServerRSSLoaded: 190 << 20, RSSPerConn: -16.2 * 1024, RSSPerTurn: 90 * 1024}
	var sb strings.Builder
	r.print(&sb)
	if out := sb.String(); strings.Contains(out, "-16.2") || !strings.Contains(out, "not measured per connection, 90.0 KiB per active turn") {
		t.Errorf("report:\n%s", out)
	}
	idle := &Result{Scenario: "idle", Conns: 10, ServerRSSBase: 120 << 20, RSSPerConn: -1024}
	if row := idle.historyRow("2026-01-01", "abc"); strings.Contains(row, "-1.0") || !strings.Contains(row, "RSS per conn not measured") {
		t.Errorf("history row: %s", row)
	}

	dir := t.TempDir()
	write := func(name string, rs ...*Result) string {
		p := filepath.Join(dir, name)
		if err := writeJSON(p, &report{Results: rs}); err != nil {
			t.Fatal(err)
		}
		return p
	}
	newer := *r
	newer.RSSPerConn = 12 * 1024
	var cb strings.Builder
	if err := compare(write("old.json", r), write("new.json", &newer), &cb); err != nil {
		t.Fatal(err)
	}
	if out := cb.String(); strings.Contains(out, "RSS per connection") || !strings.Contains(out, "RSS per active turn") {
		t.Errorf("compare:\n%s", out)
	}
}

func TestParseCPULine(t *testing.T) {
	// user nice system idle iowait irq softirq steal guest guest_nice
	total, idle := parseCPULine("cpu  100 10 50 800 20 0 5 15 40 3")
	if total != 1000 || idle != 835 {
		t.Errorf("total, idle = %d, %d; want 1000, 835 (guest columns are in user and nice already; steal is not busy)", total, idle)
	}
	if total, idle := parseCPULine("cpu"); total != 0 || idle != 0 {
		t.Errorf("an empty line gave %d, %d", total, idle)
	}
}
