package main

import "testing"

func TestParseFrame(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want func(f *frame) bool
	}{
		{"delta", `{"type":"turn.delta","conversation_id":"c1","turn_id":"t1","seq":7,"text":"ab","ts":1700000000000001}`,
			func(f *frame) bool {
				return string(f.typ) == "turn.delta" && string(f.conv) == "c1" && string(f.turn) == "t1" && f.seq == 7 && f.from == 0 && f.ts == 1700000000000001 && f.textLen == 4
			}},
		{"merged delta, fields reordered, escapes", ` { "text" : "a\"b\\" , "from":3, "seq":5 ,"turn_id":"t","type":"turn.delta"}`,
			func(f *frame) bool { return f.from == 3 && f.seq == 5 && string(f.turn) == "t" }},
		{"end with usage", `{"type":"turn.end","turn_id":"t","seq":9,"status":"complete","usage":{"prompt_tokens":3,"completion_tokens":12}}`,
			func(f *frame) bool { return string(f.status) == "complete" && f.completion == 12 && f.seq == 9 }},
		{"joined with active and messages", `{"type":"joined","conversation_id":"c","messages":[{"message_id":"m","content":"x]}"},{}],"active":{"turn_id":"t","seq":40,"from":31,"text":"..."}}`,
			func(f *frame) bool {
				return f.hasActive && string(f.active.turn) == "t" && f.active.seq == 40 && f.active.from == 31 && f.messages == 2
			}},
		{"joined without active", `{"type":"joined","messages":[],"active":null}`,
			func(f *frame) bool { return !f.hasActive && f.messages == 0 }},
		{"error", `{"type":"error","id":"s3","code":"turn_active","message":"busy","retry_after_ms":1.5e3}`,
			func(f *frame) bool { return string(f.code) == "turn_active" && string(f.id) == "s3" }},
		{"bools and nested arrays skipped", `{"type":"ack","already":true,"x":[1,[2,{"a":false}]],"y":null,"seq":1}`,
			func(f *frame) bool { return string(f.typ) == "ack" && f.seq == 1 }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var f frame
			if err := parseFrame([]byte(tt.in), &f); err != nil {
				t.Fatalf("parseFrame: %v", err)
			}
			if !tt.want(&f) {
				t.Fatalf("parsed %+v", f)
			}
		})
	}
}

func TestParseFrameRejects(t *testing.T) {
	for _, in := range []string{``, `[]`, `{"type":"x"`, `{"type" "x"}`, `{"seq":1,}`, `{"text":"open}`} {
		var f frame
		if err := parseFrame([]byte(in), &f); err == nil {
			t.Errorf("parseFrame(%q) accepted", in)
		}
	}
}

func TestParseFrameDoesNotAllocate(t *testing.T) {
	in := []byte(`{"type":"turn.delta","conversation_id":"c1","turn_id":"t1","seq":7,"text":" word","ts":1700000000000001}`)
	var f frame
	if n := testing.AllocsPerRun(100, func() { _ = parseFrame(in, &f) }); n != 0 {
		t.Fatalf("parseFrame allocates %v times per delta", n)
	}
}

func BenchmarkParseDelta(b *testing.B) {
	in := []byte(`{"type":"turn.delta","conversation_id":"c-abc-123","turn_id":"t-abc-123-4","seq":77,"text":" lantern","ts":1700000000000001}`)
	var f frame
	for b.Loop() {
		_ = parseFrame(in, &f)
	}
}
