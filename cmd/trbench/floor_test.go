package main

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestMain lets the test binary be the floor's server, as trbench is: the
// floor scenario runs os.Executable() floor-serve.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == floorServeArg {
		if err := floorServe(os.Stdin, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "floor-serve:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestFloorScenario runs the floor briefly: every connection gets its
// conversation's deltas, timed, from a child process whose CPU and memory
// are read, and nothing else.
func TestFloorScenario(t *testing.T) {
	out := filepath.Join(t.TempDir(), "floor.json")
	args := []string{"-q", "--json", out, "-s", "floor turns=10 rate=50 watchers=3 warmup=200ms duration=1s"}
	rep, stdout := runReport(t, time.Minute, out, args)
	if len(rep.Results) != 1 {
		t.Fatalf("%d results, want 1", len(rep.Results))
	}
	r := rep.Results[0]
	if r.Scenario != "floor" || r.Conns != 30 || r.ConnFailures != 0 {
		t.Fatalf("scenario %q with %d connections (%d failed), want floor with 30", r.Scenario, r.Conns, r.ConnFailures)
	}
	if len(r.Events) != 0 {
		t.Errorf("events: %v", r.Events)
	}
	if r.Latency == nil || r.Latency.Count == 0 || r.DeltasS <= 0 || r.DeltaFramesS != r.FramesS {
		t.Errorf("latency %+v, %g deltas/s, %g delta frames/s of %g frames/s: want timed deltas and only them", r.Latency, r.DeltasS, r.DeltaFramesS, r.FramesS)
	}
	// 30 watchers at 50 tok/s: a floor that ignored the rate, or wrote a
	// frame twice or to one watcher only, would be far from 1.
	if r.KeepUp < 0.5 || r.KeepUp > 1.2 {
		t.Errorf("keep-up %.2f (%g deltas/s for 1500 offered), want about 1", r.KeepUp, r.DeltasS)
	}
	if r.ServerRSSLoaded <= 0 {
		t.Errorf("no RSS read from the floor's server")
	}
	if !strings.Contains(stdout, "== floor") {
		t.Errorf("no floor table in:\n%s", stdout)
	}
}

// TestFloorJoin: the floor's server upgrades a connection whose query it
// can stream to and refuses the others.
func TestFloorJoin(t *testing.T) {
	for q, want := range map[string]string{
		"conv=c-1&rate=5&watchers=2":  "HTTP/1.1 101 ",
		"conv=c-1&rate=0&watchers=1":  "HTTP/1.1 400 ",
		"conv=&rate=5&watchers=1":     "HTTP/1.1 400 ",
		"conv=c-1&rate=5&watchers=x":  "HTTP/1.1 400 ",
		"conv=c-1&rate=-1&watchers=1": "HTTP/1.1 400 ",
	} {
		fs := &floorServer{groups: map[string]*floorGroup{}}
		srv, cli := net.Pipe()
		go fs.upgrade(srv)
		_ = cli.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(cli, "GET /floor?%s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", q)
		buf := make([]byte, 64)
		n, err := cli.Read(buf)
		if !strings.HasPrefix(string(buf[:n]), want) {
			t.Errorf("%s: answered %q (%v), want %q", q, buf[:n], err, want)
		}
		cli.Close()
	}
}

// TestWSServerFrame: the floor's frames are the frames a server sends.
func TestWSServerFrame(t *testing.T) {
	for _, n := range []int{0, 1, 125, 126, 300, 65535} {
		payload := bytes.Repeat([]byte{'x'}, n)
		got := wsServerFrame(append(make([]byte, 4), payload...), 4)
		if want := serverFrame(true, opText, payload); !bytes.Equal(got, want) {
			t.Errorf("%d bytes: frame starts % x, want % x", n, got[:min(len(got), 6)], want[:min(len(want), 6)])
		}
	}
}
