package sim

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/provider"
)

func req(prompt string) provider.Request {
	return provider.Request{Messages: []provider.Message{{Role: "user", Content: prompt}}}
}

func collect(t *testing.T, p *Provider, prompt string) (string, error) {
	t.Helper()
	var sb strings.Builder
	_, err := p.Stream(t.Context(), req(prompt), func(s string) error { sb.WriteString(s); return nil })
	return sb.String(), err
}

func TestDeterministic(t *testing.T) {
	p := New(Config{Rate: 0, Tokens: 50})
	a, err := collect(t, p, "hello there")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := collect(t, p, "hello there")
	c, _ := collect(t, p, "something else")
	if a != b {
		t.Fatalf("same prompt gave different replies:\n%q\n%q", a, b)
	}
	if a == c {
		t.Fatalf("different prompts gave the same reply")
	}
	if n := len(strings.Fields(a)); n != 50 {
		t.Fatalf("got %d words, want 50", n)
	}
}

func TestParseDirective(t *testing.T) {
	tests := []struct {
		name   string
		prompt string
		want   Directive
		rest   string
	}{
		{"none", "hi", Directive{Tokens: 7}, "hi"},
		{"all", "go [sim tokens=500 rate=200 error_after=40 delay_ms=5 echo=1] now", Directive{Tokens: 500, Rate: 200, ErrorAfter: 40, DelayMS: 5, Echo: true}, "go  now"},
		{"subset", "[sim rate=0]x", Directive{Tokens: 7, Rate: 0}, "x"},
		{"bad values ignored", "[sim tokens=-1 rate=abc]", Directive{Tokens: 7}, ""},
		{"limits", "[sim tokens=1152921504606846976 delay_ms=99999999999999 rate=1e-12]", Directive{Tokens: MaxTokens, DelayMS: MaxDelayMS, Rate: MinRate}, ""},
		{"not a directive", "[simple]", Directive{Tokens: 7}, "[simple]"},
		{"unclosed", "[sim tokens=3", Directive{Tokens: 7}, "[sim tokens=3"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, rest := ParseDirective(tt.prompt, Directive{Tokens: 7})
			if got != tt.want || rest != tt.rest {
				t.Errorf("ParseDirective(%q) = %+v, %q; want %+v, %q", tt.prompt, got, rest, tt.want, tt.rest)
			}
		})
	}
}

func TestEcho(t *testing.T) {
	p := New(Config{})
	got, err := collect(t, p, "[sim echo=1 rate=0] <b>héllo</b> wörld")
	if err != nil {
		t.Fatal(err)
	}
	if got != "<b>héllo</b> wörld" {
		t.Fatalf("echo = %q", got)
	}
}

func TestErrorAfter(t *testing.T) {
	p := New(Config{})
	var n int
	_, err := p.Stream(t.Context(), req("[sim tokens=10 rate=0 error_after=4]"), func(string) error { n++; return nil })
	var pe *provider.Error
	if !errors.As(err, &pe) {
		t.Fatalf("err = %v, want *provider.Error", err)
	}
	if n != 4 {
		t.Fatalf("emitted %d tokens before the error, want 4", n)
	}
}

func TestCancelStopsAtOnce(t *testing.T) {
	p := New(Config{Rate: 1, Tokens: 100}) // one token a second
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		_, err := p.Stream(ctx, req("x"), func(string) error { return nil })
		done <- err
	}()
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want context.Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Stream did not return after cancel")
	}
}

// TestCancelWakesAWait cancels a reply while it waits for its next token
// and checks that it returns without waiting out the token's interval.
// Under synctest the clock moves only when every goroutine is blocked, so a
// wait that slept through the cancel would show as time passing.
func TestCancelWakesAWait(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := New(Config{Rate: 1, Tokens: 100}) // one token a second
		ctx, cancel := context.WithCancel(t.Context())
		emitted := make(chan string, 100)
		done := make(chan error, 1)
		go func() {
			_, err := p.Stream(ctx, req("x"), func(tok string) error { emitted <- tok; return nil })
			done <- err
		}()
		<-emitted       // the first token is out
		synctest.Wait() // and the reply waits for the second
		start := time.Now()
		cancel()
		err := <-done
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want context.Canceled", err)
		}
		if waited := time.Since(start); waited != 0 {
			t.Fatalf("Stream returned %v after the cancel, want at once", waited)
		}
		if n := len(emitted); n != 0 {
			t.Fatalf("%d more tokens emitted after the first, want none", n)
		}
	})
}

// TestReplyIsStable pins the reply a prompt gives: a benchmark or a test
// that names a prompt gets the same text from every version.
func TestReplyIsStable(t *testing.T) {
	tests := []struct {
		prompt string
		first  []string
		text   string // the whole reply's first 60 bytes
	}{
		{"hello there", []string{"Conversation", " conversation", " thunder.", " Network", " quickly.", " Paper"},
			"Conversation conversation thunder. Network quickly. Paper st"},
		{"", []string{"Simulated", " or", " is", " durable.", " Maple", " bridge"},
			"Simulated or is durable. Maple bridge marble clearly convers"},
	}
	p := New(Config{Tokens: 40})
	for _, tt := range tests {
		_, toks := p.Reply(tt.prompt)
		if len(toks) != 40 {
			t.Fatalf("%q: %d tokens, want 40", tt.prompt, len(toks))
		}
		for i, w := range tt.first {
			if toks[i] != w {
				t.Fatalf("%q: token %d = %q, want %q", tt.prompt, i, toks[i], w)
			}
		}
		if got := strings.Join(toks, ""); !strings.HasPrefix(got, tt.text) || !strings.HasSuffix(got, ".") {
			t.Fatalf("%q: reply %q, want it to begin %q and end with a full stop", tt.prompt, got, tt.text)
		}
	}
}

// TestVocabularyIsLowerASCII guards words' capitalisation, which upper-cases
// a word's first byte.
func TestVocabularyIsLowerASCII(t *testing.T) {
	for _, w := range vocabulary {
		for i := 0; i < len(w); i++ {
			if w[i] < 'a' || w[i] > 'z' {
				t.Fatalf("vocabulary word %q is not lower-case ASCII", w)
			}
		}
	}
}

// A reply is made a batch at a time as it streams; however the batches
// fall, the tokens are the same.
func TestReplyBatchesAreOneReply(t *testing.T) {
	collect := func(batch int) []string {
		g := newWords("a long one", 1000, batch)
		var toks []string
		for tok, ok := g.next(); ok; tok, ok = g.next() {
			toks = append(toks, tok)
		}
		return toks
	}
	whole := collect(1000)
	if len(whole) != 1000 {
		t.Fatalf("%d tokens, want 1000", len(whole))
	}
	for _, batch := range []int{1, 7, 256} {
		if got := collect(batch); !slices.Equal(got, whole) {
			t.Fatalf("made %d at a time: %d tokens, differing from the reply made at once", batch, len(got))
		}
	}
}
