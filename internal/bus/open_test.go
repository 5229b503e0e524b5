package bus_test

import (
	"bytes"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

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

// relayJS starts a nats-server without JetStream whose JetStream API
// requests a test connection relays to one with JetStream, except those
// that intercept takes: it answers them with the reply it returns, or not
// at all for none, as a busy cluster may leave them. It returns the URL of
// the server without JetStream.
func relayJS(t *testing.T, intercept func(subject string) (taken bool, reply []byte)) string {
	t.Helper()
	start := func(js bool) *bus.Embedded {
		emb, err := bus.StartEmbedded(bus.EmbeddedConfig{Options: &server.Options{
			JetStream: js, StoreDir: t.TempDir(), Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true,
		}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(emb.Shutdown)
		return emb
	}
	front, back := start(false), start(true)
	up := connect(t, back.Server.ClientURL())
	nc := connect(t, front.Server.ClientURL())
	if _, err := nc.Subscribe("$JS.API.>", func(m *nats.Msg) {
		if taken, reply := intercept(m.Subject); taken {
			if reply != nil {
				_ = m.Respond(reply)
			}
			return
		}
		resp, err := up.RequestMsg(&nats.Msg{Subject: m.Subject, Header: m.Header, Data: m.Data}, 5*time.Second)
		if err != nil {
			t.Errorf("relay %s: %v", m.Subject, err)
			return
		}
		_ = m.RespondMsg(&nats.Msg{Header: resp.Header, Data: resp.Data})
	}); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return front.Server.ClientURL()
}

// A JetStream API request left unanswered, as a new cluster busy creating
// the streams of processes starting together may leave one, is asked
// again: every process comes up.
func TestOpenRetriesAnUnansweredRequest(t *testing.T) {
	bus.SetOpenTimeouts(t, 300*time.Millisecond, 10*time.Second)
	var creates atomic.Int32
	url := relayJS(t, func(subj string) (bool, []byte) {
		return subj == "$JS.API.STREAM.CREATE."+bus.JobsStream && creates.Add(1) == 1, nil
	})
	if _, err := bus.Open(t.Context(), connect(t, url), bus.Config{}); err != nil {
		t.Fatalf("open with its first request to create %s unanswered: %v", bus.JobsStream, err)
	}
	if n := creates.Load(); n != 2 {
		t.Fatalf("%s created with %d requests, want 2", bus.JobsStream, n)
	}
}

// A step of Open that JetStream never answers fails after the time
// allowed, naming the cause.
func TestOpenSaysJetStreamDidNotAnswer(t *testing.T) {
	bus.SetOpenTimeouts(t, 100*time.Millisecond, time.Second)
	var creates atomic.Int32
	url := relayJS(t, func(subj string) (bool, []byte) {
		if subj != "$JS.API.STREAM.CREATE."+bus.JobsStream {
			return false, nil
		}
		creates.Add(1)
		return true, nil
	})
	_, err := bus.Open(t.Context(), connect(t, url), bus.Config{})
	want := "open bus: jobs stream: creating or updating stream " + bus.JobsStream + ": JetStream did not answer (tried for "
	if err == nil || !strings.HasPrefix(err.Error(), want) {
		t.Fatalf("open with no answer to creating %s: %v; want %q…", bus.JobsStream, err, want)
	}
	if n := creates.Load(); n < 3 {
		t.Fatalf("%s asked for %d times, want several", bus.JobsStream, n)
	}
	t.Log(err)
}

// A new nats-server 2.9 cluster may say that the stream a process has just
// created is not found when it creates the stream's consumer, while
// another process's creation of the stream is applied: it is asked again.
func TestOpenWaitsForItsNewStreamToBeFound(t *testing.T) {
	var creates atomic.Int32
	url := relayJS(t, func(subj string) (bool, []byte) {
		if !strings.HasPrefix(subj, "$JS.API.CONSUMER.CREATE."+bus.JobsStream+".") || creates.Add(1) > 1 {
			return false, nil
		}
		return true, []byte(`{"type":"io.nats.jetstream.api.v1.consumer_create_response","error":{"code":404,"err_code":10059,"description":"stream not found"}}`)
	})
	if _, err := bus.Open(t.Context(), connect(t, url), bus.Config{}); err != nil {
		t.Fatalf("open with %s not found at first: %v", bus.JobsStream, err)
	}
	if n := creates.Load(); n != 2 {
		t.Fatalf("consumer %s created with %d requests, want 2", bus.JobsConsumer, n)
	}
}

// A process started with other --replicas or --retention than the running
// ones changes the shared streams and buckets for all: it says so, for
// each, with the old and new values; one started with the same says
// nothing.
func TestOpenWarnsOfChangedReplicasAndRetention(t *testing.T) {
	urls := bustest.StartCluster(t, 3)
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	open := func(replicas int, retention time.Duration) {
		t.Helper()
		if _, err := bus.Open(t.Context(), connect(t, urls), bus.Config{Replicas: replicas, Retention: retention, Log: log}); err != nil {
			t.Fatalf("open with --replicas %d --retention %v: %v", replicas, retention, err)
		}
	}
	open(3, time.Hour)
	open(3, time.Hour)
	if logs.Len() > 0 {
		t.Fatalf("opening with the streams' own settings logged:\n%s", &logs)
	}
	open(1, 2*time.Hour)
	for _, name := range []string{bus.EventsStream, bus.JobsStream, "KV_" + bus.TurnsBucket, "KV_" + bus.CancelBucket} {
		for _, want := range []string{
			"level=WARN msg=\"changing the replicas of a shared stream to this process's --replicas; give every process the same\" stream=" + name + " from=3 to=1\n",
			"level=WARN msg=\"changing the retention of a shared stream to this process's --retention; give every process the same\" stream=" + name + " from=1h0m0s to=2h0m0s\n",
		} {
			if !strings.Contains(logs.String(), want) {
				t.Errorf("no warning %q", want)
			}
		}
	}
	if t.Failed() {
		t.Fatalf("logged:\n%s", &logs)
	}
	t.Log(&logs)
}

// More replicas than the cluster has servers, or replicas on a server not
// in a cluster, fail at once with an error naming --replicas.
func TestOpenSaysWhatReplicasNeed(t *testing.T) {
	nc := connect(t, bustest.StartCluster(t, 3))
	_, err := bus.Open(t.Context(), nc, bus.Config{Replicas: 5})
	want := "open bus: events stream: --replicas 5 needs at least 5 JetStream servers up in the cluster: "
	if err == nil || !strings.HasPrefix(err.Error(), want) {
		t.Fatalf("open with --replicas 5 on three servers: %v; want %q…", err, want)
	}
	t.Log(err)

	emb, err := bus.StartEmbedded(bus.EmbeddedConfig{Options: &server.Options{
		JetStream: true, StoreDir: t.TempDir(), Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true,
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(emb.Shutdown)
	_, err = bus.Open(t.Context(), connect(t, emb.Server.ClientURL()), bus.Config{Replicas: 3})
	want = "open bus: events stream: --replicas 3 needs a cluster of at least 3 JetStream servers: "
	if err == nil || !strings.HasPrefix(err.Error(), want) {
		t.Fatalf("open with --replicas 3 on a server not in a cluster: %v; want %q…", err, want)
	}
	t.Log(err)
}
