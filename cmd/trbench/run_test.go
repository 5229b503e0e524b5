package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// TestScenariosAgainstTheServer runs every scenario, briefly, against the
// real binary: the tool's client must see every turn whole (no violation),
// measure what each scenario is for, and meet no error it did not cause.
func TestScenariosAgainstTheServer(t *testing.T) {
	if testing.Short() {
		t.Skip("starts the server and runs load for ~20s")
	}
	p := trtest.Serve(t, "--delta-timestamps", "--limit-sends", "0", "--limit-connections", "0", "--limit-turns", "0", "--limit-new-conversations", "0")
	out := filepath.Join(t.TempDir(), "run.json")
	const short = "warmup=500ms duration=2s"
	args := []string{
		"--url", "ws" + strings.TrimPrefix(p.URL, "http") + "/v1/ws", "--json", out, "-q",
		"-s", "stream turns=20 rate=40 tokens=40 watchers=2 " + short,
		"-s", "cancel turns=20 rate=40 tokens=80 cancel-frac=0.5 " + short,
		"-s", "reconnect turns=10 rate=40 tokens=80 watchers=3 storm-pct=50 storm-every=500ms " + short,
		"-s", "resume turns=10 rate=40 tokens=40 probe-rate=10 long=300 long-secs=1 long-probes=2 " + short,
		"-s", "idle conns=50 hold=1s",
		"-s", "idle conns=20 hold=1s compat=true",
	}
	rep, stdout := runReport(t, 3*time.Minute, out, args)
	if len(rep.Results) != 6 {
		t.Fatalf("%d results, want 6", len(rep.Results))
	}
	count := func(s *Summary) uint64 {
		if s == nil {
			return 0
		}
		return s.Count
	}
	for i, r := range rep.Results {
		name := r.Scenario
		if r.Violations != (Violations{}) {
			t.Errorf("%s: violations %+v: %v", name, r.Violations, r.ViolationDetails)
		}
		if r.ConnFailures != 0 {
			t.Errorf("%s: %d connections failed", name, r.ConnFailures)
		}
		for ev, n := range r.Events {
			for _, bad := range []string{"dial", "welcome", "connection ended", "server error", "client:", "resumes after"} {
				if strings.HasPrefix(ev, bad) {
					t.Errorf("%s: event %q ×%d", name, ev, n)
				}
			}
		}
		switch i {
		case 0, 1, 2, 3:
			if r.DeltasS <= 0 || count(r.Latency) == 0 {
				t.Errorf("%s: %.0f deltas/s, %d latency samples", name, r.DeltasS, count(r.Latency))
			}
		case 4, 5:
			if want := []int{50, 20}[i-4]; r.Conns != want || count(r.Join) != uint64(want) {
				t.Errorf("%s: %d connections, %d joins, want %d", name, r.Conns, count(r.Join), want)
			}
		}
		switch i {
		case 1:
			if count(r.Cancel) == 0 || r.ServerCancel == nil || r.WorkerCancel == nil {
				t.Errorf("cancel: measured %d cancels; the server's histograms: %+v, %+v", count(r.Cancel), r.ServerCancel, r.WorkerCancel)
			}
		case 2, 3:
			if count(r.Resume) == 0 {
				t.Errorf("%s: no resume measured", name)
			}
		}
	}
	if len(rep.Results[3].Long) == 0 {
		t.Errorf("resume: no long-turn rows")
	}
	if t.Failed() {
		t.Logf("report:\n%s", stdout)
	}
}

// runReport runs trbench with args, which write the JSON report to out,
// and returns the report and what trbench printed.
func runReport(t *testing.T, timeout time.Duration, out string, args []string) (report, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	if err := run(ctx, args, func(string) string { return "" }, &stdout, &stderr); err != nil {
		t.Fatalf("trbench: %v\n%s", err, stderr.String())
	}
	data, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var rep report
	if err := json.Unmarshal(data, &rep); err != nil {
		t.Fatal(err)
	}
	return rep, stdout.String()
}

// TestPIDMustBeAProcess: --pid names the process whose CPU and RSS are
// read; one that cannot be read stops the run at once instead of leaving
// every server figure out.
func TestPIDMustBeAProcess(t *testing.T) {
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Skip("no true(1):", err)
	}
	gone := cmd.Process.Pid
	var stdout, stderr bytes.Buffer
	err := run(context.Background(), []string{"--url", "ws://127.0.0.1:1/v1/ws", "--pid", strconv.Itoa(gone), "-q", "-s", "stream turns=1 duration=1s warmup=0s"},
		func(string) string { return "" }, &stdout, &stderr)
	if err == nil || !strings.Contains(err.Error(), "--pid "+strconv.Itoa(gone)) {
		t.Fatalf("run with the pid of no process: %v", err)
	}
}
