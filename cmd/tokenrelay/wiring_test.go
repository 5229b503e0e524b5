package main

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"log/slog"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
)

// nats.go's asynchronous errors reach the log as warnings, with the
// subscription's subject when there is one.
func TestLogNATSError(t *testing.T) {
	var buf bytes.Buffer
	handle := logNATSError(slog.New(slog.NewTextHandler(&buf, nil)))
	handle(nil, &nats.Subscription{Subject: "$KV.TR_CANCELS.>"}, nats.ErrConsumerNotActive)
	handle(nil, nil, nats.ErrSlowConsumer)
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	want := [][]string{
		{`level=WARN`, `msg="nats error"`, `err="nats: consumer not active"`, `subject=$KV.TR_CANCELS.>`},
		{`level=WARN`, `msg="nats error"`, `err="nats: slow consumer, messages dropped"`},
	}
	if len(lines) != len(want) {
		t.Fatalf("logged %d lines, want %d:\n%s", len(lines), len(want), buf.String())
	}
	for i, parts := range want {
		for _, p := range parts {
			if !strings.Contains(lines[i], p) {
				t.Errorf("line %d %q lacks %s", i+1, lines[i], p)
			}
		}
	}
	if strings.Contains(lines[1], "subject=") {
		t.Errorf("line 2 %q names a subject", lines[1])
	}
}

// The simulator's default model, the name its turns report, is allowed
// whether or not --models lists others.
func TestAllowList(t *testing.T) {
	tests := []struct {
		model, models string
		allowed       []string
		refused       []string
	}{
		{"", "", []string{"", "sim"}, []string{"m1"}},
		{"", "m1,m2", []string{"", "sim", "m1", "m2"}, []string{"m3"}},
		{"big", "", []string{"", "big"}, []string{"sim"}},
		{"big", "m1", []string{"", "big", "m1"}, []string{"sim", "m2"}},
	}
	for _, tt := range tests {
		ok := allowList(&config{Provider: "sim", Model: tt.model, Models: tt.models})
		for _, m := range tt.allowed {
			if !ok(m) {
				t.Errorf("--model %q --models %q refuses %q", tt.model, tt.models, m)
			}
		}
		for _, m := range tt.refused {
			if ok(m) {
				t.Errorf("--model %q --models %q allows %q", tt.model, tt.models, m)
			}
		}
	}
}

// The reason a command stops is printed as one line, whatever lines the
// error held.
func TestOneLine(t *testing.T) {
	in := "open store: failed to connect to `user=postgres`:\n\t127.0.0.1:1 (127.0.0.1): dial error: refused\n\t[::1]:1 (localhost): dial error: refused\n"
	want := "open store: failed to connect to `user=postgres`: 127.0.0.1:1 (127.0.0.1): dial error: refused; [::1]:1 (localhost): dial error: refused"
	if got := oneLine(in); got != want {
		t.Fatalf("oneLine = %q\nwant      %q", got, want)
	}
	if got := oneLine("port taken"); got != "port taken" {
		t.Fatalf("oneLine of one line = %q", got)
	}
}

// A process started with another --retention than the streams have says,
// in its log, that it changes them for every process.
func TestOpenBusLogsAChangedRetention(t *testing.T) {
	emb := bustest.StartUnlistened(t)
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	for _, retention := range []time.Duration{time.Hour, 2 * time.Hour} {
		nc, err := emb.Connect("test")
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		if _, err := openBus(t.Context(), &config{Replicas: 1, Retention: retention}, nc, nil, nil, log); err != nil {
			t.Fatal(err)
		}
	}
	want := `level=WARN msg="changing the retention of a shared stream to this process's --retention; give every process the same" stream=TR_EVENTS from=1h0m0s to=2h0m0s`
	if !strings.Contains(buf.String(), want) {
		t.Fatalf("logged:\n%s\nwant a line with %s", &buf, want)
	}
}

// The first log line of a process says which build it is, which store it
// uses and where its NATS is, and never a store's user or password.
func TestStartAttrs(t *testing.T) {
	for _, tt := range []struct {
		c    config
		want string
	}{
		{config{DataDir: "/var/lib/tr"}, "version=" + version + " store=sqlite:///var/lib/tr/tokenrelay.db nats=embedded"},
		{config{DataDir: "d", NATSListen: "127.0.0.1:4222"}, "nats=\"embedded, listening on 127.0.0.1:4222\""},
		{config{StoreURL: "postgres://tr:s3cret@db.internal:5432/chat?sslmode=verify-full", NATSURL: "nats://n1:4222"},
			"store=postgres://db.internal:5432/chat nats=external"},
		{config{StoreURL: "sqlite:///data/x.db", NATSURL: "nats://n1:4222"}, "store=sqlite:///data/x.db nats=external"},
	} {
		var buf bytes.Buffer
		slog.New(slog.NewTextHandler(&buf, nil)).Info("listening", startAttrs(&tt.c)...)
		if line := buf.String(); !strings.Contains(line, tt.want) || strings.Contains(line, "s3cret") || strings.Contains(line, "tr:") {
			t.Errorf("%+v logged %s, want %s", tt.c, line, tt.want)
		}
	}
}

// serve --nats-listen with port 0 names, in its first log line, the port
// the embedded server took, which NATS clients are to be given.
func TestServeStartLineNamesTheNATSPortTaken(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		err := run(ctx, []string{"serve", "--addr", "127.0.0.1:0", "--data-dir", t.TempDir(), "--nats-listen", "127.0.0.1:0"},
			func(string) string { return "" }, io.Discard, pw)
		pw.Close()
		done <- err
	}()
	t.Cleanup(func() {
		cancel()
		go io.Copy(io.Discard, pr)
		<-done
	})
	taken := regexp.MustCompile(`msg="nats listening" addr=(\S+)`)
	var addr, line string
	sc := bufio.NewScanner(pr)
	for sc.Scan() {
		if m := taken.FindStringSubmatch(sc.Text()); m != nil {
			addr = m[1]
		}
		if strings.Contains(sc.Text(), "msg=listening") {
			line = sc.Text()
			break
		}
	}
	if addr == "" || line == "" {
		t.Fatalf("serve logged no \"nats listening\" line or no start line before it stopped")
	}
	if want := `nats="embedded, listening on ` + addr + `"`; !strings.Contains(line, want) {
		t.Errorf("start line:\n%s\nwant %s", line, want)
	}
}
