package bus

import (
	"testing"
	"unicode/utf8"
)

// FuzzDecodeSegment checks the journal reader that Replay runs when serve
// starts, on what a crash or a bad disk may leave: it never panics and
// hands on only deltas; every whole record before garbage is read back as
// written, in order; a record cut short or torn is never read, and the
// whole records after it are; and a zeroed (reserved, never written)
// region is stepped over.
func FuzzDecodeSegment(f *testing.F) {
	f.Add([]byte{}, "hé", uint16(0))
	f.Add([]byte("\x10\x00\x00\x00\x00\x00\x00\x00tr.evs.c.t.d{}"), "", uint16(9))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0}, "a\nb\"c", uint16(300))
	f.Fuzz(func(t *testing.T, garbage []byte, text string, cut uint16) {
		decodeSegment(garbage, func(e Event) {
			if e.Kind != KindDelta {
				t.Fatalf("handed on a %q event", e.Kind)
			}
		})

		if !utf8.ValidString(text) {
			text = "x"
		}
		events := []Event{
			{Kind: KindDelta, ConversationID: "c.1", TurnID: "t:1", Seq: 1, Text: text, TS: 5},
			{Kind: KindDelta, ConversationID: "c.1", TurnID: "t:1", Seq: 2, Off: int64(len(text)), Text: "b"},
			{Kind: KindDelta, ConversationID: "c", TurnID: "u", Seq: 1, Text: text + text},
		}
		var seg []byte
		var ends []int  // where each record ends
		var whole []int // where its payload ends: the padding after it may go
		for i := range events {
			e := &events[i]
			data := appendDelta(nil, e)
			rec := make([]byte, recordSize(2+storedSubjectLen(e)+len(data)))
			putDeltaRecord(rec, e, data)
			whole = append(whole, len(seg)+journalHeader+2+storedSubjectLen(e)+len(data))
			seg = append(seg, rec...)
			ends = append(ends, len(seg))
		}
		read := func(data []byte) []Event {
			var got []Event
			decodeSegment(data, func(e Event) { got = append(got, e) })
			return got
		}
		same := func(got, want []Event) bool {
			if len(got) < len(want) {
				return false
			}
			for i := range want {
				if got[i] != want[i] {
					return false
				}
			}
			return true
		}

		// Whole records, then garbage.
		if got := read(append(seg[:len(seg):len(seg)], garbage...)); !same(got, events) {
			t.Fatalf("records then %q: read %+v, want %+v first", garbage, got, events)
		}
		// Cut short anywhere: the whole records before the cut, only.
		c := int(cut) % (len(seg) + 1)
		k := 0
		for k < len(whole) && whole[k] <= c {
			k++
		}
		if got := read(seg[:c]); len(got) != k || !same(got, events[:k]) {
			t.Fatalf("cut at %d of %d: read %+v, want %+v", c, len(seg), got, events[:k])
		}
		// A torn record, its checksum not yet written, before whole ones.
		torn := append([]byte(nil), seg...)
		clear(torn[4:8])
		clear(torn[8+int(cut)%(ends[0]-8) : ends[0]])
		if got := read(torn); len(got) != len(events)-1 || !same(got, events[1:]) {
			t.Fatalf("torn first record: read %+v, want %+v", got, events[1:])
		}
		// A reserved region, all zeros, between records.
		gap := make([]byte, journalAlign*(1+int(cut)%64))
		zeroed := append(append(seg[:ends[0]:ends[0]], gap...), seg[ends[0]:]...)
		if got := read(zeroed); len(got) != len(events) || !same(got, events) {
			t.Fatalf("zeros after the first record: read %+v, want %+v", got, events)
		}
	})
}
