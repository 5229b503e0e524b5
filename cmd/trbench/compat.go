package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"sync/atomic"
	"time"
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

// compatConn is one connection on the legacy protocol. Its reader hands
// over the first frame (the welcome) and discards the rest until the
// connection ends.
type compatConn struct {
	b       *bench
	ws      *wsConn
	welcome chan []byte   // the first frame; closed when the connection ends before it
	got     bool          // the first frame was seen (reader-owned)
	closing atomic.Bool   // the tool is closing it: its end is no event
	done    chan struct{} // closed when the reader ends
	err     error         // why the reader ended; set before done closes
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
	c := &compatConn{b: b, ws: ws, welcome: make(chan []byte, 1), done: make(chan struct{})}
	ws.start(c)
	fail := func(count string, err error) (*compatConn, error) {
		b.count(count)
		c.closing.Store(true)
		ws.closeNow()
		return nil, err
	}
	t := time.NewTimer(20 * time.Second)
	defer t.Stop()
	var data []byte
	select {
	case data = <-c.welcome:
	case <-t.C:
		return fail("welcome: timeout", errors.New("no welcome within 20s"))
	case <-ctx.Done():
		return fail("welcome: "+closeReason(ctx.Err()), ctx.Err())
	}
	if data == nil {
		<-c.done
		b.count("welcome: " + closeReason(c.err))
		return nil, fmt.Errorf("no welcome: %w", c.err)
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
		return fail("welcome: first frame is "+what, fmt.Errorf("first frame is %s, not welcome", what))
	}
	if w.SessionID != session {
		return fail("welcome: for another session", fmt.Errorf("welcome for session %q, not %q", w.SessionID, session))
	}
	b.join.Record(ttff.Microseconds())
	b.mu.Lock()
	b.compat = append(b.compat, c)
	b.mu.Unlock()
	return c, nil
}

// message takes the welcome and discards the rest (wsHandler).
func (c *compatConn) message(data []byte) {
	if !c.got {
		c.got = true
		c.welcome <- append([]byte(nil), data...)
	}
}

// closed is the end of the connection (wsHandler).
func (c *compatConn) closed(err error) {
	c.err = err
	if !c.got {
		close(c.welcome) // connectCompat counts it
	} else if !c.closing.Load() {
		c.b.count("connection ended: " + closeReason(err))
	}
	close(c.done)
}

// close ends the connection with a normal close handshake and waits for
// the reader.
func (c *compatConn) close() {
	c.closing.Store(true)
	c.ws.closeWith(statusNormal)
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
