// Command trbench is tokenrelay's load generator: it drives a running
// server over real WebSockets with LLM-shaped traffic (many idle joined
// tabs, many concurrent token streams with watchers, reconnect storms,
// cancels, resumes of long answers), checks every connection against the
// delivery rules of PROTOCOL.md, and reports throughput, token-to-screen
// latency and the server's CPU and memory. See docs/benchmarks.md.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "trbench:", err)
		os.Exit(1)
	}
}

// config is every flag; a -s spec overrides some of them for one scenario.
type config struct {
	URL             string
	Token           string
	PID             int
	SrcIPs          int
	DialConcurrency int
	Scenarios       string
	Specs           specList
	JSON            string
	History         bool
	Label           string
	Quiet           bool
	PprofURL        string
	SelfProfile     string
	PprofOut        string

	IdleConns  int
	IdleHold   time.Duration
	IdleCompat bool

	Turns      int
	Rate       float64
	Tokens     int
	Watchers   int
	Warmup     time.Duration
	Duration   time.Duration
	CancelFrac float64
	StormPct   float64
	StormEvery time.Duration
	ProbeRate  float64
	Long       string
	LongSecs   float64
	LongProbes int
	Ramp       string
	P99Target  time.Duration
	MaxOthers  float64
}

type specList []string

func (s *specList) String() string     { return strings.Join(*s, "; ") }
func (s *specList) Set(v string) error { *s = append(*s, v); return nil }

// bindScenarioFlags binds the flags a -s spec may override.
func bindScenarioFlags(fs *flag.FlagSet, c *config) {
	fs.IntVar(&c.IdleConns, "conns", c.IdleConns, "idle: connections, each joined to its own conversation")
	fs.DurationVar(&c.IdleHold, "hold", c.IdleHold, "idle: how long the connections stay open after joining; CPU is measured over it and RSS at its end (the default outlasts several server pings and the Go runtime's two-minute forced collection, so RSS is the steady state)")
	fs.BoolVar(&c.IdleCompat, "compat", c.IdleCompat, "idle: connect with the legacy /ws/chat protocol (COMPAT.md) instead, each to its own session, and wait for welcome")
	fs.IntVar(&c.Turns, "turns", c.Turns, "concurrent turns: conversations, each running one turn after another")
	fs.Float64Var(&c.Rate, "rate", c.Rate, "tokens per second per turn ([sim rate=R])")
	fs.IntVar(&c.Tokens, "tokens", c.Tokens, "tokens per turn (0: rate × 5 s, at least 20)")
	fs.IntVar(&c.Watchers, "watchers", c.Watchers, "connections joined per conversation; the first of them sends")
	fs.DurationVar(&c.Warmup, "warmup", c.Warmup, "load before the measured window")
	fs.DurationVar(&c.Duration, "duration", c.Duration, "measured window")
	fs.Float64Var(&c.CancelFrac, "cancel-frac", c.CancelFrac, "cancel: fraction of turns cancelled at a random point")
	fs.Float64Var(&c.StormPct, "storm-pct", c.StormPct, "reconnect: % of non-sender watchers dropped per storm")
	fs.DurationVar(&c.StormEvery, "storm-every", c.StormEvery, "reconnect: storm period")
	fs.Float64Var(&c.ProbeRate, "probe-rate", c.ProbeRate, "resume: resume probes per second under load")
	fs.StringVar(&c.Long, "long", c.Long, "resume: long-turn lengths in tokens (comma separated; empty: none)")
	fs.Float64Var(&c.LongSecs, "long-secs", c.LongSecs, "resume: seconds each long turn takes to stream")
	fs.IntVar(&c.LongProbes, "long-probes", c.LongProbes, "resume: probes per long turn, state and join kind")
	fs.StringVar(&c.Ramp, "ramp", c.Ramp, "ramp: concurrent-turn steps (comma separated)")
	fs.DurationVar(&c.P99Target, "p99", c.P99Target, "ramp: token-to-screen p99 a step must stay within")
	fs.Float64Var(&c.MaxOthers, "max-others", c.MaxOthers, "ramp: re-run a step (twice at most) when other processes used more cores than this (0: never)")
	fs.StringVar(&c.Label, "label", c.Label, "label printed with the results (e.g. \"batch 20ms\")")
}

const usage = `trbench drives a running tokenrelay with LLM-shaped load.

Scenarios (--scenarios a,b or repeated -s "name flag=value ..."):
  idle       --conns N idle connections, each joined to its own conversation
             (--compat: on the legacy /ws/chat protocol, each welcomed to its own session)
  stream     --turns M conversations × --watchers W, one turn at a time at --rate tok/s
  cancel     stream, cancelling --cancel-frac of turns at a random point
  reconnect  stream, dropping --storm-pct % of watchers every --storm-every; they resume
  resume     stream with --probe-rate resume probes/s, then long turns (--long)
  ramp       stream steps of --ramp turns until p99 > --p99, keep-up < 95% or a violation
  floor      the stream's deltas (--turns × --watchers at --rate) from a server that only
             writes them (trbench itself, as a child process): the machine's floor
             under the server's CPU, to run beside a stream

Examples:
  trbench --url ws://127.0.0.1:18282/v1/ws --scenarios idle --conns 10000
  trbench --scenarios stream,cancel,resume --turns 1000 --rate 20 --json out.json
  trbench -s "ramp watchers=10 ramp=50,100,200" -s "stream turns=100 watchers=10"
  trbench compare old.json new.json      # ratios of two runs' figures
  trbench show run.json                  # print a JSON report again

Flags:
`

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "compare" {
		if len(args) != 3 {
			return errors.New("usage: trbench compare OLD.json NEW.json")
		}
		return compare(args[1], args[2], stdout)
	}
	if len(args) > 0 && args[0] == floorServeArg {
		return floorServe(os.Stdin, stdout)
	}
	if len(args) > 0 && args[0] == "show" {
		for _, p := range args[1:] {
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			var rep report
			if err := json.Unmarshal(data, &rep); err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
			for _, r := range rep.Results {
				r.print(stdout)
				fmt.Fprintln(stdout)
			}
		}
		return nil
	}
	cfg := &config{
		URL: "ws://127.0.0.1:8080/v1/ws", DialConcurrency: 128,
		IdleConns: 10000, IdleHold: 150 * time.Second,
		Turns: 1000, Rate: 20, Watchers: 1, Warmup: 8 * time.Second, Duration: 20 * time.Second,
		CancelFrac: 1, StormPct: 10, StormEvery: 2 * time.Second, ProbeRate: 20,
		Long: "1000,10000,100000", LongSecs: 10, LongProbes: 20,
		Ramp: "50,100,200,400,800,1200,1600", P99Target: 100 * time.Millisecond, MaxOthers: 0.3,
	}
	if v := getenv("TRBENCH_URL"); v != "" {
		cfg.URL = v
	}
	fs := flag.NewFlagSet("trbench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, usage)
		fs.PrintDefaults()
	}
	fs.StringVar(&cfg.URL, "url", cfg.URL, "server WebSocket URL (env TRBENCH_URL)")
	fs.StringVar(&cfg.Token, "token", getenv("TRBENCH_TOKEN"), "JWT sent as Bearer (env TRBENCH_TOKEN; none in dev mode)")
	fs.IntVar(&cfg.PID, "pid", 0, "server process id for CPU and RSS (0: find the local process listening on the URL's port)")
	fs.IntVar(&cfg.SrcIPs, "src-ips", 1, "spread client source addresses over 127.0.0.1..N (beyond ~28k connections)")
	fs.IntVar(&cfg.DialConcurrency, "dial-concurrency", cfg.DialConcurrency, "connections dialled at once")
	fs.StringVar(&cfg.Scenarios, "scenarios", "", "comma-separated scenarios run with the flags as given")
	fs.Var(&cfg.Specs, "s", "a scenario with its own flags, e.g. \"stream turns=500 watchers=10\" (repeatable)")
	fs.StringVar(&cfg.JSON, "json", "", "also write the results as JSON to this file")
	fs.BoolVar(&cfg.History, "history", false, "print rows for the history table of docs/benchmarks.md")
	fs.BoolVar(&cfg.Quiet, "q", false, "no progress lines")
	fs.StringVar(&cfg.PprofURL, "pprof", "", "server debug address (tokenrelay --debug-addr), e.g. http://127.0.0.1:6060: take a CPU profile over each measured window")
	fs.StringVar(&cfg.SelfProfile, "cpuprofile", "", "write trbench's own CPU profile to this file")
	fs.StringVar(&cfg.PprofOut, "pprof-out", "trbench", "CPU profiles go to <this>-<scenario>-<n>.pb.gz")
	bindScenarioFlags(fs, cfg)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	var runs []*config
	for _, name := range strings.Split(cfg.Scenarios, ",") {
		if name = strings.TrimSpace(name); name != "" {
			c := *cfg
			c.Scenarios = name
			runs = append(runs, &c)
		}
	}
	for _, spec := range cfg.Specs {
		f := strings.Fields(spec)
		if len(f) == 0 {
			continue
		}
		c := *cfg
		c.Scenarios = f[0]
		sfs := flag.NewFlagSet(f[0], flag.ContinueOnError)
		sfs.SetOutput(stderr)
		bindScenarioFlags(sfs, &c)
		var sargs []string
		for _, kv := range f[1:] {
			sargs = append(sargs, "-"+kv)
		}
		if err := sfs.Parse(sargs); err != nil {
			return fmt.Errorf("scenario %q: %w", spec, err)
		}
		runs = append(runs, &c)
	}
	if len(runs) == 0 {
		fs.Usage()
		return errors.New("no scenario: pass --scenarios or -s")
	}
	for _, c := range runs {
		switch c.Scenarios {
		case "idle", "stream", "cancel", "reconnect", "resume", "ramp", "floor":
		default:
			return fmt.Errorf("unknown scenario %q", c.Scenarios)
		}
	}

	if cfg.SelfProfile != "" {
		f, err := os.Create(cfg.SelfProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	nofile := raiseNoFile()
	d, err := newDialer(cfg.URL, cfg.Token, cfg.SrcIPs)
	if err != nil {
		return err
	}
	e := &env{cfg: cfg, d: d, stderr: stderr, quiet: cfg.Quiet, runBase: strconv.FormatInt(time.Now().Unix()%1e6, 36)}
	u, _ := url.Parse(cfg.URL)
	e.server = &serverProbe{pid: cfg.PID, hc: &http.Client{Timeout: 5 * time.Second}}
	scheme := "http"
	if u.Scheme == "wss" {
		scheme = "https"
	}
	e.server.metricsURL = scheme + "://" + u.Host + "/metrics"
	if e.server.pid != 0 {
		// A pid that cannot be read would leave every server figure out.
		if _, err := readProc(e.server.pid); err != nil {
			return fmt.Errorf("--pid %d: %w", e.server.pid, err)
		}
	}
	if e.server.pid == 0 {
		if ip := net.ParseIP(u.Hostname()); u.Hostname() == "localhost" || (ip != nil && ip.IsLoopback()) {
			port, _ := strconv.Atoi(u.Port())
			if port == 0 {
				port = 80
			}
			e.server.pid = findPIDByPort(port)
		}
	}
	if e.server.pid == 0 {
		e.logf("server process not found: no CPU or RSS figures (pass --pid)")
	}

	rep := report{Machine: describeMachine(), URL: cfg.URL, ServerPID: e.server.pid, Args: args}
	rep.Machine.NoFile = nofile
	for _, c := range runs {
		e.cfg = c
		res, err := runOne(ctx, e, c)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return err
		}
		res.print(stdout)
		fmt.Fprintln(stdout)
		rep.Results = append(rep.Results, res)
		if c.JSON != "" { // write as we go: a long run keeps what it measured
			if err := writeJSON(c.JSON, &rep); err != nil {
				return err
			}
		}
	}
	if cfg.History {
		date := time.Now().UTC().Format("2006-01-02")
		commit := getenv("TRBENCH_COMMIT")
		if commit == "" {
			commit = "?"
		}
		for _, r := range rep.Results {
			fmt.Fprintln(stdout, r.historyRow(date, commit))
		}
	}
	return nil
}

func runOne(ctx context.Context, e *env, c *config) (*Result, error) {
	p := streamParams{Turns: c.Turns, Rate: c.Rate, Tokens: c.Tokens, Watchers: c.Watchers, Warmup: c.Warmup, Duration: c.Duration}
	switch c.Scenarios {
	case "idle":
		return runIdle(ctx, e, c.IdleConns, c.IdleHold, c.IdleCompat)
	case "stream":
		return runStream(ctx, e, "stream", p)
	case "cancel":
		p.CancelFrac = c.CancelFrac
		return runStream(ctx, e, "cancel", p)
	case "reconnect":
		p.StormPct, p.StormEvery = c.StormPct, c.StormEvery
		if p.Watchers < 2 {
			p.Watchers = 2 // the sender is never dropped
		}
		return runStream(ctx, e, "reconnect", p)
	case "resume":
		p.ProbeRate = c.ProbeRate
		var r *Result
		if p.Turns > 0 {
			var err error
			if r, err = runStream(ctx, e, "resume", p); err != nil {
				return nil, err
			}
		} else {
			r = &Result{Scenario: "resume", Label: c.Label, Started: time.Now()}
		}
		lengths, err := parseInts(c.Long)
		if err != nil {
			return nil, fmt.Errorf("--long: %w", err)
		}
		if len(lengths) > 0 {
			if err := runLong(ctx, e, lengths, c.LongSecs, c.LongProbes, r); err != nil {
				return nil, err
			}
		}
		return r, nil
	case "ramp":
		return runRamp(ctx, e, c, p)
	case "floor":
		return runFloor(ctx, e, p)
	}
	return nil, fmt.Errorf("unknown scenario %q", c.Scenarios)
}

// runRamp runs stream steps of growing size and keeps the highest that
// met the target: p99 within --p99, keep-up ≥ 95% and no violation.
func runRamp(ctx context.Context, e *env, c *config, p streamParams) (*Result, error) {
	steps, err := parseInts(c.Ramp)
	if err != nil || len(steps) == 0 {
		return nil, fmt.Errorf("--ramp: need a list of turn counts")
	}
	r := &Result{Scenario: "ramp", Label: c.Label, Params: p, Started: time.Now()}
	for _, n := range steps {
		p.Turns = n
		var s *Result
		for try := 0; ; try++ {
			var err error
			if s, err = runStream(ctx, e, "ramp step", p); err != nil {
				return nil, err
			}
			// On a shared machine another process may take the cores the
			// server needs; such a step says nothing about the server.
			if c.MaxOthers <= 0 || s.OtherCPUs <= c.MaxOthers || try >= 2 {
				break
			}
			e.logf("ramp: other processes used %.2f cores during the step; waiting for quiet and running it again", s.OtherCPUs)
			r.Notes = append(r.Notes, fmt.Sprintf("step %d re-run: other processes used %.2f cores", n, s.OtherCPUs))
			waitQuiet(ctx, c.MaxOthers, 2*time.Minute)
		}
		r.Steps = append(r.Steps, s)
		r.Params.Tokens = s.Params.Tokens
		r.Violations.Add(s.Violations)
		r.ViolationDetails = append(r.ViolationDetails, s.ViolationDetails...)
		for k, v := range s.Events {
			if r.Events == nil {
				r.Events = map[string]int64{}
			}
			r.Events[fmt.Sprintf("step %d: %s", n, k)] += v
		}
		ok := s.Latency != nil && s.Latency.Count > 0 &&
			s.Latency.P99 <= float64(c.P99Target)/float64(time.Millisecond) &&
			s.KeepUp >= 0.95 && s.Violations.Total() == 0 && s.ConnFailures == 0
		e.logf("ramp: %d turns × %d watchers: %.0f tok/s, p99 %.2f ms, keep-up %.1f%%, violations %d → %v",
			n, p.Watchers, s.TokensS, s.Latency.P99, 100*s.KeepUp, s.Violations.Total(), map[bool]string{true: "ok", false: "miss"}[ok])
		if !ok {
			break
		}
		r.Best = &RampBest{Turns: n, TokensS: s.TokensS, P99MS: s.Latency.P99}
	}
	r.Notes = append(r.Notes, fmt.Sprintf("a step passes with token→screen p99 ≤ %s, keep-up ≥ 95%% and no violation", c.P99Target))
	return r, nil
}

func parseInts(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		n, err := strconv.Atoi(strings.ReplaceAll(f, "_", ""))
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("bad number %q", f)
		}
		out = append(out, n)
	}
	return out, nil
}

// env is what every scenario shares.
type env struct {
	cfg     *config
	d       *dialer
	server  *serverProbe
	stderr  io.Writer
	quiet   bool
	runBase string
	runs    atomic.Int64
}

// nextRunID names one scenario run; conversation and turn ids include it
// so that runs never meet.
func (e *env) nextRunID() string {
	return fmt.Sprintf("%s%d", e.runBase, e.runs.Add(1))
}

func (e *env) logf(format string, a ...any) {
	if !e.quiet {
		fmt.Fprintf(e.stderr, time.Now().Format("15:04:05 ")+format+"\n", a...)
	}
}

// report is the JSON file.
type report struct {
	Machine   Machine   `json:"machine"`
	URL       string    `json:"url"`
	ServerPID int       `json:"server_pid,omitempty"`
	Args      []string  `json:"args"`
	Results   []*Result `json:"results"`
}

func writeJSON(path string, rep *report) error {
	data, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(data, '\n'), 0o644)
}

// waitQuiet waits up to limit until the machine's busy cores stay under
// cores for two seconds.
func waitQuiet(ctx context.Context, cores float64, limit time.Duration) {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		t0, i0 := machineIdle()
		if !sleepCtx(ctx, 2*time.Second) {
			return
		}
		t1, i1 := machineIdle()
		if t1 > t0 && (1-float64(i1-i0)/float64(t1-t0))*float64(runtime.NumCPU()) < cores {
			return
		}
	}
}
