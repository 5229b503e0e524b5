package bus_test

import (
	"strings"
	"testing"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
	"github.com/tokenrelay/tokenrelay/internal/chat"
)

func TestToken(t *testing.T) {
	tests := []struct{ id, tok string }{
		{"abc", "abc"}, {"a.b", "a/b"}, {"a:b", "a=b"}, {"x.y:z-_", "x/y=z-_"},
	}
	for _, tt := range tests {
		if got := bus.Token(tt.id); got != tt.tok {
			t.Errorf("Token(%q) = %q, want %q", tt.id, got, tt.tok)
		}
		if got := bus.Untoken(tt.tok); got != tt.id {
			t.Errorf("Untoken(%q) = %q, want %q", tt.tok, got, tt.id)
		}
	}
}

func TestMarkCancelledOnce(t *testing.T) {
	b := bustest.Start(t)
	for _, id := range []string{"t1", "t.2", "t:3"} {
		first, err := b.MarkCancelled(t.Context(), id)
		if err != nil || !first {
			t.Fatalf("first MarkCancelled(%s) = %v, %v; want true", id, first, err)
		}
		again, err := b.MarkCancelled(t.Context(), id)
		if err != nil || again {
			t.Fatalf("second MarkCancelled(%s) = %v, %v; want false", id, again, err)
		}
		if ok, err := b.IsCancelled(t.Context(), id); !ok || err != nil {
			t.Fatalf("IsCancelled(%s) = %v, %v", id, ok, err)
		}
	}
	if ok, _ := b.IsCancelled(t.Context(), "other"); ok {
		t.Fatal("IsCancelled of an unmarked turn")
	}
}

func TestSnapshotChunksAndMarks(t *testing.T) {
	b := bustest.Start(t)
	w := b.NewSnapshotWriter("c.1", "t:1")
	var text []byte
	var seq int64
	// Grow past three chunks with deltas of varying size.
	for len(text) < 3*bus.ChunkSize+1000 {
		seq++
		piece := strings.Repeat(string(rune('a'+seq%26)), int(seq%700)+1)
		text = append(text, piece...)
		if seq%50 == 0 {
			if err := w.Write(t.Context(), text, seq, uint64(seq*10), chat.StatusStreaming); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := w.Write(t.Context(), text, seq, uint64(seq*10), chat.StatusStreaming); err != nil {
		t.Fatal(err)
	}
	s, err := b.ReadSnapshot(t.Context(), "t:1")
	if err != nil {
		t.Fatal(err)
	}
	if s.Text != string(text) || s.Seq != seq || s.StreamSeq != uint64(seq*10) || s.ConversationID != "c.1" {
		t.Fatalf("snapshot seq=%d sseq=%d len=%d conv=%s, want seq=%d len=%d", s.Seq, s.StreamSeq, len(s.Text), s.ConversationID, seq, len(text))
	}
	if len(s.Marks) == 0 {
		t.Fatal("no marks")
	}
	for _, m := range s.Marks {
		if m.StreamSeq != uint64(m.Seq*10) {
			t.Fatalf("mark %+v inconsistent", m)
		}
	}
	tests := []struct {
		name string
		seq  int64
	}{{"start", 0}, {"before first mark", bus.MarkEvery - 1}, {"middle", seq / 2}, {"end", seq}, {"past end", seq + 5}}
	for _, tt := range tests {
		m := s.Locate(tt.seq)
		if m.Seq > tt.seq && tt.seq < seq {
			t.Errorf("%s: Locate(%d) = %+v, beyond the seq", tt.name, tt.seq, m)
		}
	}
	if _, err := b.ReadSnapshot(t.Context(), "missing"); err != bus.ErrNoSnapshot {
		t.Fatalf("missing snapshot: %v", err)
	}
}
