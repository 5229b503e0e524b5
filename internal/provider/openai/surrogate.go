package openai

import (
	"encoding/json"
)

// pairJoiner decodes the content of the stream's deltas. JSON escapes a
// character outside the Basic Multilingual Plane (most emoji) as a
// surrogate pair, "\ud83d\ude00", and a server that escapes per token can
// send the two halves in two chunks. Decoded one chunk at a time, each half
// would become U+FFFD; the joiner holds a chunk's trailing high half back
// and puts it in front of the next chunk's content, so the pair decodes as
// the one character it is.
type pairJoiner struct {
	held string // a high half's escape, `\uD83D`, kept from the last chunk
}

// decode returns the text of one delta's content, raw as it was in the
// chunk (a JSON string, or null).
func (j *pairJoiner) decode(raw json.RawMessage) (string, error) {
	if len(raw) == 0 || string(raw) == "null" || string(raw) == `""` {
		return "", nil // nothing: a half held still waits for its partner
	}
	s := string(raw)
	if len(s) < 2 || s[0] != '"' || s[len(s)-1] != '"' {
		var out string
		return out, json.Unmarshal(raw, &out) // not a string: its error
	}
	prefix := ""
	if j.held != "" {
		if lowHalfAt(s, 1) {
			s = `"` + j.held + s[1:]
		} else {
			prefix = "\uFFFD" // a lone half, decoded as JSON would
		}
		j.held = ""
	}
	if n := len(s) - 7; n >= 1 && highHalfAt(s, n) && escapedAt(s, n) {
		j.held = s[n : n+6]
		s = s[:n] + `"`
	}
	var out string
	if err := json.Unmarshal([]byte(s), &out); err != nil {
		return "", err
	}
	return prefix + out, nil
}

// flush returns what a high half held at the end of the stream decodes
// to alone: U+FFFD, as JSON decoding makes of it.
func (j *pairJoiner) flush() string {
	if j.held == "" {
		return ""
	}
	j.held = ""
	return "\uFFFD"
}

// highHalfAt and lowHalfAt report whether s holds the escape of a high
// (U+D800–U+DBFF) or low (U+DC00–U+DFFF) surrogate at i.
func highHalfAt(s string, i int) bool { return surrogateAt(s, i, "89abAB") }
func lowHalfAt(s string, i int) bool  { return surrogateAt(s, i, "cdefCDEF") }

func surrogateAt(s string, i int, third string) bool {
	if i+6 > len(s) || s[i] != '\\' || s[i+1] != 'u' || (s[i+2] != 'd' && s[i+2] != 'D') {
		return false
	}
	ok := false
	for k := range len(third) {
		ok = ok || s[i+3] == third[k]
	}
	return ok && isHex(s[i+4]) && isHex(s[i+5])
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// escapedAt reports whether the backslash at i starts an escape, rather
// than being the second half of an escaped backslash ("\\" then "u…"):
// an even number of backslashes comes before it.
func escapedAt(s string, i int) bool {
	n := 0
	for k := i - 1; k >= 0 && s[k] == '\\'; k-- {
		n++
	}
	return n%2 == 0
}
