package bus

import (
	"encoding/binary"
	"hash/crc32"
	"testing"
)

// TestDeltaRecordHoldsStoredSubjectAndEncoding: the journal writes a
// delta's record without making its subject or encoding; the record must
// hold exactly what those would be, or Replay stores deltas elsewhere.
func TestDeltaRecordHoldsStoredSubjectAndEncoding(t *testing.T) {
	for _, e := range []*Event{
		{Kind: KindDelta, ConversationID: "c", TurnID: "t", Seq: 1, Text: "a"},
		{Kind: KindDelta, ConversationID: "c.1:x", TurnID: "t:1.y", Seq: 42, Off: 7, Text: "é \"q\"\n", TS: 1_700_000_000_000_000},
		{Kind: KindDelta, ConversationID: "conv-0001", TurnID: "0199a0b1-7c2d-7e3f-8a9b-0c1d2e3f4a5b", Seq: 3},
	} {
		data := appendDelta(nil, e)
		rec := make([]byte, recordSize(2+storedSubjectLen(e)+len(data)))
		putDeltaRecord(rec, e, data)

		n := int(binary.LittleEndian.Uint32(rec))
		p := rec[journalHeader : journalHeader+n]
		if crc32.Checksum(p, journalCRC) != binary.LittleEndian.Uint32(rec[4:]) {
			t.Fatalf("%+v: checksum does not match", e)
		}
		sl := int(binary.LittleEndian.Uint16(p))
		subj, body := string(p[2:2+sl]), string(p[2+sl:])
		wantData, _ := e.encode()
		if subj != e.StoredSubject() || body != string(wantData) {
			t.Fatalf("record holds %q %q; want %q %q", subj, body, e.StoredSubject(), wantData)
		}
		got, err := DecodeEvent(subj, p[2+sl:])
		if err != nil || got.ConversationID != e.ConversationID || got.TurnID != e.TurnID || got.Seq != e.Seq || got.Text != e.Text {
			t.Fatalf("decoded %+v, %v; want %+v", got, err, e)
		}
	}
}
