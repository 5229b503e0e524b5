package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"strings"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/gateway"
)

// config is every setting of every subcommand; each subcommand registers
// the flags it uses. Defaults live here.
type config struct {
	Addr       string
	DataDir    string
	StoreURL   string
	NATSURL    string
	NATSCreds  string
	NATSCA     string
	NATSCert   string
	NATSKey    string
	NATSListen string
	Replicas   int
	Retention  time.Duration
	AckWait    time.Duration

	Provider          string
	Model             string
	Models            string
	OpenAIBaseURL     string
	OpenAIAPIKey      string
	OpenAIHeaders     stringList
	SystemPrompt      string
	ContextBudget     int
	OpenAIConnect     time.Duration
	OpenAIFirstToken  time.Duration
	OpenAIIdle        time.Duration
	OpenAIMaxRetries  int
	SimRate           float64
	SimTokens         int
	BatchWindow       time.Duration
	DeltaTimestamps   bool
	WorkerConcurrency int
	QueuedTimeout     time.Duration
	SnapshotInterval  time.Duration
	JournalSave       time.Duration
	StartGrace        time.Duration
	StoreTimeout      time.Duration

	Dev            bool
	devSet         bool
	JWTSecret      string
	JWTPublicKey   string
	JWTIssuer      string
	JWTAudience    string
	AllowedOrigins string
	CompatOrigins  string

	Limits          gateway.Limits
	TokensPerHour   int
	CancelWait      time.Duration
	PingInterval    time.Duration
	QuietCheck      time.Duration
	WriteTimeout    time.Duration
	ReadTimeout     time.Duration
	IdleTimeout     time.Duration
	ShutdownTimeout time.Duration
	ShutdownDrain   time.Duration
	LogLevel        string
	DebugAddr       string
	MetricsAddr     string
	LogFormat       string
}

type stringList []string

func (s *stringList) String() string { return strings.Join(*s, ", ") }
func (s *stringList) Set(v string) error {
	*s = append(*s, v)
	return nil
}

type role int

const (
	roleServe role = iota
	roleGateway
	roleWorker
	roleMigrate
)

func (c *config) register(fs *flag.FlagSet, r role) {
	gw := r == roleServe || r == roleGateway
	wk := r == roleServe || r == roleWorker
	if r == roleServe {
		fs.StringVar(&c.DataDir, "data-dir", "./data", "where serve keeps SQLite, JetStream and delta journal files")
		fs.StringVar(&c.NATSListen, "nats-listen", "", "also accept NATS clients on this address (embedded server; default: no port)")
	}
	fs.StringVar(&c.StoreURL, "store-url", "", "sqlite:///path/file.db or postgres://… (serve default: SQLite in --data-dir)")
	fs.StringVar(&c.LogLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&c.LogFormat, "log-format", "text", "text or json")
	if r != roleMigrate {
		fs.StringVar(&c.DebugAddr, "debug-addr", "", "serve Go's profiler (/debug/pprof) on this address, e.g. 127.0.0.1:6060")
	}
	if r == roleMigrate {
		return
	}
	if r == roleWorker {
		fs.StringVar(&c.MetricsAddr, "metrics-addr", "", "serve /metrics and /healthz on this address (default: no HTTP port)")
	}
	fs.StringVar(&c.NATSURL, "nats-url", "", "external NATS servers, comma separated (serve default: embedded)")
	fs.StringVar(&c.NATSCreds, "nats-creds", "", "NATS credentials file")
	fs.StringVar(&c.NATSCA, "nats-tls-ca", "", "CA certificate file for NATS TLS")
	fs.StringVar(&c.NATSCert, "nats-tls-cert", "", "client certificate file for NATS TLS")
	fs.StringVar(&c.NATSKey, "nats-tls-key", "", "client key file for NATS TLS")
	fs.IntVar(&c.Replicas, "replicas", 1, "replication factor of streams and buckets (3 on a three-node cluster)")
	fs.DurationVar(&c.Retention, "retention", 24*time.Hour, "how long turn events stay resumable after the turn ends (0: kept for good; otherwise at least 1s)")
	fs.DurationVar(&c.AckWait, "ack-wait", 4*time.Second, "how long a silent worker keeps a job before it is redelivered")
	fs.DurationVar(&c.ShutdownTimeout, "shutdown-timeout", 15*time.Second, "how long a graceful shutdown may take")
	if gw {
		fs.StringVar(&c.Addr, "addr", "127.0.0.1:8080", "listen address (:0 picks a free port)")
		fs.BoolFunc("dev", "accept connections without a token as user dev (default: on when --addr is loopback and no JWT key is set)", func(v string) error {
			switch v {
			case "true", "1", "":
				c.Dev = true
			case "false", "0":
				c.Dev = false
			default:
				return errors.New("want true or false")
			}
			c.devSet = true
			return nil
		})
		fs.StringVar(&c.JWTSecret, "jwt-secret", "", "HS256 secret for Bearer tokens")
		fs.StringVar(&c.JWTPublicKey, "jwt-public-key", "", "RS256 or ES256 public key: a PEM file path or the PEM itself")
		fs.StringVar(&c.JWTIssuer, "jwt-issuer", "", "required iss claim, when set")
		fs.StringVar(&c.JWTAudience, "jwt-audience", "", "required aud claim, when set")
		fs.StringVar(&c.CompatOrigins, "compat-allowed-origins", "", "comma-separated origins allowed on the compatibility paths /ws/chat and /api/… (default: any)")
		fs.StringVar(&c.AllowedOrigins, "allowed-origins", "", "comma-separated origins allowed to open /v1/ws and to POST or DELETE on /v1/ (default: the server's own; a list replaces it, so name the server's own too; * for any)")
		d := gateway.DefaultLimits()
		c.Limits = d
		fs.IntVar(&c.Limits.FrameBytes, "limit-frame-bytes", d.FrameBytes, "largest inbound WebSocket frame (close 1009 above it)")
		fs.IntVar(&c.Limits.TextBytes, "limit-text-bytes", d.TextBytes, "largest message text (too_large)")
		fs.IntVar(&c.Limits.SendsPerMinute, "limit-sends", d.SendsPerMinute, "sends per minute per user, burst 10 (rate_limited)")
		fs.IntVar(&c.Limits.Connections, "limit-connections", d.Connections, "open connections per user (close 4009)")
		fs.IntVar(&c.Limits.Joins, "limit-joins", d.Joins, "conversations joined per connection")
		fs.IntVar(&c.Limits.Turns, "limit-turns", d.Turns, "turns running at once per user")
		fs.IntVar(&c.Limits.OutboundBytes, "limit-outbound-bytes", d.OutboundBytes, "queued outbound bytes per connection (close 4008)")
		fs.IntVar(&c.Limits.BadFrames, "limit-bad-frames", d.BadFrames, "bad frames per connection before close 1008")
		fs.IntVar(&c.Limits.Requests, "limit-requests", d.Requests, "HTTP requests in flight per user, SSE streams included (429 rate_limited)")
		fs.IntVar(&c.Limits.NewConversations, "limit-new-conversations", d.NewConversations, "conversations a user's joins may create per minute, burst the same (rate_limited); sends count under --limit-sends")
		fs.DurationVar(&c.CancelWait, "cancel-wait", 5*time.Second, "how long a cancel waits for a streaming turn to end before answering")
		fs.DurationVar(&c.WriteTimeout, "write-timeout", 10*time.Second, "a socket write blocked this long closes the connection (the peer stopped reading)")
		fs.DurationVar(&c.ReadTimeout, "read-timeout", 10*time.Second, "an HTTP request's headers, and its body, must arrive within this")
		fs.DurationVar(&c.PingInterval, "ping-interval", 30*time.Second, "server ping interval per connection (negative disables)")
		fs.DurationVar(&c.IdleTimeout, "idle-timeout", 60*time.Second, "a connection that does not answer a ping within this is closed, and an HTTP connection idle this long between requests")
		// Off by default: SIGTERM closes sockets with 1001 at once, as
		// PROTOCOL.md says. Behind a load balancer, set it to the time
		// its health checks take to see /readyz fail (deploy/compose.yaml
		// sets 5s for deploy/haproxy.cfg's checks, every 2s, twice).
		fs.DurationVar(&c.ShutdownDrain, "shutdown-drain", 0, "on SIGTERM, answer /readyz 503 and keep serving this long before closing connections with 1001 (0: close at once; a second signal cuts it short)")
		fs.DurationVar(&c.QuietCheck, "quiet-check", 10*time.Second, "an open turn silent this long is read again from the stream, in case its end was lost (negative disables)")
	}
	fs.BoolVar(&c.DeltaTimestamps, "delta-timestamps", false, "stamp every turn.delta with its emission time (\"ts\", Unix µs)")
	fs.StringVar(&c.Provider, "provider", "sim", "sim (built-in simulator) or openai (any OpenAI-compatible server)")
	fs.StringVar(&c.Model, "model", "", "model name sent to the provider (default: the provider's)")
	fs.StringVar(&c.Models, "models", "", "comma-separated models a send may choose (send.model); the default model is always allowed")
	if wk {
		fs.StringVar(&c.OpenAIBaseURL, "openai-base-url", "", "base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:11434/v1")
		fs.StringVar(&c.OpenAIAPIKey, "openai-api-key", "", "API key sent as a Bearer token")
		fs.Var(&c.OpenAIHeaders, "openai-header", "extra header \"Name: value\" sent upstream (repeatable)")
		fs.StringVar(&c.SystemPrompt, "system-prompt", "", "system prompt prepended to every conversation")
		fs.IntVar(&c.ContextBudget, "context-budget-bytes", 24000, "most bytes of conversation sent upstream as context")
		fs.DurationVar(&c.OpenAIConnect, "openai-connect-timeout", 10*time.Second, "connect timeout to the model server")
		fs.DurationVar(&c.OpenAIFirstToken, "openai-first-token-timeout", 60*time.Second, "longest wait for the first token")
		fs.DurationVar(&c.OpenAIIdle, "openai-idle-timeout", 30*time.Second, "longest gap between tokens")
		fs.IntVar(&c.OpenAIMaxRetries, "openai-max-retries", 2, "retries before the first token")
		fs.Float64Var(&c.SimRate, "sim-rate", 30, "simulator tokens per second per turn (0 = as fast as possible)")
		fs.IntVar(&c.SimTokens, "sim-tokens", 200, "simulator reply length in tokens")
		fs.DurationVar(&c.BatchWindow, "batch-window", 0, "merge tokens arriving within this window into one delta (0 = off)")
		fs.IntVar(&c.WorkerConcurrency, "worker-concurrency", 10000, "most turns one worker produces at once")
		fs.DurationVar(&c.SnapshotInterval, "snapshot-interval", 100*time.Millisecond, "how often a streaming turn's snapshot is saved")
		if r == roleServe {
			fs.DurationVar(&c.JournalSave, "journal-save-interval", 5*time.Second, "how long a streaming turn's deltas stay in the delta journal alone before its snapshot saves them")
		}
		fs.DurationVar(&c.QueuedTimeout, "queued-timeout", 30*time.Second, "enqueue again the job of a turn queued this long (a gateway died before enqueuing it; negative disables)")
		fs.DurationVar(&c.StoreTimeout, "store-timeout", 10*time.Second, "a store call of a worker (reading, starting or ending a turn) not answered within this fails, and the turn goes on as when the store refuses it (0 means the default)")
		fs.DurationVar(&c.StartGrace, "start-grace", 50*time.Millisecond, "hold a new turn this long before calling the model, so a cancel sent right behind the message wins (negative disables)")
		fs.IntVar(&c.TokensPerHour, "limit-tokens-per-hour", 0, "model tokens per user per hour (turn ends error); 0 = unlimited")
	}
}

// addForeignFlags defines on fs, whose command is r, the flags only other
// commands have, so that one set of flags (or one environment) can start
// every command of a deployment; they set nothing of r's config. It
// returns their names.
func addForeignFlags(fs *flag.FlagSet, r role) map[string]bool {
	foreign := map[string]bool{}
	for _, other := range []role{roleServe, roleGateway, roleWorker, roleMigrate} {
		if other == r {
			continue
		}
		ofs := flag.NewFlagSet("", flag.ContinueOnError)
		new(config).register(ofs, other)
		ofs.VisitAll(func(f *flag.Flag) {
			if fs.Lookup(f.Name) == nil {
				fs.Var(f.Value, f.Name, f.Usage)
				foreign[f.Name] = true
			}
		})
	}
	return foreign
}

// parse reads args, then fills every flag not given on the command line
// from TOKENRELAY_<NAME> (upper case, - → _). The flags named in foreign
// (another command's) are taken from the command line only.
func parse(fs *flag.FlagSet, args []string, getenv func(string) string, foreign map[string]bool) error {
	// A bad flag is reported in one line, by main, as the reasons for not
	// starting are: the flag package would print it and then the whole
	// usage. The usage is printed when it is asked for.
	out := fs.Output()
	fs.SetOutput(io.Discard)
	err := fs.Parse(args)
	fs.SetOutput(out)
	if errors.Is(err, flag.ErrHelp) {
		fs.Usage()
	}
	if err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] || foreign[f.Name] || err != nil {
			return
		}
		name := "TOKENRELAY_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		v := getenv(name)
		if v == "" {
			return
		}
		if e := fs.Set(f.Name, v); e != nil {
			err = fmt.Errorf("invalid value %q for %s: %v", v, name, e)
		}
	})
	if err != nil {
		return err
	}
	return checkNotNegative(fs, foreign)
}

// checkNotNegative refuses a negative number or duration, which no flag
// gives a meaning to except those whose usage says "negative disables", and
// a number that is not finite (NaN, Inf), which none gives a meaning to.
func checkNotNegative(fs *flag.FlagSet, foreign map[string]bool) error {
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		g, ok := f.Value.(flag.Getter)
		if err != nil || !ok || foreign[f.Name] || strings.Contains(f.Usage, "negative disables") {
			return
		}
		var negative bool
		switch v := g.Get().(type) {
		case int:
			negative = v < 0
		case int64:
			negative = v < 0
		case float64:
			if math.IsNaN(v) || math.IsInf(v, 0) {
				err = fmt.Errorf("invalid value %q for --%s: must be a finite number", f.Value.String(), f.Name)
				return
			}
			negative = v < 0
		case time.Duration:
			negative = v < 0
		}
		if negative {
			err = fmt.Errorf("invalid value %q for --%s: must not be negative", f.Value.String(), f.Name)
		}
	})
	return err
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func readPEM(v string) ([]byte, error) {
	if i := strings.Index(v, "-----BEGIN"); i >= 0 {
		// PEM, maybe after a header such as openssl's "Bag Attributes";
		// the key parser refuses a private key without echoing it.
		return []byte(v[i:]), nil
	}
	b, err := os.ReadFile(v)
	if err == nil {
		return b, nil
	}
	// A value that does not look like a path may be a key pasted without
	// its armour, perhaps a private one: the error must not repeat it.
	if strings.ContainsAny(v, "\r\n") || len(v) > 255 || !strings.ContainsAny(v, "/.\\") {
		return nil, errors.New("read --jwt-public-key: the value is neither a PEM key (-----BEGIN PUBLIC KEY-----) nor the path of a readable file")
	}
	return nil, fmt.Errorf("read --jwt-public-key: %w", err)
}

// load parses a subcommand's flags and environment into a config and
// builds its logger.
func load(name string, r role, args []string, getenv func(string) string, stderr io.Writer) (*config, *slog.Logger, error) {
	c := new(config)
	fs := newFlagSet(name, stderr)
	c.register(fs, r)
	// -h lists the command's own flags.
	own := newFlagSet(name, stderr)
	new(config).register(own, r)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage of %s:\n", fs.Name())
		own.SetOutput(fs.Output())
		own.PrintDefaults()
	}
	foreign := addForeignFlags(fs, r)
	if err := parse(fs, args, getenv, foreign); err != nil {
		return nil, nil, err
	}
	log, err := newLogger(c, stderr)
	if err != nil {
		return nil, nil, err
	}
	fs.Visit(func(f *flag.Flag) {
		if foreign[f.Name] {
			log.Warn("flag ignored: "+name+" has no use for it", "flag", "--"+f.Name)
		}
	})
	return c, log, nil
}
