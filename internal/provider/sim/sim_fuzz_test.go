package sim

import (
	"strings"
	"testing"
	"unicode/utf8"
)

// FuzzParseDirective checks the directive parser on any prompt: it never
// panics; what it decodes stays within MaxTokens, MaxDelayMS and MinRate
// and is never negative; a prompt without "[sim" comes back as it was; the
// prompt it returns is never longer than the one it was given; and an echo
// reply of it is the prompt, cut (on rune boundaries, into pieces of at
// most a few bytes, when it is valid UTF-8 as a prompt is).
func FuzzParseDirective(f *testing.F) {
	for _, seed := range []string{
		"hello",
		"go [sim tokens=500 rate=200 error_after=40 delay_ms=5 echo=1] now",
		"[sim tokens=1152921504606846976 delay_ms=99999999999999 rate=1e-12]",
		"[sim rate=Inf tokens=+3 echo=true]",
		"[sim rate=NaN] [sim tokens=1]",
		"[simple] [sim",
		"[sim echo=1] h\xc3\xa9llo w\xf0\x9f\x98\x80rld",
	} {
		f.Add(seed)
	}
	defaults := Directive{Tokens: 7, Rate: 3}
	f.Fuzz(func(t *testing.T, prompt string) {
		d, rest := ParseDirective(prompt, defaults)
		if d.Tokens < 0 || d.Tokens > MaxTokens {
			t.Errorf("tokens %d", d.Tokens)
		}
		if d.DelayMS < 0 || d.DelayMS > MaxDelayMS {
			t.Errorf("delay_ms %d", d.DelayMS)
		}
		if d.ErrorAfter < 0 {
			t.Errorf("error_after %d", d.ErrorAfter)
		}
		if !(d.Rate == 0 || d.Rate >= MinRate) { // NaN fails both
			t.Errorf("rate %v", d.Rate)
		}
		if !strings.Contains(prompt, "[sim") && (d != defaults || rest != prompt) {
			t.Errorf("no directive, yet %+v, %q", d, rest)
		}
		if len(rest) > len(prompt) {
			t.Errorf("rest %q is longer than the prompt %q", rest, prompt)
		}
		var sb strings.Builder
		valid := utf8.ValidString(rest) // as a prompt is; an invalid one is only cut
		for _, tok := range splitEcho(rest) {
			if tok == "" || valid && len(tok) > 4+utf8.UTFMax-1 {
				t.Errorf("echo token %q", tok)
			}
			if valid && !utf8.ValidString(tok) {
				t.Errorf("echo token %q splits a rune", tok)
			}
			sb.WriteString(tok)
		}
		if sb.String() != rest {
			t.Errorf("echo %q, want %q", sb.String(), rest)
		}
	})
}
