package bus

import (
	"encoding/json"
	"testing"
)

// FuzzDecodeHead checks the decoding of a snapshot head as read from the
// turns bucket: it never panics; a head it accepts never makes EndOf or
// ReadText index out of range for any seq or offset (those that need no
// other key of the bucket are tried); and a head as SnapshotWriter.Write
// makes it decodes to the same counts, text and index.
func FuzzDecodeHead(f *testing.F) {
	f.Add([]byte(`{"c":"c","q":3,"ss":7,"tl":"aGVsbG8=","ix":3,"xe":"AQAAAAIAAAAFAAAA","st":"streaming"}`), []byte("hello"), uint16(3), uint16(1))
	f.Add([]byte(`{"c":"c","q":2000,"n":1,"ix":1500,"xn":1,"xe":"","st":"complete"}`), []byte{}, uint16(1500), uint16(9))
	f.Add([]byte(`{"q":1,"ix":5,"xe":"AQAAAA=="}`), []byte("x"), uint16(0), uint16(0))
	var b *Bus // EndOf and ReadText use it only to read other keys
	f.Fuzz(func(t *testing.T, data, tail []byte, indexed, extra uint16) {
		check := func(h Head) {
			for seq := int64(-1); seq <= h.Seq+1; seq++ {
				if seq > 0 && seq <= h.indexed && seq != h.Seq && (seq-1)/IndexSize < int64(h.idxChunks) {
					continue // in an index chunk of its own
				}
				if end, ok, err := b.EndOf(t.Context(), h, seq); err != nil || ok && (end < 0 || seq == h.Seq && seq > 0 && end != h.Len) {
					t.Fatalf("EndOf(%d) = %d, %v, %v", seq, end, ok, err)
				}
				if seq > 3000 {
					break
				}
			}
			if h.chunks == 0 {
				for from := int64(-1); from <= h.Len+1; from++ {
					text, err := b.ReadText(t.Context(), h, from)
					if (err == nil) != (from >= 0 && from <= h.Len) || err == nil && text != string(h.tail[from:]) {
						t.Fatalf("ReadText(%d) = %q, %v", from, text, err)
					}
				}
			}
		}
		if h, err := decodeHead("t", data); err == nil {
			check(h)
		}

		// A head as the writer makes it: the lengths after deltas
		// idxChunks*IndexSize+1 .. indexed, a seq at or past indexed.
		idx := int64(indexed)
		ends := make([]uint32, idx%IndexSize)
		for i := range ends {
			ends[i] = uint32(i) * 3
		}
		sh := snapshotHead{
			Conv: "c", Seq: idx + int64(extra), StreamSeq: 9, Tail: tail,
			Indexed: idx, IdxChunks: int(idx / IndexSize), Ends: packEnds(ends), Status: "streaming",
		}
		enc, err := json.Marshal(sh)
		if err != nil {
			t.Fatal(err)
		}
		h, err := decodeHead("t", enc)
		if err != nil {
			t.Fatalf("decodeHead(%s): %v", enc, err)
		}
		if h.ConversationID != "c" || h.Seq != sh.Seq || h.StreamSeq != 9 || h.Len != int64(len(tail)) || string(h.tail) != string(tail) || h.Status != "streaming" {
			t.Fatalf("decodeHead(%s) = %+v", enc, h)
		}
		for i, want := range ends {
			seq := int64(sh.IdxChunks)*IndexSize + int64(i) + 1
			if seq == h.Seq {
				continue
			}
			if end, ok, err := b.EndOf(t.Context(), h, seq); err != nil || !ok || end != int64(want) {
				t.Fatalf("EndOf(%d) = %d, %v, %v; want %d", seq, end, ok, err, want)
			}
		}
		check(h)
	})
}
