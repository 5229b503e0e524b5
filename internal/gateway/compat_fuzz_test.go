package gateway

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/tokenrelay/tokenrelay/internal/chat"
)

// FuzzCompatInput checks what the compat protocol reads from a client, a
// socket frame or a request body: it never panics; lastChunkIndex is read
// as a whole number in 0..2^53, never negative; a body is taken only when
// it is one JSON object, and is refused otherwise with a 400 that says so;
// a session_id taken is a valid id; and a string field taken was a JSON
// string. Seeds are in testdata/fuzz/FuzzCompatInput.
func FuzzCompatInput(f *testing.F) {
	for _, seed := range []string{
		`{"type":"reconnect","messageId":"m1","lastChunkIndex":3}`,
		`{"type":"reconnect","message_id":"m1","lastChunkIndex":"7"}`,
		`{"type":"reconnect","lastChunkIndex":"NaN"}`,
		`{"type":"reconnect","lastChunkIndex":-1e400}`,
		`{"message":"hi","session_id":"s1","user_id":"u"}`,
		`{"session_id":null,"message":1}`,
		`[{"session_id":"s"}]`,
		`null`,
	} {
		f.Add([]byte(seed))
	}
	cp := &compat{s: &Server{}}
	f.Fuzz(func(t *testing.T, data []byte) {
		var fr compatClientFrame
		if json.Unmarshal(data, &fr) == nil {
			if k := chunkIndex(fr.LastChunkIndex); k < 0 || k > 1<<53 {
				t.Fatalf("lastChunkIndex %s read as %d", fr.LastChunkIndex, k)
			}
		}

		r := httptest.NewRequest(http.MethodPost, "/api/chat", bytes.NewReader(data))
		body, err := cp.readCompatBody(httptest.NewRecorder(), r)
		if err != nil {
			var ce *compatError
			if !errors.As(err, &ce) || ce.status != http.StatusBadRequest || ce.detail == "" {
				t.Fatalf("refused with %#v", err)
			}
			if body != nil {
				t.Fatalf("refused, yet returned %v", body)
			}
			return
		}
		if trimmed := bytes.TrimSpace(data); !json.Valid(data) || len(trimmed) == 0 || trimmed[0] != '{' {
			t.Fatalf("took %q as a JSON object", data)
		}
		if sid, err := compatSessionField(body); err == nil && !chat.ValidID(sid) {
			t.Fatalf("took session_id %q", sid)
		}
		for name, raw := range body {
			v, present, err := compatField(body, name)
			if err != nil {
				continue
			}
			var want *string
			if json.Unmarshal(raw, &want) != nil || present != (want != nil) || present && v != *want {
				t.Fatalf("field %s = %s read as %q, %v", name, raw, v, present)
			}
		}
	})
}
