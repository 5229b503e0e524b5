package gateway

import (
	"strconv"
	"strings"
	"testing"
)

// FuzzParseLastEventID checks the SSE resume point parser: it never panics;
// what it accepts is a plain decimal seq (optionally padded with spaces, as
// a header may be) and nothing else; and every seq the server writes as an
// event id (any non-negative int64) parses back to itself. Seeds are in
// testdata/fuzz/FuzzParseLastEventID.
func FuzzParseLastEventID(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string, seq int64) {
		n, ok := ParseLastEventID(s)
		if ok {
			digits := strings.TrimSpace(s)
			for _, c := range []byte(digits) {
				if c < '0' || c > '9' {
					t.Fatalf("ParseLastEventID(%q) accepted a non-digit", s)
				}
			}
			if n < 0 || digits == "" && n != 0 {
				t.Fatalf("ParseLastEventID(%q) = %d", s, n)
			}
			if back, ok := ParseLastEventID(strconv.FormatInt(n, 10)); !ok || back != n {
				t.Fatalf("ParseLastEventID(%q) = %d, which does not round-trip (%d, %v)", s, n, back, ok)
			}
		} else if n != 0 {
			t.Fatalf("ParseLastEventID(%q) refused it but returned %d", s, n)
		}
		if seq < 0 {
			return
		}
		id := strconv.FormatInt(seq, 10)
		if got, ok := ParseLastEventID(id); !ok || got != seq {
			t.Fatalf("event id %q parses as (%d, %v), want %d", id, got, ok, seq)
		}
	})
}
