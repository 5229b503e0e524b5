package bus_test

import (
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
)

// connect opens a connection to urls, closed at the end of the test.
func connect(t *testing.T, urls string) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(urls)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// Raising the replicas of a running cluster the documented way, a process
// started with the new value, scales the streams and the job consumer up,
// although the consumer cannot have more replicas than its stream until
// the stream's new peers are in place.
func TestOpenRaisesReplicas(t *testing.T) {
	urls := bustest.StartCluster(t, 3)
	nc := connect(t, urls)
	if _, err := bus.Open(t.Context(), nc, bus.Config{Replicas: 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := bus.Open(t.Context(), connect(t, urls), bus.Config{Replicas: 3}); err != nil {
		t.Fatalf("open with --replicas 3 after 1: %v", err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{bus.EventsStream, bus.JobsStream, "KV_" + bus.TurnsBucket, "KV_" + bus.CancelBucket} {
		s, err := js.Stream(t.Context(), name)
		if err != nil {
			t.Fatal(err)
		}
		if r := s.CachedInfo().Config.Replicas; r != 3 {
			t.Errorf("%s has %d replicas, want 3", name, r)
		}
	}
	cons, err := js.Consumer(t.Context(), bus.JobsStream, bus.JobsConsumer)
	if err != nil {
		t.Fatal(err)
	}
	if r := cons.CachedInfo().Config.Replicas; r != 3 {
		t.Errorf("the job consumer has %d replicas, want 3", r)
	}
}
