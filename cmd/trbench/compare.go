package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
)

// figure is one comparable number of a result, and whether higher is
// better.
type figure struct {
	name   string
	higher bool
	get    func(r *Result) float64
}

var figures = []figure{
	{"delivered tokens/s", true, func(r *Result) float64 { return r.TokensS }},
	{"token→screen p99 ms", false, func(r *Result) float64 { return sumP99(r.Latency) }},
	{"cancel→end p99 ms", false, func(r *Result) float64 { return sumP99(r.Cancel) }},
	{"resume 1st frame p99 ms", false, func(r *Result) float64 { return sumP99(r.Resume) }},
	{"server cores", false, func(r *Result) float64 { return r.ServerCPUs }},
	{"server CPU-s per 1k tokens", false, func(r *Result) float64 { return r.ServerCPUPer1k }},
	{"server bytes allocated per frame", false, func(r *Result) float64 { return r.AllocPerFrame }},
	{"server objects allocated per frame", false, func(r *Result) float64 { return r.ObjectsPerFrame }},
	{"server GC collections", false, func(r *Result) float64 { return r.GCCycles }},
	{"server RSS per connection KiB", false, func(r *Result) float64 { return r.RSSPerConn / 1024 }},
	{"server RSS per active turn KiB", false, func(r *Result) float64 { return r.RSSPerTurn / 1024 }},
	{"highest sustained tokens/s", true, func(r *Result) float64 {
		if r.Best == nil {
			return 0
		}
		return r.Best.TokensS
	}},
}

func sumP99(s *Summary) float64 {
	if s == nil {
		return 0
	}
	return s.P99
}

// compare prints, for each scenario present in both reports (matched by
// scenario and label, in order), new/old of every figure both have.
func compare(oldPath, newPath string, w io.Writer) error {
	load := func(p string) (*report, error) {
		data, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		var r report
		if err := json.Unmarshal(data, &r); err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		return &r, nil
	}
	o, err := load(oldPath)
	if err != nil {
		return err
	}
	n, err := load(newPath)
	if err != nil {
		return err
	}
	used := map[int]bool{}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "scenario\tfigure\told\tnew\tnew/old\t")
	for _, nr := range n.Results {
		var or *Result
		for i, cand := range o.Results {
			if !used[i] && cand.Scenario == nr.Scenario && cand.Label == nr.Label {
				or, used[i] = cand, true
				break
			}
		}
		if or == nil {
			continue
		}
		name := nr.Scenario
		if nr.Label != "" {
			name += " (" + nr.Label + ")"
		}
		for _, f := range figures {
			a, b := f.get(or), f.get(nr)
			if a <= 0 || b <= 0 {
				continue // not measured (every figure is positive when it is)
			}
			verdict := "better"
			if (b > a) != f.higher {
				verdict = "worse"
			}
			if r := b / a; r > 0.97 && r < 1.03 {
				verdict = "same"
			}
			fmt.Fprintf(tw, "%s\t%s\t%.3g\t%.3g\t%.2f×\t%s\n", name, f.name, a, b, b/a, verdict)
		}
	}
	return tw.Flush()
}
