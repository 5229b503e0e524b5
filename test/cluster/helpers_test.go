// Package cluster_test runs tokenrelay scaled out: gateways and workers as
// real processes of the binary, on an in-process three-node NATS JetStream
// cluster (streams and buckets at R3) and the PostgreSQL database named by
// TOKENRELAY_TEST_POSTGRES, each test in a schema of its own.
package cluster_test

import (
	"github.com/tokenrelay/tokenrelay/internal/store/postgres/pgtest"

	"bufio"
	"fmt"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// wait bounds every wait for an event of a turn.
const wait = 30 * time.Second

// natsCluster is an in-process nats-server cluster with JetStream.
type natsCluster struct {
	opts  []*server.Options
	nodes []*bus.Embedded
}

// startNATS runs a three-node JetStream cluster on loopback and waits until
// every node is routed and the JetStream meta group has a leader that all
// nodes follow. Nodes still running at the end of the test are shut down.
func startNATS(t testing.TB) *natsCluster {
	t.Helper()
	const size = 3
	ports := bustest.FreePorts(t, 2*size)
	var routes []string
	for _, p := range ports[size:] {
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", p))
	}
	c := &natsCluster{}
	for i := range size {
		c.opts = append(c.opts, &server.Options{
			ServerName: fmt.Sprintf("n%d", i+1),
			JetStream:  true,
			StoreDir:   t.TempDir(),
			Host:       "127.0.0.1",
			Port:       ports[i], // fixed, so that a restarted node is found again
			Cluster:    server.ClusterOpts{Name: "tokenrelay-test", Host: "127.0.0.1", Port: ports[size+i]},
			Routes:     server.RoutesFromStr(strings.Join(routes, ",")),
			NoLog:      true,
			NoSigs:     true,
		})
	}
	// Registered after the TempDirs: cleanups run last first, and the
	// nodes must be down before their directories are removed.
	t.Cleanup(func() {
		for _, n := range c.nodes {
			if n.Server.Running() {
				n.Shutdown()
			}
		}
	})
	for i := range size {
		n, err := bus.StartEmbedded(bus.EmbeddedConfig{Options: c.opts[i]})
		if err != nil {
			t.Fatalf("start nats node %d: %v", i+1, err)
		}
		c.nodes = append(c.nodes, n)
	}
	c.waitReady(t)
	return c
}

// waitReady waits until every node is in the JetStream meta group.
func (c *natsCluster) waitReady(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !c.ready(len(c.nodes)) {
		if time.Now().After(deadline) {
			t.Fatal("nats cluster: no JetStream meta leader followed by every node after 30s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// restart starts stopped node i again, on its address and its store, and
// waits until it has caught up with the cluster.
func (c *natsCluster) restart(t testing.TB, i int) {
	t.Helper()
	opts := *c.opts[i]
	n, err := bus.StartEmbedded(bus.EmbeddedConfig{Options: &opts})
	if err != nil {
		t.Fatalf("restart nats node %d: %v", i+1, err)
	}
	c.nodes[i] = n
	c.waitReady(t)
}

// ready reports whether the running nodes have a meta leader that knows
// want peers and that every running node is current with.
func (c *natsCluster) ready(want int) bool {
	var leader *server.Server
	for _, n := range c.nodes {
		if n.Server.Running() && n.Server.JetStreamIsLeader() {
			leader = n.Server
		}
	}
	if leader == nil || len(leader.JetStreamClusterPeers()) != want {
		return false
	}
	for _, n := range c.nodes {
		if n.Server.Running() && !n.Server.JetStreamIsCurrent() {
			return false
		}
	}
	return true
}

// URLs is the client URL of every node, comma separated, for --nats-url.
func (c *natsCluster) URLs() string {
	var us []string
	for _, n := range c.nodes {
		us = append(us, n.Server.ClientURL())
	}
	return strings.Join(us, ",")
}

// connect opens a test-side connection to the cluster.
func (c *natsCluster) connect(t testing.TB) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(c.URLs(), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// streamInfo returns the current info of a JetStream stream.
func (c *natsCluster) streamInfo(t testing.TB, nc *nats.Conn, name string) *jetstream.StreamInfo {
	t.Helper()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	s, err := js.Stream(trtest.Ctx(t, 10*time.Second), name)
	if err != nil {
		t.Fatalf("stream %s: %v", name, err)
	}
	return s.CachedInfo()
}

// jobConsumer returns the workers' job consumer, its info as of now.
func jobConsumer(t testing.TB, nc *nats.Conn) jetstream.Consumer {
	t.Helper()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	cons, err := js.Consumer(t.Context(), bus.JobsStream, bus.JobsConsumer)
	if err != nil {
		t.Fatal(err)
	}
	return cons
}

// node returns the index of the node called name.
func (c *natsCluster) node(t testing.TB, name string) int {
	t.Helper()
	for i, n := range c.nodes {
		if n.Server.Name() == name {
			return i
		}
	}
	t.Fatalf("no nats node %q", name)
	return -1
}

// postgresURL returns a URL for a new, empty schema of the test database,
// dropped at the end of the test, or skips the test when
// TOKENRELAY_TEST_POSTGRES is unset.
func postgresURL(t testing.TB) string { return pgtest.SchemaURL(t) }

// cluster is tokenrelay scaled out: gateways and workers sharing one NATS
// cluster and one PostgreSQL schema.
type cluster struct {
	nats    *natsCluster
	store   string
	gw      []*trtest.Proc
	wk      []*trtest.Proc
	common  []string // flags of every gateway and worker
	workerX []string // extra worker flags
}

// clusterOptions tune startCluster.
type clusterOptions struct {
	gateways, workers int
	gatewayArgs       []string
	workerArgs        []string
	// storeURL, when set, is the store of every process (such as a
	// pgProxy's URL), instead of a fresh schema.
	storeURL string
}

// startCluster starts the NATS cluster, migrates a fresh schema with
// `tokenrelay migrate`, then the workers (each with --metrics-addr) and the
// gateways, and waits until every gateway is ready.
func startCluster(t testing.TB, o clusterOptions) *cluster {
	t.Helper()
	if o.gateways == 0 {
		o.gateways = 2
	}
	if o.workers == 0 {
		o.workers = 2
	}
	pg := o.storeURL
	if pg == "" {
		pg = postgresURL(t)
	}
	c := &cluster{nats: startNATS(t), store: pg, workerX: o.workerArgs}
	c.common = []string{"--nats-url", c.nats.URLs(), "--store-url", pg, "--replicas", "3"}
	migrate(t, pg)
	for range o.workers {
		c.startWorker(t)
	}
	for range o.gateways {
		c.startGateway(t, o.gatewayArgs...)
	}
	return c
}

// migrate runs `tokenrelay migrate` on the store.
func migrate(t testing.TB, storeURL string) {
	t.Helper()
	out, err := exec.Command(trtest.Binary(t), "migrate", "--store-url", storeURL).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "migrations applied") {
		t.Fatalf("tokenrelay migrate: %v\n%s", err, out)
	}
}

// startWorker starts one more worker and returns it; its URL serves /metrics.
func (c *cluster) startWorker(t testing.TB) *trtest.Proc {
	t.Helper()
	args := append([]string{"worker"}, c.common...)
	args = append(args, "--metrics-addr", "127.0.0.1:0")
	args = append(args, c.workerX...)
	p := trtest.Start(t, args...)
	if p.URL == "" {
		t.Fatalf("worker did not print its metrics address")
	}
	c.wk = append(c.wk, p)
	return p
}

// startGateway starts one more gateway on a free port (or on the --addr of
// extra) and waits until it is ready.
func (c *cluster) startGateway(t testing.TB, extra ...string) *trtest.Proc {
	t.Helper()
	args := append([]string{"gateway"}, c.common...)
	if !hasFlag(extra, "--addr") {
		args = append(args, "--addr", "127.0.0.1:0")
	}
	// One dev user drives every test: lift the per-user limits.
	args = append(args, "--limit-turns", "0", "--limit-sends", "0", "--limit-connections", "0", "--limit-new-conversations", "0")
	args = append(args, extra...)
	p := trtest.Start(t, args...)
	p.WaitReady(t)
	c.gw = append(c.gw, p)
	return p
}

func hasFlag(args []string, name string) bool {
	for _, a := range args {
		if a == name || strings.HasPrefix(a, name+"=") {
			return true
		}
	}
	return false
}

// metric reads one sample (a series such as
// tokenrelay_turns_total{status="complete"}) from base/metrics; 0 when absent.
func metric(t testing.TB, base, series string) float64 {
	t.Helper()
	v, err := tryMetric(base, series)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func tryMetric(base, series string) (float64, error) {
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), series+" "); ok {
			return strconv.ParseFloat(v, 64)
		}
	}
	return 0, sc.Err()
}

// sumMetric adds a series over several processes.
func sumMetric(t testing.TB, procs []*trtest.Proc, series string) float64 {
	t.Helper()
	var sum float64
	for _, p := range procs {
		sum += metric(t, p.URL, series)
	}
	return sum
}

// eventually polls cond every 20ms until it holds, failing after d.
func eventually(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// message is a stored message as the HTTP API returns it.
type message struct {
	MessageID string `json:"message_id"`
	Role      string `json:"role"`
	Content   string `json:"content"`
	Status    string `json:"status"`
}

// storedTurn reads the assistant message of a turn through a gateway.
func storedTurn(t testing.TB, base, conv, turn string) message {
	t.Helper()
	var body struct {
		Messages []message `json:"messages"`
	}
	if code := trtest.Get(t, base+"/v1/conversations/"+conv+"/messages?limit=500", &body); code != 200 {
		t.Fatalf("GET messages of %s: %d", conv, code)
	}
	for _, m := range body.Messages {
		if m.MessageID == turn {
			return m
		}
	}
	t.Fatalf("turn %s not stored in %s", turn, conv)
	return message{}
}

// send asks c to start turn id in conv with text; the frame's id is id too.
func send(c *trtest.Client, conv, id, text string) {
	c.Send(map[string]any{"type": "send", "conversation_id": conv, "text": text, "turn_id": id, "message_id": "m-" + id, "id": id})
}

// follow reads c's frames into tr until cond holds, failing on an error
// frame for the turn or on a delivery violation.
func follow(t testing.TB, c *trtest.Client, tr *trtest.Turn, cond func() bool) []trtest.Frame {
	t.Helper()
	fs := c.Until(wait, func(f trtest.Frame) bool {
		if f.Type() == "error" {
			t.Fatalf("error frame while following %s: %v", tr.ID, f)
		}
		tr.Apply(f)
		return cond()
	})
	if len(tr.Errors) > 0 {
		t.Fatalf("delivery violations on %s: %v", tr.ID, tr.Errors)
	}
	return fs
}

// until reads tr's deltas until it has at least n.
func until(t testing.TB, c *trtest.Client, tr *trtest.Turn, n int64) {
	t.Helper()
	follow(t, c, tr, func() bool { return tr.Seq >= n || tr.Ends > 0 })
	if tr.Seq < n {
		t.Fatalf("turn %s ended (%s) after %d deltas, wanted at least %d", tr.ID, tr.Status, tr.Seq, n)
	}
}

// finish reads tr to its end.
func finish(t testing.TB, c *trtest.Client, tr *trtest.Turn) {
	t.Helper()
	follow(t, c, tr, func() bool { return tr.Ends > 0 })
}

// resume applies a joined frame's active turn to tr, as a client that
// joined with after={tr.ID, tr.Seq} does.
func resume(t testing.TB, tr *trtest.Turn, joined trtest.Frame) {
	t.Helper()
	a := joined.Obj("active")
	if a == nil || a.Str("turn_id") != tr.ID {
		return // ended meanwhile: the rest comes as frames after joined
	}
	if a.Int("from") != tr.Seq+1 {
		t.Fatalf("resumed after seq %d, joined.active starts at %d: %v", tr.Seq, a.Int("from"), a)
	}
	if a.Int("seq") > tr.Seq {
		tr.Apply(trtest.Frame{"type": "turn.delta", "turn_id": tr.ID, "from": a["from"], "seq": a["seq"], "text": a["text"]})
	}
}
