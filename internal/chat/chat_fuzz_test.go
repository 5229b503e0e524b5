package chat

import (
	"regexp"
	"testing"
)

// FuzzValidID checks that ValidID agrees with the regular expression of
// PROTOCOL.md "Identifiers" on every input, valid UTF-8 or not. Seeds are in
// testdata/fuzz/FuzzValidID.
func FuzzValidID(f *testing.F) {
	re := regexp.MustCompile(`^[A-Za-z0-9_.:-]{1,128}$`)
	f.Fuzz(func(t *testing.T, s string) {
		if got, want := ValidID(s), re.MatchString(s); got != want {
			t.Fatalf("ValidID(%q) = %v, the regexp says %v", s, got, want)
		}
	})
}
