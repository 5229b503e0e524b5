package protocol

import (
	"encoding/json"
	"errors"
	"reflect"
	"regexp"
	"testing"
	"unicode/utf8"
)

// idRE is PROTOCOL.md's identifier rule, kept apart from chat.ValidID so
// that the two are checked against each other.
var idRE = regexp.MustCompile(`^[A-Za-z0-9_.:-]{1,128}$`)

// FuzzDecodeClient checks the client frame decoder: it never panics; a
// refusal is a *DecodeError whose echoed id is short; an accepted frame is
// one JSON object that satisfies every rule of PROTOCOL.md for its type; and
// an accepted frame re-encodes to one that decodes to the same value. Seeds
// are in testdata/fuzz/FuzzDecodeClient.
func FuzzDecodeClient(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		fr, err := DecodeClient(data)
		if err != nil {
			var de *DecodeError
			if !errors.As(err, &de) {
				t.Fatalf("error %T %v is not a *DecodeError", err, err)
			}
			if idTooLong(de.ID) {
				t.Fatalf("echoes a %d-character id", utf8.RuneCountInString(de.ID))
			}
			if fr != (ClientFrame{}) {
				t.Fatalf("refused frame returned %+v", fr)
			}
			return
		}
		if msg := violation(fr); msg != "" {
			t.Fatalf("accepted %q: %s (%+v)", data, msg, fr)
		}
		enc, err := json.Marshal(fr)
		if err != nil {
			t.Fatal(err)
		}
		again, err := DecodeClient(enc)
		if err != nil {
			t.Fatalf("re-encoded %s refused: %v", enc, err)
		}
		if !reflect.DeepEqual(again, fr) {
			t.Fatalf("round trip: %+v → %s → %+v", fr, enc, again)
		}
		if !json.Valid(data) {
			t.Fatalf("accepted invalid JSON %q", data)
		}
	})
}

// violation names the first rule of PROTOCOL.md that fr breaks, or "".
func violation(fr ClientFrame) string {
	if utf8.RuneCountInString(fr.ID) > MaxFrameIDLen {
		return "id longer than 64"
	}
	id := func(s string, required bool) bool { return s == "" && !required || idRE.MatchString(s) }
	switch fr.Type {
	case TypePing:
	case TypeJoin:
		if !id(fr.ConversationID, true) {
			return "bad conversation_id"
		}
		if fr.History != nil && (*fr.History < 0 || *fr.History > MaxHistory) {
			return "history out of range"
		}
		if fr.After != nil && (!id(fr.After.TurnID, true) || fr.After.Seq < 0) {
			return "bad after"
		}
	case TypeLeave:
		if !id(fr.ConversationID, true) {
			return "bad conversation_id"
		}
	case TypeSend:
		if !id(fr.ConversationID, true) || !id(fr.MessageID, false) || !id(fr.TurnID, false) {
			return "bad id"
		}
		if fr.Text == "" || !utf8.ValidString(fr.Text) {
			return "bad text"
		}
		if len(fr.Model) > 256 {
			return "model too long"
		}
	case TypeCancel:
		if !id(fr.TurnID, true) {
			return "bad turn_id"
		}
	default:
		return "unknown type"
	}
	return ""
}
