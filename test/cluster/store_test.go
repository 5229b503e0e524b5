package cluster_test

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// pgProxy is a TCP proxy between tokenrelay and PostgreSQL that a test can
// cut: every connection through it is closed and new ones are refused
// until it is restored, as when the network or the server goes away.
type pgProxy struct {
	t      testing.TB
	target string // PostgreSQL's host:port
	addr   string // the proxy's, fixed across cuts
	// url is the store URL through the proxy. It carries a password that
	// the test server's trust authentication ignores, for the tests to
	// look for in what the processes print.
	url      string
	password string

	mu    sync.Mutex
	ln    net.Listener // nil while cut
	conns map[net.Conn]struct{}
}

// newPGProxy starts a proxy to the server of storeURL; it is closed at
// the end of the test.
func newPGProxy(t testing.TB, storeURL string) *pgProxy {
	t.Helper()
	u, err := url.Parse(storeURL)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var b [8]byte
	rand.Read(b[:])
	p := &pgProxy{t: t, target: u.Host, addr: ln.Addr().String(), password: "pw-" + hex.EncodeToString(b[:]), conns: map[net.Conn]struct{}{}}
	u.Host = p.addr
	u.User = url.UserPassword(u.User.Username(), p.password)
	p.url = u.String()
	p.mu.Lock()
	p.ln = ln
	p.mu.Unlock()
	go p.accept(ln)
	t.Cleanup(p.cut)
	return p
}

func (p *pgProxy) accept(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		if p.ln != ln { // cut meanwhile
			p.mu.Unlock()
			c.Close()
			s.Close()
			return
		}
		p.conns[c], p.conns[s] = struct{}{}, struct{}{}
		p.mu.Unlock()
		pipe := func(dst, src net.Conn) {
			_, _ = io.Copy(dst, src)
			dst.Close()
			src.Close()
			p.mu.Lock()
			delete(p.conns, dst)
			delete(p.conns, src)
			p.mu.Unlock()
		}
		go pipe(c, s)
		go pipe(s, c)
	}
}

// cut closes every connection through the proxy and refuses new ones.
func (p *pgProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln != nil {
		p.ln.Close()
		p.ln = nil
	}
	for c := range p.conns {
		c.Close()
	}
	clear(p.conns)
}

// restore accepts connections again, on the same address.
func (p *pgProxy) restore() {
	p.t.Helper()
	ln, err := net.Listen("tcp", p.addr)
	if err != nil {
		p.t.Fatalf("listen again on %s: %v", p.addr, err)
	}
	p.mu.Lock()
	p.ln = ln
	p.mu.Unlock()
	go p.accept(ln)
}

// readyz reads a gateway's /readyz: its status code and its store check.
func readyz(t testing.TB, base string) (int, string) {
	t.Helper()
	var body struct {
		Checks map[string]string `json:"checks"`
	}
	code := trtest.Get(t, base+"/readyz", &body)
	return code, body.Checks["store"]
}

// TestStoreCut cuts every connection to PostgreSQL while turns stream,
// and refuses new ones for a while: /readyz reports the store, a send
// meanwhile is answered unavailable and stores nothing, the turns in
// flight stream on and their ends are stored once PostgreSQL is back (the
// workers try again), and the pools recover without a restart. No process
// prints the URL's password.
func TestStoreCut(t *testing.T) {
	px := newPGProxy(t, postgresURL(t))
	c := startCluster(t, clusterOptions{storeURL: px.url})
	const tokens = 200
	fl, _ := spread(t, c, "cut", fmt.Sprintf("speak [sim tokens=%d rate=100]", tokens))
	// A client of a conversation with no turn, joined before the cut.
	quiet := trtest.Dial(t, c.gw[0].WSURL(), nil)
	quiet.Join("cut-quiet", nil)

	px.cut()
	for _, gw := range c.gw {
		eventually(t, 10*time.Second, gw.URL+" /readyz reports the store", func() bool {
			code, st := readyz(t, gw.URL)
			return code == http.StatusServiceUnavailable && st == "failing"
		})
	}
	send(quiet, "cut-quiet", "lost", "hello [sim tokens=5 rate=0]")
	fs := quiet.Until(wait, func(f trtest.Frame) bool { return f.Str("id") == "lost" && (f.Type() == "ack" || f.Type() == "error") })
	if last := fs[len(fs)-1]; last.Type() != "error" || last.Str("code") != "unavailable" {
		t.Fatalf("a send while the store is cut off answered %v", last)
	}
	// The turns in flight stream all their tokens; their ends wait for
	// the store.
	for _, f := range fl {
		follow(t, f.c, f.tr, func() bool { return f.tr.Seq >= tokens || f.tr.Ends > 0 })
		if f.tr.Ends > 0 {
			t.Fatalf("%s ended %s while its end could not be stored", f.tr.ID, f.tr.Status)
		}
	}

	px.restore()
	for _, gw := range c.gw {
		eventually(t, 10*time.Second, gw.URL+" /readyz after the store is back", func() bool {
			code, _ := readyz(t, gw.URL)
			return code == http.StatusOK
		})
	}
	for _, f := range fl {
		finish(t, f.c, f.tr)
		m := storedTurn(t, c.gw[1].URL, f.conv, f.tr.ID)
		if f.tr.Status != "complete" || f.tr.Ends != 1 || m.Status != "complete" || m.Content != f.tr.Text.String() {
			t.Fatalf("%s: streamed %d× %s %d bytes, stored %s %d bytes", f.tr.ID, f.tr.Ends, f.tr.Status, f.tr.Text.Len(), m.Status, len(m.Content))
		}
	}
	// The send refused meanwhile stored nothing; sent again, it runs.
	var hist struct {
		Messages []message `json:"messages"`
	}
	if code := trtest.Get(t, c.gw[1].URL+"/v1/conversations/cut-quiet/messages", &hist); code != http.StatusOK && code != http.StatusNotFound {
		t.Fatalf("GET messages of cut-quiet: %d", code)
	}
	if len(hist.Messages) != 0 {
		t.Fatalf("the send answered unavailable stored %v", hist.Messages)
	}
	send(quiet, "cut-quiet", "lost", "hello [sim tokens=5 rate=0]")
	tr := &trtest.Turn{ID: "lost"}
	finish(t, quiet, tr)
	if tr.Status != "complete" {
		t.Fatalf("the send made again ended %s", tr.Status)
	}
	for _, p := range append(c.gw, c.wk...) {
		if strings.Contains(p.Stderr(), px.password) {
			t.Errorf("%v printed the store's password:\n%s", p.Args[0], p.Stderr())
		}
	}
}
