package chat

import (
	"regexp"
	"strings"
	"testing"
)

func TestValidID(t *testing.T) {
	re := regexp.MustCompile(`^[A-Za-z0-9_.:-]{1,128}$`)
	tests := []struct {
		name string
		id   string
		want bool
	}{
		{"simple", "abc", true},
		{"all punctuation", "a_b.c:d-e", true},
		{"uuid", "0190a1b2-c3d4-7e8f-9a0b-1c2d3e4f5a6b", true},
		{"empty", "", false},
		{"space", "a b", false},
		{"slash", "a/b", false},
		{"unicode", "héllo", false},
		{"max length", strings.Repeat("x", 128), true},
		{"too long", strings.Repeat("x", 129), false},
		{"star", "a*", false},
		{"gt", "a>", false},
		{"nul", "a\x00", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := ValidID(tt.id); got != tt.want {
				t.Errorf("ValidID(%q) = %v, want %v", tt.id, got, tt.want)
			}
			if got := re.MatchString(tt.id); got != tt.want {
				t.Errorf("pattern(%q) = %v, want %v", tt.id, got, tt.want)
			}
		})
	}
}

func TestTurnStatusTerminal(t *testing.T) {
	tests := []struct {
		s    TurnStatus
		want bool
	}{
		{StatusQueued, false}, {StatusStreaming, false}, {StatusComplete, true},
		{StatusCancelled, true}, {StatusError, true}, {StatusInterrupted, true},
	}
	for _, tt := range tests {
		if got := tt.s.Terminal(); got != tt.want {
			t.Errorf("%s.Terminal() = %v, want %v", tt.s, got, tt.want)
		}
	}
}

func TestStorableText(t *testing.T) {
	for in, want := range map[string]string{"": "", "plain": "plain", "a\x00b\x00": "a\uFFFDb\uFFFD", "\x00": "\uFFFD"} {
		if got := StorableText(in); got != want {
			t.Errorf("StorableText(%q) = %q, want %q", in, got, want)
		}
	}
}
