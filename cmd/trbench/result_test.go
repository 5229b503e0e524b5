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
