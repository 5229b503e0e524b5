package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/url"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// The legacy ("compat") chat protocol of COMPAT.md, which the server serves
// beside its own: the idle scenario can hold its connections on it.

// The legacy user and token: in dev mode the server accepts dev-token, and
// dev is the user of a native dev-mode connection.
const (
	compatUser  = "dev"
	compatToken = "dev-token"
)

// compatURL is the legacy chat socket of the server whose native socket is
// native: the same scheme and host, path /ws/chat, with session, user and
// token in the query (any path or query of native is dropped).
func compatURL(native, session, user, token string) (string, error) {
	u, err := url.Parse(native)
	if err != nil {
		return "", fmt.Errorf("parse url: %w", err)
	}
	if u.Host == "" {
		return "", fmt.Errorf("url %q has no host", native)
	}
	u.Path, u.RawPath, u.Fragment, u.RawFragment = "/ws/chat", "", "", ""
	q := url.Values{"session_id": {session}, "user_id": {user}}
	if token != "" {
		q.Set("token", token)
	}
	u.RawQuery = q.Encode()
	return u.String(), nil
}

// compatConn is one connection on the legacy protocol. Its reader reads
// and discards frames (so that the library answers the server's pings)
// until the connection ends.
type compatConn struct {
	ws      *websocket.Conn
	closing atomic.Bool   // the tool is closing it: its read error is no event
	done    chan struct{} // closed when the reader ends
}

// connectCompat dials the legacy socket at u, waits for its welcome frame
// for session (dial → welcome goes to b.join), and starts its reader. A
// failure is counted by reason.
func (b *bench) connectCompat(ctx context.Context, u, session string) (*compatConn, error) {
	t0 := time.Now()
	ws, err := b.d.dialURL(ctx, u)
	if err != nil {
		b.count("dial: " + shortErr(err))
		return nil, err
	}
	t1 := time.Now()
	if b.recording.Load() {
		b.dial.Record(t1.Sub(t0).Microseconds())
	}
	rctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	_, data, err := ws.Read(rctx)
	cancel()
	if err != nil {
		b.count("welcome: " + closeReason(err))
		_ = ws.CloseNow()
		return nil, fmt.Errorf("no welcome: %w", err)
	}
	ttff := time.Since(t1)
	var w struct {
		Type      string `json:"type"`
		SessionID string `json:"sessionId"`
	}
	if err := json.Unmarshal(data, &w); err != nil || w.Type != "welcome" {
		what := "unparsable frame"
		if err == nil {
			what = "frame type " + w.Type
		}
		b.count("welcome: first frame is " + what)
		_ = ws.CloseNow()
		return nil, fmt.Errorf("first frame is %s, not welcome", what)
	}
	if w.SessionID != session {
		b.count("welcome: for another session")
		_ = ws.CloseNow()
		return nil, fmt.Errorf("welcome for session %q, not %q", w.SessionID, session)
	}
	b.join.Record(ttff.Microseconds())
	c := &compatConn{ws: ws, done: make(chan struct{})}
	b.mu.Lock()
	b.compat = append(b.compat, c)
	b.mu.Unlock()
	go c.readLoop(b)
	return c, nil
}

func (c *compatConn) readLoop(b *bench) {
	defer close(c.done)
	for {
		_, r, err := c.ws.Reader(context.Background())
		if err == nil {
			_, err = io.Copy(io.Discard, r)
		}
		if err != nil {
			if !c.closing.Load() {
				b.count("connection ended: " + closeReason(err))
			}
			return
		}
	}
}

// close ends the connection with a normal close handshake and waits for
// the reader.
func (c *compatConn) close() {
	c.closing.Store(true)
	_ = c.ws.Close(websocket.StatusNormalClosure, "") // tears the connection down even when the handshake fails
	<-c.done
}

// closeCompat closes every legacy connection of the run.
func (b *bench) closeCompat() {
	b.mu.Lock()
	conns := b.compat
	b.compat = nil
	b.mu.Unlock()
	closeEach(conns)
}
