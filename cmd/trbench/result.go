package main

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// Result is one scenario's measurements, as printed and as written to the
// JSON report.
type Result struct {
	Scenario string       `json:"scenario"`
	Label    string       `json:"label,omitempty"`
	Params   streamParams `json:"params"`
	Started  time.Time    `json:"started"`
	WindowS  float64      `json:"window_s"`

	Conns        int     `json:"connections"`
	ConnFailures int64   `json:"connection_failures"`
	SetupS       float64 `json:"setup_s"`

	TurnsSent     int64   `json:"turns_sent"`
	AvgActive     float64 `json:"avg_active_turns"`
	OfferedTokS   float64 `json:"offered_tokens_per_s"`   // sim rate × active turns
	DeltasS       float64 `json:"delivered_deltas_per_s"` // seqs applied by all connections
	TokensS       float64 `json:"delivered_tokens_per_s"` // deltas × tokens per delta
	FramesS       float64 `json:"frames_per_s"`
	DeltaFramesS  float64 `json:"delta_frames_per_s"` // turn.delta frames; deltas ÷ these = merging by the server
	BytesS        float64 `json:"bytes_per_s"`
	TokensPerDelt float64 `json:"tokens_per_delta"`
	KeepUp        float64 `json:"keep_up"` // delivered tokens / (offered × watchers)

	Latency *Summary `json:"token_to_screen,omitempty"`
	Cancel  *Summary `json:"cancel_to_end,omitempty"`
	// ServerCancel and WorkerCancel are the server's own histograms of
	// the window's cancels (see serverHistograms): the gateway's from its
	// handler to the cancel's answer, the worker's from seeing the cancel
	// to the end going live.
	ServerCancel *BucketSummary `json:"server_cancel_to_end,omitempty"`
	WorkerCancel *BucketSummary `json:"worker_cancel_to_end,omitempty"`
	Resume       *Summary       `json:"resume_first_frame,omitempty"`
	Join         *Summary       `json:"join_first_frame,omitempty"`
	Dial         *Summary       `json:"dial,omitempty"`

	Violations Violations       `json:"violations"`
	Events     map[string]int64 `json:"events,omitempty"` // errors, closes, notes

	ServerCPUs      float64 `json:"server_cores"`
	ServerCPUPer1k  float64 `json:"server_cpu_s_per_1k_tokens"`
	ServerRSSBase   int64   `json:"server_rss_base_bytes"`
	ServerRSSJoined int64   `json:"server_rss_joined_bytes"`
	ServerRSSLoaded int64   `json:"server_rss_loaded_bytes"`
	RSSPerConn      float64 `json:"server_rss_per_connection_bytes"`  // 0: not measured (RSS fell; see notes)
	RSSPerTurn      float64 `json:"server_rss_per_active_turn_bytes"` // 0: not measured (RSS fell; see notes)
	ServerThreads   int     `json:"server_threads"`
	ClientCPUs      float64 `json:"client_cores"`
	MachineBusy     float64 `json:"machine_busy"` // 0..1 over all cores
	OtherCPUs       float64 `json:"other_cores"`  // busy cores used by neither the server nor the tool

	ServerCounters map[string]float64 `json:"server_counters,omitempty"`
	// GCCycles is how many collections the server finished in the window,
	// AllocPerFrame the bytes it allocated per frame it sent, and
	// ObjectsPerFrame the objects.
	GCCycles        float64 `json:"server_gc_cycles,omitempty"`
	AllocPerFrame   float64 `json:"server_alloc_bytes_per_frame,omitempty"`
	ObjectsPerFrame float64 `json:"server_alloc_objects_per_frame,omitempty"`
	// RuntimePer is the growth of the server's Go runtime gauges per
	// connection (idle) or per active turn (stream), from /metrics.
	RuntimePer map[string]float64 `json:"server_runtime_per_unit,omitempty"`
	SetupCPUs  float64            `json:"server_setup_cpu_s,omitempty"` // server CPU seconds spent connecting and joining

	Long  []LongRow `json:"long_turns,omitempty"`
	Steps []*Result `json:"ramp_steps,omitempty"`
	Best  *RampBest `json:"ramp_best,omitempty"`
	Notes []string  `json:"notes,omitempty"`
	// ViolationDetails are the first violations, with the frames the
	// connection saw before each.
	ViolationDetails []string `json:"violation_details,omitempty"`
}

// LongRow is one resume measurement on a long turn.
type LongRow struct {
	Tokens    int      `json:"tokens"`
	State     string   `json:"state"` // running or finished
	Join      string   `json:"join"`  // "no after" or "after"
	FirstMS   Summary  `json:"first_frame"`
	FrameKiB  float64  `json:"joined_frame_kib"`
	CatchUpMS *Summary `json:"to_turn_end,omitempty"`
}

// RampBest is the highest ramp step that met the target.
type RampBest struct {
	Turns   int     `json:"turns"`
	TokensS float64 `json:"delivered_tokens_per_s"`
	P99MS   float64 `json:"p99_ms"`
}

func kib(b float64) string { return fmt.Sprintf("%.1f KiB", b/1024) }

// rssKiB prints an RSS growth per unit; 0 (or, in an older report, a
// negative figure) is none: RSS fell (see rssGrowth and the notes).
func rssKiB(b float64) string {
	if b <= 0 {
		return "not measured"
	}
	return kib(b)
}

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

func sumLine(s *Summary) string {
	if s == nil || s.Count == 0 {
		return "-"
	}
	return fmt.Sprintf("p50 %.2f  p99 %.2f  max %.2f ms  (n=%d)", s.P50, s.P99, s.Max, s.Count)
}

// bucketLine prints a server histogram's quantiles as the bucket bounds
// they fall under.
func bucketLine(b *BucketSummary) string {
	le := func(ms float64) string {
		if ms < 0 {
			return "over the largest bucket"
		}
		return "≤ " + strconv.FormatFloat(ms, 'g', 4, 64)
	}
	return fmt.Sprintf("p50 %s  p90 %s  p99 %s ms  (n=%d; the server's histogram)", le(b.P50), le(b.P90), le(b.P99), b.Count)
}

// print writes r as a human table.
func (r *Result) print(w io.Writer) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	title := r.Scenario
	if r.Label != "" {
		title += " (" + r.Label + ")"
	}
	fmt.Fprintf(tw, "== %s\n", title)
	p := r.Params
	row := func(k, f string, a ...any) { fmt.Fprintf(tw, "  %s\t"+f+"\n", append([]any{k}, a...)...) }
	if r.Scenario == "ramp" {
		row("load", "steps of N conversations × %d watcher(s), %g tok/s per turn, %d tokens/turn", p.Watchers, p.Rate, p.Tokens)
		r.printRamp(row)
		r.printRest(row)
		tw.Flush()
		return
	}
	if r.Scenario != "idle" && p.Turns > 0 {
		row("load", "%d conversations × %d watcher(s), %g tok/s per turn, %d tokens/turn, window %.0fs", p.Turns, p.Watchers, p.Rate, p.Tokens, r.WindowS)
	}
	proto := ""
	if p.Protocol != "" {
		proto = " " + p.Protocol
	}
	row("connections", "%d%s (failed %d, setup %.1fs)", r.Conns, proto, r.ConnFailures, r.SetupS)
	if r.TurnsSent > 0 || r.Scenario == "floor" {
		if r.Scenario != "floor" {
			row("turns", "%d sent, %.0f active on average; offered %.0f tok/s", r.TurnsSent, r.AvgActive, r.OfferedTokS)
		}
		row("delivered", "%.0f deltas/s in %.0f delta frames/s, %.0f tokens/s (%.2f tok/delta), %.0f frames/s, %s/s; keep-up %.1f%%",
			r.DeltasS, r.DeltaFramesS, r.TokensS, r.TokensPerDelt, r.FramesS, kib(r.BytesS), 100*r.KeepUp)
	}
	if r.Latency != nil {
		row("token→screen", "%s", sumLine(r.Latency))
	}
	if r.Cancel != nil {
		row("cancel→end", "%s", sumLine(r.Cancel))
	}
	if b := r.ServerCancel; b != nil {
		row("  gateway: to end", "%s", bucketLine(b))
	}
	if b := r.WorkerCancel; b != nil {
		row("  worker: to live", "%s", bucketLine(b))
	}
	if r.Resume != nil {
		row("resume→1st frame", "%s", sumLine(r.Resume))
	}
	if r.Join != nil {
		row("join→1st frame", "%s", sumLine(r.Join))
	}
	if r.Dial != nil {
		row("ws dial", "%s", sumLine(r.Dial))
	}
	v := r.Violations
	row("violations", "%d (gaps %d, dups %d, double ends %d, after end %d, end seq low %d, unknown turn %d, missing ends %d)",
		v.Total(), v.Gaps, v.Dups, v.DoubleEnds, v.AfterEnd, v.EndSeq, v.Unknown, v.MissingEnds)
	if r.ServerRSSBase > 0 {
		row("server", "%.2f cores, %.3f CPU-s per 1k tokens, RSS %s → %s joined → %s loaded, %d threads",
			r.ServerCPUs, r.ServerCPUPer1k, mib(r.ServerRSSBase), mib(r.ServerRSSJoined), mib(r.ServerRSSLoaded), r.ServerThreads)
		row("server RSS", "%s per connection, %s per active turn", rssKiB(r.RSSPerConn), rssKiB(r.RSSPerTurn))
	}
	row("client", "%.2f cores; machine busy %.0f%%, other processes %.2f cores", r.ClientCPUs, 100*r.MachineBusy, r.OtherCPUs)
	for _, l := range r.Long {
		extra := ""
		if l.CatchUpMS != nil {
			extra = fmt.Sprintf("; to turn.end p50 %.2f p99 %.2f ms", l.CatchUpMS.P50, l.CatchUpMS.P99)
		}
		row(fmt.Sprintf("long %d %s", l.Tokens, l.State), "join %-8s first frame p50 %.2f p99 %.2f max %.2f ms, joined %.1f KiB%s",
			l.Join, l.FirstMS.P50, l.FirstMS.P99, l.FirstMS.Max, l.FrameKiB, extra)
	}
	r.printRamp(row)
	r.printRest(row)
	tw.Flush()
}

func (r *Result) printRamp(row func(k, f string, a ...any)) {
	for _, s := range r.Steps {
		lat := s.Latency
		if lat == nil {
			lat = &Summary{}
		}
		row(fmt.Sprintf("step %d turns", s.Params.Turns), "%.0f tok/s delivered (keep-up %.1f%%, %.2f tok/delta), p50 %.2f p99 %.2f max %.2f ms, server %.2f cores (%.3f CPU-s/1k tok), tool %.2f, others %.2f, violations %d",
			s.TokensS, 100*s.KeepUp, s.TokensPerDelt, lat.P50, lat.P99, lat.Max, s.ServerCPUs, s.ServerCPUPer1k, s.ClientCPUs, s.OtherCPUs, s.Violations.Total())
	}
	if r.Best != nil {
		row("highest sustained", "%d turns: %.0f tok/s delivered, p99 %.2f ms", r.Best.Turns, r.Best.TokensS, r.Best.P99MS)
	}
}

// setGC fills GCCycles, AllocPerFrame and ObjectsPerFrame from
// ServerCounters.
func (r *Result) setGC() {
	r.GCCycles = r.ServerCounters["go_gc_duration_seconds_count"]
	if f := r.ServerCounters["tokenrelay_frames_sent_total"]; f > 0 {
		r.AllocPerFrame = r.ServerCounters["go_memstats_alloc_bytes_total"] / f
		r.ObjectsPerFrame = r.ServerCounters["go_memstats_mallocs_total"] / f
	}
}

func (r *Result) printRest(row func(k, f string, a ...any)) {
	for _, k := range slices.Sorted(maps.Keys(r.Events)) {
		row("event", "%s: %d", k, r.Events[k])
	}
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(r.ServerCounters)) {
		if base, _, _ := strings.Cut(k, "{"); !runtimeCounters[base] {
			parts = append(parts, fmt.Sprintf("%s=%g", strings.TrimPrefix(k, "tokenrelay_"), r.ServerCounters[k]))
		}
	}
	if len(parts) > 0 {
		row("server counters", "%s", strings.Join(parts, " "))
	}
	if r.GCCycles > 0 {
		row("server GC", "%.0f collections in %.0fs (one every %.1fs), %.0f bytes in %.1f objects allocated per frame sent",
			r.GCCycles, r.WindowS, r.WindowS/r.GCCycles, r.AllocPerFrame, r.ObjectsPerFrame)
	}
	if len(r.RuntimePer) > 0 {
		unit := "active turn"
		if r.Scenario == "idle" {
			unit = "connection"
		}
		row("server runtime", "per %s: %.2f goroutines, heap in use %s, stacks %s, %.0f heap objects", unit,
			r.RuntimePer["go_goroutines"], kib(r.RuntimePer["go_memstats_heap_inuse_bytes"]),
			kib(r.RuntimePer["go_memstats_stack_inuse_bytes"]), r.RuntimePer["go_memstats_heap_objects"])
	}
	if r.SetupCPUs > 0 {
		row("server setup", "%.2f CPU-s to connect and join %d connections (%.0f µs each)", r.SetupCPUs, r.Conns, 1e6*r.SetupCPUs/float64(max(r.Conns, 1)))
	}
	for _, n := range r.Notes {
		row("note", "%s", n)
	}
	for _, d := range r.ViolationDetails {
		row("violation", "%s", d)
	}
}

// historyRow is r as a row of docs/benchmarks.md's history table:
// | date | commit | scenario | figures | ratio |.
func (r *Result) historyRow(date, commit string) string {
	name := r.Scenario
	if r.Label != "" {
		name += " (" + r.Label + ")"
	}
	var f []string
	p := r.Params
	switch r.Scenario {
	case "idle":
		proto := ""
		if p.Protocol != "" {
			proto = p.Protocol + " "
		}
		if r.RSSPerConn > 0 {
			f = append(f, fmt.Sprintf("%d %sconns, %s/conn", r.Conns, proto, kib(r.RSSPerConn)))
		} else {
			f = append(f, fmt.Sprintf("%d %sconns, RSS per conn not measured", r.Conns, proto))
		}
	case "ramp":
		if r.Best != nil {
			f = append(f, fmt.Sprintf("best %d×%g tok/s ×%dw: %.0f tok/s p99 %.1f ms", r.Best.Turns, p.Rate, p.Watchers, r.Best.TokensS, r.Best.P99MS))
		} else {
			f = append(f, "no step met the target")
		}
	default:
		f = append(f, fmt.Sprintf("%d×%g tok/s ×%dw", p.Turns, p.Rate, p.Watchers))
		if r.Latency != nil {
			f = append(f, fmt.Sprintf("p99 %.1f ms", r.Latency.P99))
		}
		f = append(f, fmt.Sprintf("%.0f tok/s", r.TokensS))
		if r.ServerCPUs > 0 {
			f = append(f, fmt.Sprintf("%.2f cores", r.ServerCPUs))
		}
		if r.Cancel != nil && r.Cancel.Count > 0 {
			f = append(f, fmt.Sprintf("cancel p99 %.1f ms", r.Cancel.P99))
		}
		if r.Resume != nil && r.Resume.Count > 0 {
			f = append(f, fmt.Sprintf("resume p99 %.1f ms", r.Resume.P99))
		}
	}
	f = append(f, fmt.Sprintf("violations %d", r.Violations.Total()))
	if r.OtherCPUs > 0.3 {
		f = append(f, fmt.Sprintf("disturbed: others %.2f cores", r.OtherCPUs))
	}
	return fmt.Sprintf("| %s | %s | %s | %s | — |", date, commit, name, strings.Join(f, ", "))
}

// rssGrowth is the server's RSS growth from from to to per unit (a
// connection, an active turn), in bytes. ok is false when there is no
// such figure: no sample, no unit, or RSS fell, the Go runtime having
// handed freed memory back to the OS meanwhile (more than the units
// took), so that the difference says nothing about the units.
func rssGrowth(from, to int64, n float64) (per float64, ok bool) {
	if from <= 0 || to < from || n <= 0 {
		return 0, false
	}
	return float64(to-from) / n, true
}

// rssPerUnit is rssGrowth for r: when RSS fell over span it says so in a
// note and gives 0, which the report prints as not measured.
func (r *Result) rssPerUnit(from, to int64, n float64, unit, span string) float64 {
	per, ok := rssGrowth(from, to, n)
	if !ok && from > 0 && to > 0 && n > 0 {
		r.Notes = append(r.Notes, fmt.Sprintf("RSS per %s not measured: RSS fell from %s to %s %s (the Go runtime handed freed memory back to the OS), so the difference says nothing about the %ss",
			unit, mib(from), mib(to), span, unit))
	}
	return per
}
