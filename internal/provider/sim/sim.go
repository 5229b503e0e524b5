// Package sim is tokenrelay's built-in model simulator: a deterministic
// provider.Provider that streams a reply chosen by the prompt at a set rate,
// honouring its context exactly as a network provider must.
package sim

import (
	"context"
	"hash/fnv"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/provider"
)

// Config sets the simulator's defaults; a prompt's directive overrides them.
type Config struct {
	// Rate is tokens per second per turn; 0 streams as fast as possible.
	Rate float64
	// Tokens is the reply length in tokens.
	Tokens int
}

// Provider is the simulator. The zero value is not usable; call New.
type Provider struct {
	cfg Config
}

var _ provider.Provider = (*Provider)(nil)

// New returns a simulator.
func New(cfg Config) *Provider {
	if cfg.Tokens <= 0 {
		cfg.Tokens = 200
	}
	cfg.Tokens = min(cfg.Tokens, MaxTokens)
	if cfg.Rate < 0 {
		cfg.Rate = 0
	}
	if cfg.Rate > 0 && cfg.Rate < MinRate {
		cfg.Rate = MinRate
	}
	return &Provider{cfg: cfg}
}

// The limits of a directive: a value past one is taken as the limit. A
// prompt is a user's, and the reply is built whole before it streams, so
// without them one prompt could ask for more memory than there is; a rate
// below MinRate would pace tokens further apart than a time.Duration holds.
const (
	MaxTokens  = 10_000_000
	MaxDelayMS = 3_600_000 // an hour
	MinRate    = 0.001     // a token every 1000 s
)

// Directive is what a prompt may ask of the simulator with
// "[sim tokens=500 rate=200 error_after=40 delay_ms=100 echo=1]" (any subset).
type Directive struct {
	Tokens     int
	Rate       float64
	ErrorAfter int  // fail after this many tokens; 0 = never
	DelayMS    int  // wait this long before the first token
	Echo       bool // reply with the prompt's own text (without the directive)
}

// ParseDirective extracts the directive of prompt, starting from defaults,
// and returns the prompt without it. A value the directive sets is kept
// within MaxTokens, MaxDelayMS and MinRate.
func ParseDirective(prompt string, d Directive) (Directive, string) {
	start := strings.Index(prompt, "[sim")
	if start < 0 {
		return d, prompt
	}
	end := strings.Index(prompt[start:], "]")
	if end < 0 {
		return d, prompt
	}
	body := prompt[start+len("[sim") : start+end]
	if body != "" && body[0] != ' ' {
		return d, prompt
	}
	for _, f := range strings.Fields(body) {
		k, v, ok := strings.Cut(f, "=")
		if !ok {
			continue
		}
		switch k {
		case "tokens":
			if n, err := strconv.Atoi(v); err == nil && n >= 0 {
				d.Tokens = min(n, MaxTokens)
			}
		case "rate":
			if r, err := strconv.ParseFloat(v, 64); err == nil && r >= 0 {
				d.Rate = r
				if r > 0 && r < MinRate {
					d.Rate = MinRate
				}
			}
		case "error_after":
			if n, err := strconv.Atoi(v); err == nil && n >= 0 {
				d.ErrorAfter = n
			}
		case "delay_ms":
			if n, err := strconv.Atoi(v); err == nil && n >= 0 {
				d.DelayMS = min(n, MaxDelayMS)
			}
		case "echo":
			d.Echo = v == "1" || v == "true"
		}
	}
	rest := strings.TrimSpace(prompt[:start] + prompt[start+end+1:])
	return d, rest
}

// Reply returns the tokens the simulator streams for prompt: the same prompt
// always gives the same tokens.
func (p *Provider) Reply(prompt string) (Directive, []string) {
	d, next := p.reply(prompt)
	var toks []string
	for tok, ok := next(); ok; tok, ok = next() {
		toks = append(toks, tok)
	}
	return d, toks
}

// reply is Reply as a function that returns the next token, and false
// after the last: a reply is made as it streams, a batch of tokens at a
// time, so that a long one (up to MaxTokens) never takes its whole size
// in memory.
func (p *Provider) reply(prompt string) (Directive, func() (string, bool)) {
	d, rest := ParseDirective(prompt, Directive{Tokens: p.cfg.Tokens, Rate: p.cfg.Rate})
	if d.Echo {
		toks := splitEcho(rest)
		return d, func() (string, bool) {
			if len(toks) == 0 {
				return "", false
			}
			tok := toks[0]
			toks = toks[1:]
			return tok, true
		}
	}
	return d, newWords(prompt, d.Tokens, wordBatch).next
}

// Stream implements provider.Provider.
func (p *Provider) Stream(ctx context.Context, req provider.Request, emit func(string) error) (provider.Result, error) {
	d, next := p.reply(req.Prompt())
	// One timer paces the reply, and a cancel fires it at once: a wait is
	// then one channel receive, not a select over the timer and ctx.Done,
	// which locks and queues on both channels for every token.
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	stop := context.AfterFunc(ctx, func() { timer.Reset(0) })
	defer stop()
	wait := func(until time.Time) error {
		dur := time.Until(until)
		if dur <= 0 {
			return ctx.Err()
		}
		timer.Reset(dur)
		// A cancel that this check misses fires the timer after the Reset
		// above, so the receive below cannot sleep through it.
		if err := ctx.Err(); err != nil {
			return err
		}
		<-timer.C
		return ctx.Err()
	}
	start := time.Now()
	if d.DelayMS > 0 {
		start = start.Add(time.Duration(d.DelayMS) * time.Millisecond)
	}
	var interval time.Duration
	if d.Rate > 0 {
		interval = time.Duration(float64(time.Second) / d.Rate)
	}
	i := 0
	for tok, ok := next(); ok; tok, ok = next() {
		if d.ErrorAfter > 0 && i == d.ErrorAfter {
			return provider.Result{}, &provider.Error{Message: "the simulated model failed after " + strconv.Itoa(i) + " tokens"}
		}
		// Token i is due at start + (i+1)·interval: an absolute schedule, so
		// a late wake-up does not slow the whole reply.
		if err := wait(start.Add(time.Duration(i+1) * interval)); err != nil {
			return provider.Result{}, err
		}
		if err := emit(tok); err != nil {
			return provider.Result{}, err
		}
		i++
	}
	if err := ctx.Err(); err != nil {
		return provider.Result{}, err
	}
	return provider.Result{Usage: &chat.Usage{
		PromptTokens:     len(strings.Fields(req.Prompt())),
		CompletionTokens: i,
	}}, nil
}

var vocabulary = strings.Fields(`the a token stream reply model answer every word arrives
in order and none is lost or doubled when the page reloads reconnects or another tab
joins relay gateway worker snapshot resume cancel stop quickly carefully simply clearly
message conversation history persisted durable ordered exactly once delivered browser
server network latency throughput buffer queue writer reader text delta sequence
number context provider simulated deterministic prompt same gives result quiet
bright river mountain window garden paper light signal bridge harbor lantern compass
orbit meadow thunder silver copper marble velvet amber cedar maple falcon sparrow`)

// wordGen picks n words deterministically from the prompt's hash, with a
// sentence break now and then so replies look like prose. It builds batch
// tokens at a time as one string, the tokens being slices of it: a few
// allocations a batch instead of one or two per token, and a batch's
// worth of memory however long the reply.
type wordGen struct {
	rng     *rand.Rand
	n, i    int // tokens in all, and made so far
	capital bool
	size    int      // tokens a batch
	batch   []string // made and not yet taken
}

// wordBatch is how many tokens the simulator makes at a time.
const wordBatch = 256

func newWords(prompt string, n, batch int) *wordGen {
	h := fnv.New64a()
	h.Write([]byte(prompt))
	return &wordGen{rng: rand.New(rand.NewPCG(h.Sum64(), 0x746f6b656e72)), n: n, capital: true, size: batch}
}

// next returns the next token, and false after the last.
func (g *wordGen) next() (string, bool) {
	if len(g.batch) == 0 {
		if g.i == g.n {
			return "", false
		}
		g.fill()
	}
	tok := g.batch[0]
	g.batch = g.batch[1:]
	return tok, true
}

// fill makes the next batch of tokens.
func (g *wordGen) fill() {
	m := min(g.size, g.n-g.i)
	var b strings.Builder
	b.Grow(m * 10) // the vocabulary's words, with a space and a full stop
	ends := make([]int, m)
	for k := range ends {
		w := vocabulary[g.rng.IntN(len(vocabulary))]
		if g.i > 0 {
			b.WriteByte(' ')
		}
		if g.capital {
			b.WriteByte(w[0] - 'a' + 'A') // the vocabulary is lower-case ASCII
			w = w[1:]
			g.capital = false
		}
		b.WriteString(w)
		if g.i == g.n-1 || g.rng.IntN(12) == 0 {
			b.WriteByte('.')
			g.capital = true
		}
		ends[k] = b.Len()
		g.i++
	}
	text := b.String()
	out := make([]string, m)
	start := 0
	for k, end := range ends {
		out[k] = text[start:end]
		start = end
	}
	g.batch = out
}

// splitEcho cuts text into tokens of about four bytes, on rune boundaries.
func splitEcho(text string) []string {
	var out []string
	for len(text) > 0 {
		n := min(4, len(text))
		for n < len(text) && text[n]&0xC0 == 0x80 {
			n++ // do not split a UTF-8 sequence
		}
		out = append(out, text[:n])
		text = text[n:]
	}
	return out
}
