package cluster_test

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// pgProxy is a TCP proxy between tokenrelay and PostgreSQL that a test can
// cut: every connection through it is closed and new ones are refused
// until it is restored, as when the network or the server goes away. It
// can also stall one statement's connection (see stallNext).
type pgProxy struct {
	t      testing.TB
	target string // PostgreSQL's host:port
	addr   string // the proxy's, fixed across cuts
	// url is the store URL through the proxy. It carries a password that
	// the test server's trust authentication ignores, for the tests to
	// look for in what the processes print.
	url      string
	password string

	mu     sync.Mutex
	ln     net.Listener // nil while cut
	conns  map[net.Conn]struct{}
	stalls []*stall          // armed, oldest first; guarded by mu
	stmts  map[string]string // prepared statement name → its text; guarded by mu
}

// stall is a stallNext armed: sql is what the statement's text contains,
// and done is closed once a connection is stalled for it.
type stall struct {
	sql  string
	done chan struct{}
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
	p := &pgProxy{t: t, target: u.Host, addr: ln.Addr().String(), password: "pw-" + hex.EncodeToString(b[:]), conns: map[net.Conn]struct{}{}, stmts: map[string]string{}}
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
		pipe := func(dst, src net.Conn, from io.Reader) {
			_, _ = io.Copy(dst, from)
			dst.Close()
			src.Close()
			p.mu.Lock()
			delete(p.conns, dst)
			delete(p.conns, src)
			p.mu.Unlock()
		}
		go pipe(c, s, s)
		go pipe(s, c, p.watch(c))
	}
}

// stallNext makes the proxy stall the next connection that runs a
// statement whose text contains sql: nothing the client sends from then
// on reaches the server, and the connection stays open, as when the server
// is frozen or the network drops the packets without a reset. The
// returned channel is closed when it happens. Each call stalls one
// connection.
func (p *pgProxy) stallNext(sql string) <-chan struct{} {
	st := &stall{sql: sql, done: make(chan struct{})}
	p.mu.Lock()
	p.stalls = append(p.stalls, st)
	p.mu.Unlock()
	return st.done
}

// parseMsg finds, in what a client sends, the name and text of a statement
// it prepares (a Parse message: 'P', its length, the name, the text; pgx
// names its cached statements after their text). A statement prepared on
// a connection is later run by its name alone.
var (
	parseMsg = regexp.MustCompile(`(?s)P.{4}(stmtcache_[0-9a-f]+)\x00([^\x00]+)\x00`)
	stmtName = regexp.MustCompile(`stmtcache_[0-9a-f]+`)
)

// watch is what a client sends on c, read through the armed stalls.
func (p *pgProxy) watch(c net.Conn) io.Reader {
	return &stallReader{p: p, c: c}
}

type stallReader struct {
	p       *pgProxy
	c       net.Conn
	stalled bool
}

func (r *stallReader) Read(b []byte) (int, error) {
	for {
		n, err := r.c.Read(b)
		if r.stalled {
			if err != nil {
				return 0, err // the client gave up: close the server's side too
			}
			continue // dropped
		}
		if n > 0 && r.p.stallOn(b[:n]) {
			r.stalled = true
			continue
		}
		return n, err
	}
}

// stallOn reports whether what a client sends, chunk, runs the statement of
// an armed stall, which it then takes.
func (p *pgProxy) stallOn(chunk []byte) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, m := range parseMsg.FindAllSubmatch(chunk, -1) {
		p.stmts[string(m[1])] = string(m[2])
	}
	for i, st := range p.stalls {
		hit := bytes.Contains(chunk, []byte(st.sql))
		for _, name := range stmtName.FindAll(chunk, -1) {
			hit = hit || strings.Contains(p.stmts[string(name)], st.sql)
		}
		if hit {
			p.stalls = append(p.stalls[:i], p.stalls[i+1:]...)
			close(st.done)
			return true
		}
	}
	return false
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
