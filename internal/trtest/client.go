package trtest

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// Frame is one server frame, decoded loosely.
type Frame map[string]any

// Type is the frame's "type".
func (f Frame) Type() string { s, _ := f["type"].(string); return s }

// Str returns a string field.
func (f Frame) Str(k string) string { s, _ := f[k].(string); return s }

// Int returns a numeric field.
func (f Frame) Int(k string) int64 { n, _ := f[k].(float64); return int64(n) }

// Obj returns an object field.
func (f Frame) Obj(k string) Frame {
	m, _ := f[k].(map[string]any)
	return Frame(m)
}

// Client is a native-protocol WebSocket client that records every frame.
// Its reader runs in the background; tests wait on frames with Next/Until.
type Client struct {
	t    testing.TB
	Conn *websocket.Conn

	frames chan Frame
	mu     sync.Mutex
	closed error // set when the reader ends
	done   chan struct{}
	// Raw holds every frame's bytes, in order, for validity checks.
	Raw [][]byte

	nc *lockedConn // the TCP connection beneath Conn (see SendTogether)
}

// lockedConn is a client's TCP connection, written one Write at a time, so
// that SendTogether's write does not land inside a frame of the library's
// (which writes each of its own control frames with one Write).
type lockedConn struct {
	net.Conn
	mu sync.Mutex
}

func (c *lockedConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.Conn.Write(p)
}

// DialOptions tune Dial.
type DialOptions struct {
	Token  string
	Header http.Header
}

// Dial connects to wsURL (…/v1/ws) and starts reading.
func Dial(t testing.TB, wsURL string, opts *DialOptions) *Client {
	t.Helper()
	c, err := TryDial(t, wsURL, opts)
	if err != nil {
		t.Fatalf("dial %s: %v", wsURL, err)
	}
	return c
}

// TryDial is Dial returning the error.
func TryDial(t testing.TB, wsURL string, opts *DialOptions) (*Client, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	do := &websocket.DialOptions{}
	if opts != nil {
		do.HTTPHeader = opts.Header
		if opts.Token != "" {
			if do.HTTPHeader == nil {
				do.HTTPHeader = http.Header{}
			}
			do.HTTPHeader.Set("Authorization", "Bearer "+opts.Token)
		}
	}
	var nc *lockedConn
	dialer := &net.Dialer{}
	do.HTTPClient = &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := dialer.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			nc = &lockedConn{Conn: c}
			return nc, nil
		},
	}}
	ws, _, err := websocket.Dial(ctx, wsURL, do)
	if err != nil {
		return nil, err
	}
	ws.SetReadLimit(-1)
	c := &Client{t: t, Conn: ws, frames: make(chan Frame, 1<<16), done: make(chan struct{}), nc: nc}
	go c.read()
	t.Cleanup(func() { _ = ws.CloseNow() })
	return c, nil
}

func (c *Client) read() {
	defer close(c.done)
	for {
		typ, data, err := c.Conn.Read(context.Background())
		if err != nil {
			c.mu.Lock()
			c.closed = err
			c.mu.Unlock()
			close(c.frames)
			return
		}
		var f Frame
		if typ != websocket.MessageText || json.Unmarshal(data, &f) != nil {
			f = Frame{"type": "!invalid", "raw": string(data)}
		}
		c.mu.Lock()
		c.Raw = append(c.Raw, data)
		c.mu.Unlock()
		c.frames <- f
	}
}

// CloseErr is why the connection ended (nil while open).
func (c *Client) CloseErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

// CloseStatus is the close code the server sent, or -1.
func (c *Client) CloseStatus() websocket.StatusCode {
	<-c.done
	return websocket.CloseStatus(c.CloseErr())
}

// Done is closed when the connection has ended.
func (c *Client) Done() <-chan struct{} { return c.done }

// Send writes one frame (a map or struct marshalled to JSON, or a string
// sent as is).
func (c *Client) Send(v any) {
	c.t.Helper()
	if err := c.TrySend(v); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// TrySend is Send returning the write's error, for clients that reconnect
// when the server goes away (and for goroutines, which must not Fatal).
func (c *Client) TrySend(v any) error {
	c.t.Helper()
	data := c.encode(v)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return c.Conn.Write(ctx, websocket.MessageText, data)
}

// encode is v as Send writes it.
func (c *Client) encode(v any) []byte {
	c.t.Helper()
	switch x := v.(type) {
	case string:
		return []byte(x)
	case []byte:
		return x
	}
	data, err := json.Marshal(v)
	if err != nil {
		c.t.Fatal(err)
	}
	return data
}

// SendTogether writes frames (as Send takes them) to the socket with one
// write, so that the server receives them together: the second is there
// while the first is handled.
func (c *Client) SendTogether(vs ...any) {
	c.t.Helper()
	c.WriteRaw(c.Frames(vs...))
}

// Frames encodes vs (as Send takes them) as a client's frames on the wire,
// for WriteRaw.
func (c *Client) Frames(vs ...any) []byte {
	c.t.Helper()
	var b []byte
	for _, v := range vs {
		data := c.encode(v)
		// A final text frame, masked (RFC 6455 5.2) with the key 0, which
		// leaves the payload as it is.
		b = append(b, 0x81)
		switch n := len(data); {
		case n < 126:
			b = append(b, 0x80|byte(n))
		case n <= 0xFFFF:
			b = append(b, 0x80|126, byte(n>>8), byte(n))
		default:
			b = append(b, 0x80|127)
			b = binary.BigEndian.AppendUint64(b, uint64(n))
		}
		b = append(b, 0, 0, 0, 0)
		b = append(b, data...)
	}
	return b
}

// WriteRaw writes b to the socket beneath the WebSocket with one write.
func (c *Client) WriteRaw(b []byte) {
	c.t.Helper()
	if _, err := c.nc.Write(b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

// ErrClosed is returned by Next when the connection ended.
var ErrClosed = errors.New("connection closed")

// Next returns the next frame, or an error on timeout or close.
func (c *Client) Next(d time.Duration) (Frame, error) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case f, ok := <-c.frames:
		if !ok {
			return nil, fmt.Errorf("%w: %v", ErrClosed, c.CloseErr())
		}
		return f, nil
	case <-t.C:
		return nil, fmt.Errorf("no frame within %v", d)
	}
}

// Until returns frames up to and including the first that matches, failing
// the test after d.
func (c *Client) Until(d time.Duration, match func(Frame) bool) []Frame {
	c.t.Helper()
	deadline := time.Now().Add(d)
	var got []Frame
	for {
		f, err := c.Next(time.Until(deadline))
		if err != nil {
			c.t.Fatalf("waiting for a frame: %v (after %d frames: %s)", err, len(got), summary(got))
		}
		got = append(got, f)
		if match(f) {
			return got
		}
	}
}

// UntilType waits for a frame of type typ.
func (c *Client) UntilType(d time.Duration, typ string) []Frame {
	c.t.Helper()
	return c.Until(d, func(f Frame) bool { return f.Type() == typ })
}

// Join sends a join and waits for joined.
func (c *Client) Join(conv string, extra map[string]any) Frame {
	c.t.Helper()
	m := map[string]any{"type": "join", "conversation_id": conv}
	for k, v := range extra {
		m[k] = v
	}
	c.Send(m)
	fs := c.Until(10*time.Second, func(f Frame) bool { return f.Type() == "joined" || f.Type() == "error" })
	last := fs[len(fs)-1]
	if last.Type() == "error" {
		c.t.Fatalf("join %s: %v", conv, last)
	}
	return last
}

func summary(fs []Frame) string {
	var parts []string
	for i, f := range fs {
		if i >= 8 {
			parts = append(parts, "…")
			break
		}
		b, _ := json.Marshal(f)
		s := string(b)
		if len(s) > 160 {
			s = s[:160] + "…"
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, " ")
}

// Turn collects one turn's text from frames, checking the delivery rules:
// contiguous seqs (from..seq), exactly one end.
type Turn struct {
	ID     string
	Text   strings.Builder
	Seq    int64
	Ends   int
	Status string
	Errors []string
}

// Apply folds a frame into the turn; it records violations in Errors.
func (tr *Turn) Apply(f Frame) {
	switch f.Type() {
	case "turn.delta":
		if f.Str("turn_id") != tr.ID {
			return
		}
		from := f.Int("seq")
		if _, ok := f["from"]; ok {
			from = f.Int("from")
		}
		if tr.Ends > 0 {
			tr.Errors = append(tr.Errors, fmt.Sprintf("delta %d after end", f.Int("seq")))
		}
		if from != tr.Seq+1 {
			tr.Errors = append(tr.Errors, fmt.Sprintf("delta from %d after seq %d", from, tr.Seq))
			if from > tr.Seq+1 || f.Int("seq") <= tr.Seq {
				return
			}
		}
		tr.Text.WriteString(f.Str("text"))
		tr.Seq = f.Int("seq")
	case "turn.end":
		if f.Str("turn_id") != tr.ID {
			return
		}
		tr.Ends++
		tr.Status = f.Str("status")
		if tr.Ends > 1 {
			tr.Errors = append(tr.Errors, "second turn.end")
		}
		if f.Int("seq") != tr.Seq {
			tr.Errors = append(tr.Errors, fmt.Sprintf("turn.end seq %d, deltas reached %d", f.Int("seq"), tr.Seq))
		}
	}
}

// Get performs GET url and decodes the JSON answer into v, returning the
// status code.
func Get(t testing.TB, url string, v any) int {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if v != nil {
		_ = json.NewDecoder(resp.Body).Decode(v)
	}
	return resp.StatusCode
}

// Do performs an HTTP request with an optional JSON body and bearer token and
// decodes the JSON answer into v.
func Do(t testing.TB, method, url, token string, body, v any) int {
	t.Helper()
	var rd *strings.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = strings.NewReader(string(b))
	} else {
		rd = strings.NewReader("")
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if v != nil {
		_ = json.NewDecoder(resp.Body).Decode(v)
	}
	return resp.StatusCode
}
