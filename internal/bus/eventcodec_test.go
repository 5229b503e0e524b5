package bus

import (
	"encoding/json"
	"math/rand/v2"
	"testing"
)

func TestDeltaCodecMatchesEncodingJSON(t *testing.T) {
	texts := []string{"", "plain", "quote \" back \\ slash", "line\nbreak\ttab", "ctrl \x01",
		"héllo ✓ 🎉", "bad \xff utf8", "\u2028", "<script>&</script>"}
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 2000; i++ {
		e := &Event{Kind: KindDelta, Seq: r.Int64N(1 << 40), Off: r.Int64N(1 << 30), TS: r.Int64N(1 << 52),
			Text: texts[r.IntN(len(texts))]}
		if i%5 == 0 {
			e.Off, e.TS = 0, 0
		}
		fast := appendDelta(nil, e)
		var viaJSON, viaFast Event
		if err := json.Unmarshal(fast, &viaJSON); err != nil {
			t.Fatalf("appendDelta wrote invalid JSON %s: %v", fast, err)
		}
		std, _ := json.Marshal(e)
		if !decodeDelta(std, &viaFast) {
			t.Fatalf("decodeDelta refused %s", std)
		}
		if viaJSON != viaFast {
			t.Fatalf("codecs disagree:\n%+v\n%+v", viaJSON, viaFast)
		}
	}
}

func TestDecodeDelta(t *testing.T) {
	tests := []struct {
		in   string
		ok   bool
		want Event
	}{
		{`{"q":3,"o":10,"x":"hi","ts":5}`, true, Event{Seq: 3, Off: 10, Text: "hi", TS: 5}},
		{` { "x" : "a\nb" , "q" : 1 } `, true, Event{Seq: 1, Text: "a\nb"}},
		{`{}`, true, Event{}},
		{`{"q":1,"st":"complete"}`, false, Event{}},
		{`{"q":"1"}`, false, Event{}},
		{`{"q":1`, false, Event{}},
		{`{"x":"unterminated}`, false, Event{}},
		{`{"q":1} extra`, false, Event{}},
		{`[1]`, false, Event{}},
	}
	for _, tt := range tests {
		var e Event
		ok := decodeDelta([]byte(tt.in), &e)
		if ok != tt.ok || ok && e != tt.want {
			t.Errorf("decodeDelta(%s) = %v %+v, want %v %+v", tt.in, ok, e, tt.ok, tt.want)
		}
	}
}

func FuzzDecodeDelta(f *testing.F) {
	f.Add([]byte(`{"q":3,"o":10,"x":"hi","ts":5}`))
	f.Add([]byte(`{"x":"a\u00e9\\\"","q":1}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var fast, std Event
		if !decodeDelta(data, &fast) {
			return
		}
		if err := json.Unmarshal(data, &std); err != nil {
			t.Fatalf("decodeDelta accepted %q, which encoding/json refuses: %v", data, err)
		}
		if fast != std {
			t.Fatalf("decodeDelta(%q) = %+v, encoding/json %+v", data, fast, std)
		}
	})
}
