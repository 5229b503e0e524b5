// Package trtest runs the real tokenrelay binary and speaks its WebSocket
// protocol, for end-to-end tests.
package trtest

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var (
	buildOnce sync.Once
	buildPath string
	buildErr  error
)

// moduleRoot finds the directory holding go.mod above this file.
func moduleRoot() string {
	_, file, _, _ := runtime.Caller(0)
	dir := filepath.Dir(file)
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return ""
		}
		dir = parent
	}
}

// Binary builds ./cmd/tokenrelay once per test process and returns its path.
// TOKENRELAY_TEST_BINARY, when set, is used instead.
func Binary(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("TOKENRELAY_TEST_BINARY"); p != "" {
		return p
	}
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "tokenrelay-bin-")
		if err != nil {
			buildErr = err
			return
		}
		buildPath = filepath.Join(dir, "tokenrelay")
		cmd := exec.Command("go", "build", "-o", buildPath, "./cmd/tokenrelay")
		cmd.Dir = moduleRoot()
		out, err := cmd.CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("build tokenrelay: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return buildPath
}

// Proc is a running tokenrelay process.
type Proc struct {
	t       testing.TB
	Args    []string
	DataDir string
	// URL is http://host:port of the gateway.
	URL string

	cmd    *exec.Cmd
	done   chan struct{}
	mu     sync.Mutex
	stderr strings.Builder
	exit   error
}

var listeningRE = regexp.MustCompile(`listening on (http://\S+)`)

// Serve starts `tokenrelay serve` on a free port with a temporary data dir
// (unless args name --data-dir or --addr) and waits until /readyz answers
// 200. The process is killed at the end of the test.
func Serve(t testing.TB, args ...string) *Proc {
	t.Helper()
	full := append([]string{"serve"}, args...)
	if !hasFlag(args, "--addr") {
		full = append(full, "--addr", "127.0.0.1:0")
	}
	dataDir := flagValue(args, "--data-dir")
	if dataDir == "" {
		dataDir = t.TempDir()
		full = append(full, "--data-dir", dataDir)
	}
	p := Start(t, full...)
	p.DataDir = dataDir
	p.WaitReady(t)
	return p
}

// Start runs the binary with args and waits for its "listening on" line
// (or for "running", for a worker).
func Start(t testing.TB, args ...string) *Proc {
	t.Helper()
	p := &Proc{t: t, Args: args, done: make(chan struct{})}
	p.cmd = exec.Command(Binary(t), args...)
	p.cmd.Env = append(os.Environ(), "TOKENRELAY_LOG_LEVEL=warn")
	stdout, err := p.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Kill() })
	started := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			line := sc.Text()
			u, ok := "", false
			if m := listeningRE.FindStringSubmatch(line); m != nil {
				u, ok = m[1], true
			} else if strings.Contains(line, "running") {
				ok = true
			}
			if ok {
				select {
				case started <- u:
				default:
				}
			}
		}
	}()
	stderrDone := make(chan struct{})
	go func() {
		defer close(stderrDone)
		buf := make([]byte, 4096)
		for {
			n, err := stderr.Read(buf)
			p.mu.Lock()
			p.stderr.Write(buf[:n])
			p.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	go func() {
		<-stderrDone // Wait closes the pipe: read it to the end first
		err := p.cmd.Wait()
		p.mu.Lock()
		p.exit = err
		p.mu.Unlock()
		close(p.done)
	}()
	select {
	case u := <-started:
		p.URL = u
	case <-p.done:
		t.Fatalf("tokenrelay %v exited before listening: %v\n%s", args, p.ExitErr(), p.Stderr())
	case <-time.After(60 * time.Second):
		t.Fatalf("tokenrelay %v did not start in 60s\n%s", args, p.Stderr())
	}
	return p
}

// WaitReady polls /readyz until it answers 200.
func (p *Proc) WaitReady(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		resp, err := http.Get(p.URL + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		select {
		case <-p.done:
			t.Fatalf("tokenrelay exited: %v\n%s", p.ExitErr(), p.Stderr())
		case <-time.After(20 * time.Millisecond):
		}
	}
	t.Fatalf("tokenrelay not ready after 30s\n%s", p.Stderr())
}

// WSURL is the native WebSocket endpoint.
func (p *Proc) WSURL() string { return "ws" + strings.TrimPrefix(p.URL, "http") + "/v1/ws" }

// Stderr returns what the process logged so far.
func (p *Proc) Stderr() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stderr.String()
}

// ExitErr is the process's exit error once it has exited.
func (p *Proc) ExitErr() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.exit
}

// Done is closed when the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Signal sends sig and returns at once; Done tells when the process has
// exited.
func (p *Proc) Signal(sig os.Signal) { _ = p.cmd.Process.Signal(sig) }

// Stop sends SIGTERM and waits for the exit.
func (p *Proc) Stop() error { return p.StopWith(syscall.SIGTERM) }

// StopWith sends sig and waits for the exit.
func (p *Proc) StopWith(sig os.Signal) error {
	_ = p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		p.Kill()
		return fmt.Errorf("tokenrelay did not stop within 30s after %v", sig)
	}
	return p.ExitErr()
}

// Kill sends SIGKILL (kill -9) and waits for the exit.
func (p *Proc) Kill() {
	if p.cmd.Process == nil {
		return
	}
	_ = p.cmd.Process.Kill()
	<-p.done
}

// Restart starts the same command again (same data dir) and waits until ready.
func (p *Proc) Restart(t testing.TB) *Proc {
	t.Helper()
	args := append([]string(nil), p.Args...)
	// Keep the address so clients can reconnect to it.
	for i, a := range args {
		if a == "--addr" && i+1 < len(args) {
			args[i+1] = strings.TrimPrefix(p.URL, "http://")
		}
	}
	q := Start(t, args...)
	q.DataDir = p.DataDir
	q.WaitReady(t)
	return q
}

func hasFlag(args []string, name string) bool { return flagValue(args, name) != "" }

func flagValue(args []string, name string) string {
	for i, a := range args {
		if a == name && i+1 < len(args) {
			return args[i+1]
		}
		if v, ok := strings.CutPrefix(a, name+"="); ok {
			return v
		}
	}
	return ""
}

// Ctx returns a context for one step of a test, ended with the test.
func Ctx(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
