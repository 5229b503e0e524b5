package security_test

import (
	"net"
	"net/http"
	"os/exec"
	"regexp"
	"strings"
	"testing"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// TestUnauthenticatedListeners checks the two listeners that have no
// authentication of their own: on an address that is not loopback each is
// warned about on stderr, and the profiler does not serve the command line,
// which may hold --jwt-secret.
func TestUnauthenticatedListeners(t *testing.T) {
	t.Parallel()
	const secret = "listeners-test-secret-0123456789"
	p := trtest.Serve(t, "--jwt-secret", secret, "--debug-addr", "0.0.0.0:0", "--nats-listen", "0.0.0.0:0", "--log-level", "info")
	stderr := p.Stderr()
	for _, flag := range []string{"--debug-addr 0.0.0.0:0", "--nats-listen 0.0.0.0:0"} {
		if !strings.Contains(stderr, "tokenrelay: WARNING: "+flag+" serves") {
			t.Errorf("no warning for %s in:\n%s", flag, stderr)
		}
	}
	m := regexp.MustCompile(`msg="debug server" addr=(\S+)`).FindStringSubmatch(stderr)
	if m == nil {
		t.Fatalf("no debug server address in:\n%s", stderr)
	}
	_, port, _ := net.SplitHostPort(m[1])
	base := "http://127.0.0.1:" + port + "/debug/pprof/"
	if code, _, _ := do(t, "GET", base, "", "", nil); code != http.StatusOK {
		t.Fatalf("GET %s: %d, want the profiler's index", base, code)
	}
	code, _, body := do(t, "GET", base+"cmdline", "", "", nil)
	if code == http.StatusOK || strings.Contains(string(body), secret) {
		t.Fatalf("GET %scmdline: %d %q", base, code, body)
	}

	q := trtest.Serve(t, "--jwt-secret", secret, "--debug-addr", "127.0.0.1:0", "--nats-listen", "127.0.0.1:0")
	if strings.Contains(q.Stderr(), "WARNING") {
		t.Errorf("loopback listeners were warned about:\n%s", q.Stderr())
	}
}

// A --nats-listen port in use stops serve at once with the reason, as a
// taken --addr does (the NATS server itself would only log it).
func TestNATSListenPortInUse(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cmd := exec.Command(trtest.Binary(t), "serve", "--addr", "127.0.0.1:0", "--data-dir", t.TempDir(), "--nats-listen", ln.Addr().String())
	out, err := runWithTimeout(cmd, wait)
	if err == nil {
		t.Fatalf("serve started:\n%s", out)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if last := lines[len(lines)-1]; !strings.HasPrefix(last, "tokenrelay: start nats") || !strings.Contains(last, "in use") {
		t.Fatalf("last line %q, want the port in use", last)
	}
}
