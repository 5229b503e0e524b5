package main

import (
	"bytes"
	"errors"
	"flag"
	"strings"
	"testing"
)

// TestFlagsOfAnotherCommand: every command takes the flags of the others
// (so one set of flags can start a gateway and a worker), ignores them
// with a warning, and lists only its own under -h; a flag no command has
// is still refused, and a bad value of another command's flag in the
// environment is not read.
func TestFlagsOfAnotherCommand(t *testing.T) {
	env := func(string) string { return "" }
	for _, tt := range []struct {
		name string
		r    role
		args []string
		warn string
	}{
		{"gateway", roleGateway, []string{"--sim-rate", "50", "--sim-tokens=5", "--log-level", "warn"}, "--sim-rate"},
		{"worker", roleWorker, []string{"--addr", "127.0.0.1:0", "--dev", "--limit-sends", "0", "--jwt-secret", "s"}, "--addr"},
		{"migrate", roleMigrate, []string{"--nats-url", "nats://x", "--data-dir", "d"}, "--nats-url"},
		{"serve", roleServe, []string{"--metrics-addr", "127.0.0.1:0"}, "--metrics-addr"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			if _, _, err := load(tt.name, tt.r, tt.args, env, &stderr); err != nil {
				t.Fatalf("%s %v: %v", tt.name, tt.args, err)
			}
			if !strings.Contains(stderr.String(), tt.warn) || !strings.Contains(stderr.String(), "level=WARN") {
				t.Errorf("%s %v: no warning naming %s:\n%s", tt.name, tt.args, tt.warn, stderr.String())
			}
		})
	}
	var stderr bytes.Buffer
	if _, _, err := load("gateway", roleGateway, []string{"--bogus"}, env, &stderr); err == nil || !strings.Contains(err.Error(), "bogus") {
		t.Errorf("--bogus: %v", err)
	}
	badEnv := func(k string) string {
		if k == "TOKENRELAY_SIM_RATE" {
			return "fast"
		}
		return ""
	}
	if _, _, err := load("gateway", roleGateway, nil, badEnv, &stderr); err != nil {
		t.Errorf("gateway with TOKENRELAY_SIM_RATE=fast: %v", err)
	}
	stderr.Reset()
	if _, _, err := load("worker", roleWorker, []string{"--sim-rate", "fast"}, env, &stderr); err == nil || stderr.Len() > 0 {
		t.Errorf("worker --sim-rate fast: %v, and wrote %q (main prints the reason alone)", err, stderr.String())
	}
	stderr.Reset()
	if _, _, err := load("gateway", roleGateway, []string{"-h"}, env, &stderr); !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("-h: %v", err)
	}
	if help := stderr.String(); !strings.Contains(help, "-limit-sends") || strings.Contains(help, "-sim-rate") {
		t.Errorf("gateway -h lists another command's flags, or not its own:\n%s", help)
	}
}
