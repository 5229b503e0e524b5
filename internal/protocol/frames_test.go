package protocol

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestDecodeClient(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		wantErr string // substring; empty = valid
		wantID  string
	}{
		{"join", `{"type":"join","conversation_id":"c1"}`, "", ""},
		{"join with after and history", `{"type":"join","conversation_id":"c1","after":{"turn_id":"t","seq":3},"history":10,"id":"j"}`, "", "j"},
		{"leave", `{"type":"leave","conversation_id":"c.1:x"}`, "", ""},
		{"send", `{"type":"send","conversation_id":"c","text":"hi","message_id":"m","turn_id":"t","model":"x"}`, "", ""},
		{"cancel", `{"type":"cancel","turn_id":"t"}`, "", ""},
		{"ping", `{"type":"ping","id":"p"}`, "", "p"},
		{"invalid json keeps id", `{"id":"x","type":`, "invalid JSON", ""},
		{"two objects", `{"type":"ping"} {"type":"ping"}`, "one JSON object", ""},
		{"trailing bracket", `{"type":"ping"}]`, "one JSON object", ""},
		{"trailing brace", `{"type":"ping"} }`, "one JSON object", ""},
		{"trailing space is fine", "{\"type\":\"ping\"} \n", "", ""},
		{"unknown type", `{"type":"nope","id":"u"}`, "unknown type", "u"},
		{"no type", `{}`, "type is required", ""},
		{"join without conversation", `{"type":"join"}`, "conversation_id is required", ""},
		{"bad conversation", `{"type":"join","conversation_id":"a b"}`, "must match", ""},
		{"history too big", `{"type":"join","conversation_id":"c","history":501}`, "history", ""},
		{"negative after", `{"type":"join","conversation_id":"c","after":{"turn_id":"t","seq":-1}}`, "after.seq", ""},
		{"after without turn", `{"type":"join","conversation_id":"c","after":{"seq":1}}`, "after.turn_id", ""},
		{"send without text", `{"type":"send","conversation_id":"c"}`, "text is required", ""},
		{"send bad turn id", `{"type":"send","conversation_id":"c","text":"x","turn_id":"t/1"}`, "turn_id", ""},
		{"send with an empty message id", `{"type":"send","conversation_id":"c","text":"x","message_id":"","id":"e"}`, "message_id must match", "e"},
		{"send with an empty turn id", `{"type":"send","conversation_id":"c","text":"x","turn_id":""}`, "turn_id must match", ""},
		{"send with null ids", `{"type":"send","conversation_id":"c","text":"x","message_id":null,"turn_id":null}`, "", ""},
		{"send with an escaped key", `{"type":"send","conversation_id":"c","text":"x","turn\u005fid":""}`, "turn_id must match", ""},
		{"send with the key in its text", `{"type":"send","conversation_id":"c","text":"\"turn_id\":\"\""}`, "", ""},
		{"cancel without turn", `{"type":"cancel"}`, "turn_id is required", ""},
		{"id too long", `{"type":"ping","id":"` + strings.Repeat("x", 65) + `"}`, "id longer", ""},
		{"id of 64 characters in 128 bytes", `{"type":"ping","id":"` + strings.Repeat("é", 64) + `"}`, "", strings.Repeat("é", 64)},
		{"id of 65 characters", `{"type":"ping","id":"` + strings.Repeat("é", 65) + `"}`, "id longer", ""},
		{"text wrong type", `{"type":"send","conversation_id":"c","text":1}`, "wrong type", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, err := DecodeClient([]byte(tt.in))
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("DecodeClient(%s) = %v", tt.in, err)
				}
				if f.ID != tt.wantID {
					t.Fatalf("id = %q, want %q", f.ID, tt.wantID)
				}
				return
			}
			de, ok := err.(*DecodeError)
			if !ok || !strings.Contains(de.Message, tt.wantErr) {
				t.Fatalf("DecodeClient(%s) = %v, want an error containing %q", tt.in, err, tt.wantErr)
			}
			if de.ID != tt.wantID {
				t.Fatalf("error id = %q, want %q", de.ID, tt.wantID)
			}
		})
	}
}

// A cursor past any possible seq is read as MaxSeq, so that no seq+1
// computed from it overflows.
func TestDecodeClientHugeAfter(t *testing.T) {
	f, err := DecodeClient([]byte(`{"type":"join","conversation_id":"c","after":{"turn_id":"t","seq":9223372036854775807}}`))
	if err != nil {
		t.Fatal(err)
	}
	if f.After.Seq != MaxSeq {
		t.Fatalf("after.seq %d, want %d", f.After.Seq, MaxSeq)
	}
}

func TestAppendJSONStringMatchesEncodingJSON(t *testing.T) {
	tests := []string{"", "plain", `quote " and \ slash`, "line\nbreak\ttab\r", "ctrl \x00\x01\x1f",
		"unicode héllo ✓ 🎉", "invalid \xff\xfe utf8", "line sep \u2028 para \u2029", "<script>&amp;</script>"}
	for _, s := range tests {
		got := AppendJSONString(nil, []byte(s))
		var back string
		if err := json.Unmarshal(got, &back); err != nil {
			t.Fatalf("AppendJSONString(%q) = %s: invalid JSON: %v", s, got, err)
		}
		want, _ := json.Marshal(s)
		var wantBack string
		json.Unmarshal(want, &wantBack)
		if back != wantBack {
			t.Fatalf("AppendJSONString(%q) decodes to %q, encoding/json to %q", s, back, wantBack)
		}
	}
}

func TestAppendDelta(t *testing.T) {
	tests := []struct {
		name      string
		from, seq int64
		ts        int64
		want      string
	}{
		{"single", 3, 3, 0, `{"type":"turn.delta","conversation_id":"c","turn_id":"t","seq":3,"text":"a\"b"}`},
		{"merged", 2, 5, 0, `{"type":"turn.delta","conversation_id":"c","turn_id":"t","seq":5,"from":2,"text":"a\"b"}`},
		{"with ts", 1, 1, 99, `{"type":"turn.delta","conversation_id":"c","turn_id":"t","seq":1,"text":"a\"b","ts":99}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := string(AppendDelta(nil, "c", "t", tt.from, tt.seq, []byte(`a"b`), tt.ts))
			if got != tt.want {
				t.Fatalf("got  %s\nwant %s", got, tt.want)
			}
		})
	}
}
