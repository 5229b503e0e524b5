package bus

import (
	"errors"
	"testing"

	"github.com/nats-io/nats.go"
)

func TestParseAck(t *testing.T) {
	ok := []struct {
		data string
		seq  uint64
	}{
		{`{"stream":"TR_EVENTS","seq":42}`, 42},
		{`{"stream":"TR_EVENTS", "seq":7,"duplicate":true}`, 7},
		{`{"stream":"TR_EVENTS","domain":"x","seq":18446744073709551615}`, 18446744073709551615},
	}
	for _, tt := range ok {
		seq, err := parseAck(&nats.Msg{Data: []byte(tt.data)})
		if err != nil || seq != tt.seq {
			t.Errorf("parseAck(%s) = %d, %v; want %d", tt.data, seq, err, tt.seq)
		}
	}
	bad := []string{
		`{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}`,
		`{"stream":"TR_EVENTS"}`,
		`{"stream":"TR_EVENTS","seq":0}`,
		`{"stream":"TR_EVENTS","seq":-1}`,
		`not json`,
	}
	for _, data := range bad {
		if seq, err := parseAck(&nats.Msg{Data: []byte(data)}); err == nil {
			t.Errorf("parseAck(%s) = %d, nil; want an error", data, seq)
		}
	}
	m := &nats.Msg{Header: nats.Header{"Status": []string{"503"}}}
	if _, err := parseAck(m); !errors.Is(err, nats.ErrNoResponders) {
		t.Errorf("503 status: %v, want no responders", err)
	}
	if _, err := parseAck(&nats.Msg{}); err == nil {
		t.Error("an empty answer must be an error")
	}
}

// A delta still waiting for its acknowledgement is not recycled: the answer
// would settle a delta reused by another turn.
func TestRecycleWaitsForTheAnswer(t *testing.T) {
	pd := &PendingDelta{Seq: 3, done: make(chan struct{})}
	pd.Recycle()
	if pd.Seq != 3 || pd.done == nil {
		t.Fatal("an unsettled delta was recycled")
	}
	pd.settle(9, nil)
	pd.Recycle()
	if pd.Seq != 0 || pd.done != nil {
		t.Fatal("a settled delta was not recycled")
	}
}
