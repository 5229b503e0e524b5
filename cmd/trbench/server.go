package main

import (
	"bufio"
	"cmp"
	"context"
	"math"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// serverProbe reads the server's CPU time and memory from /proc (when it
// runs on this machine) and its counters from /metrics.
type serverProbe struct {
	pid        int    // 0: not local
	metricsURL string // "" or unreachable: no counters
	hc         *http.Client
}

// sample reads the server's process; the zero sample when it is not local.
func (sp *serverProbe) sample() procSample {
	if sp.pid == 0 {
		return procSample{At: time.Now()}
	}
	s, err := readProc(sp.pid)
	if err != nil {
		return procSample{At: time.Now()}
	}
	return s
}

// settledRSS samples the server a few times, 200 ms apart, and returns the
// last sample: a moment for the runtime to settle after a burst.
func (sp *serverProbe) settledRSS(ctx context.Context, n int) procSample {
	var s procSample
	for i := range n {
		if i > 0 {
			select {
			case <-time.After(200 * time.Millisecond):
			case <-ctx.Done():
				return s
			}
		}
		s = sp.sample()
	}
	return s
}

// scrape reads /metrics: the tokenrelay_* counters (names ending in
// _total), the buckets of the histograms below and the Go runtime gauges
// below, keyed by name with labels.
func (sp *serverProbe) scrape(ctx context.Context) map[string]float64 {
	if sp.metricsURL == "" {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, sp.metricsURL, nil)
	if err != nil {
		return nil
	}
	resp, err := sp.hc.Do(req)
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		i := strings.LastIndexByte(line, ' ')
		if i < 0 || line[0] == '#' {
			continue
		}
		name := line[:i]
		base, _, _ := strings.Cut(name, "{")
		if !(strings.HasPrefix(base, "tokenrelay_") && strings.HasSuffix(base, "_total")) && !runtimeGauges[base] && !runtimeCounters[base] &&
			!serverHistograms[strings.TrimSuffix(base, "_bucket")] {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err == nil {
			out[name] = v
		}
	}
	return out
}

// runtimeGauges explain where a server's memory goes.
var runtimeGauges = map[string]bool{
	"go_goroutines":                 true,
	"go_memstats_heap_inuse_bytes":  true,
	"go_memstats_stack_inuse_bytes": true,
	"go_memstats_heap_alloc_bytes":  true,
	"go_memstats_heap_objects":      true,
}

// runtimeCounters say how hard the server works its allocator and garbage
// collector: bytes and objects allocated, collections finished.
var runtimeCounters = map[string]bool{
	"go_memstats_alloc_bytes_total": true,
	"go_memstats_mallocs_total":     true,
	"go_gc_duration_seconds_count":  true,
}

// runtimeDelta is the per-unit growth of the runtime gauges from before
// to after, over n units (connections or turns).
func runtimeDelta(before, after map[string]float64, n float64) map[string]float64 {
	if after == nil || n <= 0 {
		return nil
	}
	out := map[string]float64{}
	for k := range runtimeGauges {
		if v, ok := after[k]; ok {
			out[k] = (v - before[k]) / n
		}
	}
	return out
}

// serverHistograms are the server's own measures of a cancel: the
// gateway's from its handler to the end reaching it, and the worker's from
// seeing the cancel to the end going live.
var serverHistograms = map[string]bool{
	"tokenrelay_cancel_to_end_seconds":        true,
	"tokenrelay_worker_cancel_to_end_seconds": true,
}

// BucketSummary is a server histogram over the window: how many samples
// and, for each quantile, the upper bound of the bucket it falls in (ms;
// -1 when it is past the largest finite bound).
type BucketSummary struct {
	Count uint64  `json:"count"`
	P50   float64 `json:"p50_le_ms"`
	P90   float64 `json:"p90_le_ms"`
	P99   float64 `json:"p99_le_ms"`
}

// bucketDelta summarises the growth of histogram name (in seconds) from
// before to after; nil when the server has no such samples in the window.
func bucketDelta(before, after map[string]float64, name string) *BucketSummary {
	type bucket struct{ le, n float64 }
	var bs []bucket
	prefix := name + `_bucket{le="`
	for k, v := range after {
		le, ok := strings.CutPrefix(k, prefix)
		if !ok {
			continue
		}
		le = strings.TrimSuffix(le, `"}`)
		bound, err := strconv.ParseFloat(le, 64) // "+Inf" parses as +Inf
		if err != nil {
			continue
		}
		bs = append(bs, bucket{bound, v - before[k]})
	}
	slices.SortFunc(bs, func(a, b bucket) int { return cmp.Compare(a.le, b.le) })
	if len(bs) == 0 || bs[len(bs)-1].n <= 0 {
		return nil
	}
	total := bs[len(bs)-1].n // buckets are cumulative; the last is +Inf
	q := func(q float64) float64 {
		for _, b := range bs {
			if b.n >= q*total {
				if math.IsInf(b.le, 1) {
					return -1
				}
				return b.le * 1000
			}
		}
		return -1
	}
	return &BucketSummary{Count: uint64(total), P50: q(0.50), P90: q(0.90), P99: q(0.99)}
}

// counterDelta is after − before, non-zero entries only (histogram
// buckets are summarised apart, by bucketDelta).
func counterDelta(before, after map[string]float64) map[string]float64 {
	if after == nil {
		return nil
	}
	out := map[string]float64{}
	for k, v := range after {
		base, _, _ := strings.Cut(k, "{")
		if runtimeGauges[base] || strings.HasSuffix(base, "_bucket") {
			continue
		}
		if d := v - before[k]; d != 0 {
			out[k] = d
		}
	}
	return out
}

// selfCPU is this process's CPU time.
func selfCPU() time.Duration {
	s, err := readProc(os.Getpid())
	if err != nil {
		return 0
	}
	return s.CPU
}
