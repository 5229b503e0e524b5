package cluster_test

import (
	"bufio"
	"fmt"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// started is a process launched by launch: its first stdout line saying it
// runs, or why it stopped before.
type started struct {
	name string
	url  string // the gateway's http://host:port, or the worker's metrics
	err  error
	log  *strings.Builder
}

var listeningOn = regexp.MustCompile(`listening on (http://\S+)`)

// launch starts the binary with args without waiting for it, reporting on
// ch once it prints that it runs or exits; it is killed at the end of the
// test.
func launch(t *testing.T, name string, ch chan<- started, args ...string) {
	t.Helper()
	cmd := exec.Command(trtest.Binary(t), args...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	log := &strings.Builder{}
	cmd.Stderr = log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})
	go func() {
		defer close(exited)
		sc := bufio.NewScanner(out)
		reported := false
		for sc.Scan() {
			line := sc.Text()
			if reported || !strings.Contains(line, "running") && !strings.Contains(line, "listening on") {
				continue
			}
			s := started{name: name, log: log}
			if m := listeningOn.FindStringSubmatch(line); m != nil {
				s.url = m[1]
			}
			ch <- s
			reported = true
		}
		err := cmd.Wait()
		if !reported {
			ch <- started{name: name, err: fmt.Errorf("exited before running: %v", err), log: log}
		}
	}()
}

// TestStartTogether starts two workers and two gateways at the same moment
// on a new NATS cluster and an empty schema, as a deployment does: they
// migrate the schema one at a time under the advisory lock and create the
// R3 streams and buckets concurrently, and all come up.
func TestStartTogether(t *testing.T) {
	pg := postgresURL(t)
	nats := startNATS(t)
	common := []string{"--nats-url", nats.URLs(), "--store-url", pg, "--replicas", "3"}
	ch := make(chan started, 4)
	for i := range 2 {
		launch(t, fmt.Sprintf("worker %d", i+1), ch, append([]string{"worker", "--metrics-addr", "127.0.0.1:0"}, common...)...)
		launch(t, fmt.Sprintf("gateway %d", i+1), ch, append([]string{"gateway", "--addr", "127.0.0.1:0"}, common...)...)
	}
	var gateways []string
	t0 := time.Now()
	deadline := time.After(60 * time.Second)
	for range 4 {
		select {
		case s := <-ch:
			if s.err != nil {
				t.Fatalf("%s: %v\n%s", s.name, s.err, s.log)
			}
			if strings.HasPrefix(s.name, "gateway") {
				gateways = append(gateways, s.url)
			}
			t.Logf("%s running after %v", s.name, time.Since(t0).Round(time.Millisecond))
		case <-deadline:
			t.Fatal("not every process started within 60s")
		}
	}
	// Every gateway is ready and serves a turn the other one sees.
	for _, u := range gateways {
		eventually(t, 10*time.Second, u+" ready", func() bool { return trtest.Get(t, u+"/readyz", nil) == 200 })
	}
	ws := func(u string) string { return "ws" + strings.TrimPrefix(u, "http") + "/v1/ws" }
	a, b := trtest.Dial(t, ws(gateways[0]), nil), trtest.Dial(t, ws(gateways[1]), nil)
	a.Join("together", nil)
	b.Join("together", nil)
	send(a, "together", "t", "hi [sim tokens=20 rate=0]")
	ta, tb := &trtest.Turn{ID: "t"}, &trtest.Turn{ID: "t"}
	finish(t, a, ta)
	finish(t, b, tb)
	if ta.Status != "complete" || tb.Text.String() != ta.Text.String() {
		t.Fatalf("turn ended %s; the other gateway saw %q of %q", ta.Status, tb.Text.String(), ta.Text.String())
	}
}
