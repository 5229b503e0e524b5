package main

import (
	"bufio"
	"context"
	"net/http"
	"os"
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
// _total) and the Go runtime gauges below, keyed by name with labels.
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
		if !(strings.HasPrefix(base, "tokenrelay_") && strings.HasSuffix(base, "_total")) && !runtimeGauges[base] && !runtimeCounters[base] {
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

// counterDelta is after − before, non-zero entries only.
func counterDelta(before, after map[string]float64) map[string]float64 {
	if after == nil {
		return nil
	}
	out := map[string]float64{}
	for k, v := range after {
		base, _, _ := strings.Cut(k, "{")
		if runtimeGauges[base] {
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
