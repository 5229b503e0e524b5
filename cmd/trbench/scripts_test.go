package main

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// The bench scripts are tested with a stand-in server (a shell script
// given to -b) and a stand-in trbench (TRBENCH_TOOL): what is checked is
// how they start, wait for and stop a server and pass on a failure.

// fakeBinary writes an executable shell script of body and returns its
// path.
func fakeBinary(t *testing.T, name, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// freePort returns a loopback port nothing listens on.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	return port
}

// benchScript runs bench/SCRIPT with args and env, and returns its exit
// code and what it printed.
func benchScript(t *testing.T, script string, env []string, args ...string) (int, string) {
	t.Helper()
	for _, tool := range []string{"bash", "curl"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("no %s: %v", tool, err)
		}
	}
	cmd := exec.Command("bash", append([]string{filepath.Join("..", "..", "bench", script)}, args...)...)
	cmd.Env = append(os.Environ(), append([]string{"TRBENCH_QUIET_WAIT=0", "TRBENCH_PORT=" + strconv.Itoa(freePort(t))}, env...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return code, out.String()
}

func TestRunScriptServerExits(t *testing.T) {
	server := fakeBinary(t, "tokenrelay", `echo "cannot open the data dir" >&2; exit 3`)
	tool := fakeBinary(t, "trbench", `exit 0`)
	code, out := benchScript(t, "run.sh", []string{"TRBENCH_TOOL=" + tool}, "-b", server, "--", "-s", "stream")
	if code == 0 || !strings.Contains(out, "the server exited before it was ready") || !strings.Contains(out, "cannot open the data dir") {
		t.Fatalf("run.sh exited %d:\n%s", code, out)
	}
}

func TestRunScriptServerNeverReady(t *testing.T) {
	server := fakeBinary(t, "tokenrelay", `[ "$2" = -h ] && exit 0; exec sleep 60`) // runs, never listens
	tool := fakeBinary(t, "trbench", `echo "trbench ran" >&2; exit 0`)
	code, out := benchScript(t, "run.sh", []string{"TRBENCH_TOOL=" + tool, "TRBENCH_START_WAIT=1"}, "-b", server, "--", "-s", "stream")
	if code == 0 || strings.Contains(out, "trbench ran") || !strings.Contains(out, "not ready") {
		t.Fatalf("run.sh exited %d:\n%s", code, out)
	}
}

// TestSuiteScriptFails: a scenario whose run fails makes the suite say
// which and why, and exit non-zero once the others have run.
func TestSuiteScriptFails(t *testing.T) {
	server := fakeBinary(t, "tokenrelay", `echo "cannot open the data dir" >&2; exit 3`)
	tool := fakeBinary(t, "trbench", `exit 0`)
	out := t.TempDir()
	code, printed := benchScript(t, "suite.sh", []string{"TRBENCH_TOOL=" + tool}, out, "-b", server)
	if code == 0 || !strings.Contains(printed, "idle failed") || !strings.Contains(printed, "cannot open the data dir") ||
		!strings.Contains(printed, "resume-8k failed") {
		t.Fatalf("suite.sh exited %d:\n%s", code, printed)
	}

	// Without OUT, -b is not taken for it.
	def := t.TempDir()
	code, printed = benchScript(t, "suite.sh", []string{"TRBENCH_TOOL=" + tool, "TRBENCH_SUITE_OUT=" + def}, "-b", server)
	if code == 0 || !strings.Contains(printed, "idle failed") {
		t.Fatalf("suite.sh -b exited %d:\n%s", code, printed)
	}
	if _, err := os.Stat(filepath.Join(def, "idle.log")); err != nil {
		t.Errorf("no log in the default directory: %v", err)
	}
}
