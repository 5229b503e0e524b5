package gateway

import (
	"net/http/httptest"
	"testing"

	"github.com/tokenrelay/tokenrelay/internal/protocol"
)

// writeObject writes the bytes writeJSON writes for the map of the same
// fields, lists included, empty or not.
func TestWriteObjectIsWriteJSON(t *testing.T) {
	msgs := []protocol.Message{{MessageID: "m1", Content: "<b>\"quoted\" & \u2028</b>"}, {MessageID: "m2", Content: "é"}}
	for _, c := range []struct {
		name   string
		fields []jsonField
		want   map[string]any
	}{
		{"list", []jsonField{{name: "has_more", v: true}, {name: "messages", list: listOf(msgs)}},
			map[string]any{"has_more": true, "messages": msgs}},
		{"empty list", []jsonField{{name: "count", v: 0}, {name: "messages", list: []any{}}, {name: "session_id", v: "s<1>"}},
			map[string]any{"count": 0, "messages": []protocol.Message{}, "session_id": "s<1>"}},
	} {
		got, want := httptest.NewRecorder(), httptest.NewRecorder()
		writeObject(got, 200, c.fields...)
		writeJSON(want, 200, c.want)
		if got.Body.String() != want.Body.String() || got.Header().Get("Content-Type") != want.Header().Get("Content-Type") {
			t.Errorf("%s: writeObject wrote %q, writeJSON %q", c.name, got.Body, want.Body)
		}
	}
}
