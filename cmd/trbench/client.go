package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// clientFrame is any frame the tool sends (PROTOCOL.md, client → server).
// The tool speaks the wire protocol on its own, without the server's
// packages, so that it notices when the two drift apart.
type clientFrame struct {
	Type           string `json:"type"`
	ID             string `json:"id,omitempty"`
	ConversationID string `json:"conversation_id,omitempty"`
	After          *after `json:"after,omitempty"`
	History        *int   `json:"history,omitempty"`
	Text           string `json:"text,omitempty"`
	MessageID      string `json:"message_id,omitempty"`
	TurnID         string `json:"turn_id,omitempty"`
}

type after struct {
	TurnID string `json:"turn_id"`
	Seq    int64  `json:"seq"`
}

// dialer opens WebSocket connections to one server, spreading their source
// addresses over 127.0.0.x when asked (one loopback address has ~28k
// ephemeral ports).
type dialer struct {
	url     string
	header  http.Header
	dialers []*net.Dialer
	next    atomic.Uint64
}

func newDialer(wsURL, token string, srcIPs int) (*dialer, error) {
	u, err := url.Parse(wsURL)
	if err != nil {
		return nil, fmt.Errorf("parse url: %w", err)
	}
	d := &dialer{url: wsURL, header: http.Header{}}
	if token != "" {
		d.header.Set("Authorization", "Bearer "+token)
	}
	if srcIPs < 1 {
		srcIPs = 1
	}
	host := u.Hostname()
	if ip := net.ParseIP(host); srcIPs > 1 && (ip == nil || ip.To4() == nil || !ip.IsLoopback()) {
		return nil, fmt.Errorf("--src-ips needs an IPv4 loopback server address, not %q", host)
	}
	for i := range srcIPs {
		nd := &net.Dialer{Timeout: 10 * time.Second}
		if srcIPs > 1 {
			nd.LocalAddr = &net.TCPAddr{IP: net.IPv4(127, 0, byte((i+1)/256), byte((i+1)%256))}
		}
		d.dialers = append(d.dialers, nd)
	}
	return d, nil
}

// dial opens one connection; the caller owns it and starts its reader.
func (d *dialer) dial(ctx context.Context) (*wsConn, error) {
	return d.dialURL(ctx, d.url)
}

// dialURL opens one connection to u (another path of the same server,
// e.g. the legacy socket) with the dialer's source addresses.
func (d *dialer) dialURL(ctx context.Context, u string) (*wsConn, error) {
	nd := d.dialers[d.next.Add(1)%uint64(len(d.dialers))]
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	return dialWS(ctx, nd, u, d.header)
}

// joinKind says which histogram a join's time to first frame goes to.
type joinKind int32

const (
	joinFresh  joinKind = iota // join without after
	joinResume                 // join with after
)

// counters are one connection's totals, counted only while the run
// records; written by the connection's reader only, read at the end.
type counters struct {
	frames, deltaFrames, deltas, bytes atomic.Int64
}

// conn is one WebSocket connection of the load. Its reader (see ws.go)
// is the only one that reads the socket and the only owner of trk; any
// goroutine may write frames (wsConn serialises writes).
type conn struct {
	b    *bench
	ws   *wsConn
	idx  int
	conv *convState // nil for a probe
	lat  *Histogram // token-to-screen samples (a shard of the run's)
	trk  *Tracker   // owned by the reader goroutine
	c    counters
	// sender: this connection sends the conversation's turns and passes
	// the events of its turns to the driver.
	sender bool

	closing  atomic.Bool  // the tool is closing it: its read error is no event
	open     atomic.Int64 // turns seen and not ended, for the drain at the end
	joinSent atomic.Int64 // UnixNano of the join waiting for its joined; 0 = none
	joinKind atomic.Int32
	joined   chan joinedInfo // capacity 1: the last joined frame
	joinErr  chan string     // capacity 1: the code of the last refused join
	ends     chan string     // when set before start: ids of ended turns (never blocks)
	done     chan struct{}   // closed when the reader ends
	err      error           // why the reader ended; set before done closes

	f        frame    // the frame being handled (reader-owned)
	resync   bool     // a gap was seen; deltas wait for the re-join's joined (reader-owned)
	recent   [16]seen // the last frames seen, for violation reports (reader-owned)
	nrecent  int
	turnStr  string // interned id of the last turn seen (reader-owned)
	turnSeen []byte
}

// seen is one frame in a connection's recent history.
type seen struct {
	at        time.Time
	what      string // frame type, or "> join …" for what the tool sent
	turn      string
	from, seq int64
}

type joinedInfo struct {
	ttff    time.Duration
	bytes   int
	active  string
	seq     int64
	hasFrom bool
}

func newConn(b *bench, ws *wsConn, idx int, trk *Tracker, ends chan string) *conn {
	if trk == nil {
		trk = NewTracker()
	}
	c := &conn{b: b, ws: ws, idx: idx, trk: trk, lat: b.latShard(idx), joined: make(chan joinedInfo, 1), joinErr: make(chan string, 1), ends: ends, done: make(chan struct{})}
	trk.OnViolation = c.violation // the reader now owns the tracker
	return c
}

func (c *conn) note(s seen) {
	c.recent[c.nrecent%len(c.recent)] = s
	c.nrecent++
}

// violation keeps the first few violations with the frames before them,
// so that a bug can be reported with what the client saw.
func (c *conn) violation(kind, turn string, from, seq, last int64) {
	var sb strings.Builder
	fmt.Fprintf(&sb, "%s: turn %s frame %d..%d after last %d on connection %d", kind, turn, from, seq, last, c.idx)
	if c.conv != nil {
		fmt.Fprintf(&sb, " (conversation %s)", c.conv.id)
	}
	sb.WriteString("; recent frames:")
	for i := max(0, c.nrecent-len(c.recent)); i < c.nrecent; i++ {
		s := c.recent[i%len(c.recent)]
		fmt.Fprintf(&sb, " [%s %s %s %d..%d]", s.at.Format("15:04:05.000"), s.what, s.turn, s.from, s.seq)
	}
	c.b.violationSample(sb.String())
}

// start runs the reader.
func (c *conn) start() { c.ws.start(c) }

func (c *conn) write(ctx context.Context, f clientFrame) error {
	data, err := json.Marshal(f)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return c.ws.write(ctx, data)
}

// join sends a join (with after when a != nil) and returns once the
// reader saw joined, or ctx ends.
func (c *conn) join(ctx context.Context, conv string, a *after, history *int) (joinedInfo, error) {
	kind := joinFresh
	if a != nil {
		kind = joinResume
	}
	select { // drop a stale joined
	case <-c.joined:
	default:
	}
	select { // and a stale refusal
	case <-c.joinErr:
	default:
	}
	c.joinKind.Store(int32(kind))
	c.joinSent.Store(time.Now().UnixNano())
	if err := c.write(ctx, clientFrame{Type: "join", ID: joinID, ConversationID: conv, After: a, History: history}); err != nil {
		return joinedInfo{}, err
	}
	return c.awaitJoined(ctx)
}

// joinID marks the join frames, so that the server's refusal of one is
// told from its other errors.
const joinID = "join"

// joinTimeout bounds the wait for a join's answer: a server that never
// answers one (or whose answer is lost) fails that connection rather than
// hold the whole run.
const joinTimeout = time.Minute

// awaitJoined waits for the answer to the join just sent: joined, or the
// server's refusal of it.
func (c *conn) awaitJoined(ctx context.Context) (joinedInfo, error) {
	t := time.NewTimer(joinTimeout)
	defer t.Stop()
	select {
	case j := <-c.joined:
		return j, nil
	case code := <-c.joinErr:
		return joinedInfo{}, fmt.Errorf("join refused: %s", code)
	case <-t.C:
		return joinedInfo{}, fmt.Errorf("no answer to join within %s", joinTimeout)
	case <-c.done:
		return joinedInfo{}, fmt.Errorf("connection ended before joined: %w", c.err)
	case <-ctx.Done():
		return joinedInfo{}, ctx.Err()
	}
}

// close ends the connection at once (no close handshake: a dropped tab)
// and waits for the reader.
func (c *conn) close() {
	c.closing.Store(true)
	c.ws.closeNow()
	<-c.done
}

// message handles one frame from the server (wsHandler).
func (c *conn) message(data []byte) { c.handle(data, &c.f) }

// closed is the end of the connection (wsHandler).
func (c *conn) closed(err error) {
	defer close(c.done)
	c.err = err
	if c.closing.Load() {
		return
	}
	c.b.count("connection ended: " + closeReason(err))
	if c.conv != nil && !c.b.stopping.Load() {
		// A careful client resumes whatever ended its connection (1001,
		// 4008, a dropped socket).
		c.b.count("resumes after the server ended a connection")
		go c.b.reconnect(context.Background(), c.conv, c)
	}
}

// intern returns b as a string, reusing the last one when equal, so that
// the deltas of one turn do not allocate.
func (c *conn) intern(b []byte) string {
	if string(b) != c.turnStr {
		c.turnStr = string(b)
	}
	return c.turnStr
}

func (c *conn) handle(data []byte, f *frame) {
	now := time.Now()
	rec := c.b.recording.Load()
	if rec {
		c.c.frames.Add(1)
		c.c.bytes.Add(int64(len(data)))
	}
	if err := parseFrame(data, f); err != nil {
		c.b.count("client: unparsable frame")
		return
	}
	if f.hasActive {
		c.note(seen{at: now, what: string(f.typ) + " active", turn: c.intern(f.active.turn), from: f.active.from, seq: f.active.seq})
	} else {
		c.note(seen{at: now, what: string(f.typ), turn: c.intern(f.turn), from: f.from, seq: f.seq})
	}
	switch string(f.typ) {
	case "turn.delta":
		if c.resync {
			return
		}
		turn := c.intern(f.turn)
		known := c.trk.Known(turn)
		v, n := c.trk.Delta(turn, f.from, f.seq)
		if !known {
			c.open.Add(1)
		}
		if rec {
			c.c.deltaFrames.Add(1)
			c.c.deltas.Add(n)
			// A sample per frame that put new text on the screen: a
			// duplicate or a frame past a gap shows nothing, and its
			// stamp may be old (text sent again).
			if f.ts > 0 && n > 0 {
				c.lat.Record(now.UnixMicro() - f.ts)
			}
		}
		if c.sender && c.conv != nil && v == Applied {
			c.conv.seq.Store(f.seq)
		}
		if v == GapSeen {
			c.rejoin(turn)
		}
	case "turn.start":
		turn := c.intern(f.turn)
		if !c.trk.Known(turn) {
			c.open.Add(1)
		}
		c.trk.Start(turn)
		if c.sender && c.conv != nil {
			c.conv.seq.Store(0)
		}
	case "turn.end":
		if c.resync {
			// Rule 2: after a gap the client waits for the re-join's
			// joined. The end comes again then: live if the turn still
			// runs, or after the rest of its text if it has ended.
			return
		}
		turn := c.intern(f.turn)
		if !c.trk.Known(turn) {
			c.open.Add(1)
		}
		if !c.trk.Ended(turn) {
			c.open.Add(-1)
		}
		c.trk.End(turn, f.seq)
		if c.ends != nil {
			select {
			case c.ends <- turn:
			default:
			}
		}
		if c.sender && c.conv != nil {
			c.conv.onEnd(now, turn, string(f.status), f.completion, f.seq)
		}
	case "joined":
		c.resync = false
		ji := joinedInfo{bytes: len(data)}
		if sent := c.joinSent.Swap(0); sent != 0 {
			ji.ttff = now.Sub(time.Unix(0, sent))
			// The figures count the measured window only (not the
			// connecting, the warm-up or the last turns' drain); the
			// caller gets ttff either way.
			switch {
			case !rec:
			case joinKind(c.joinKind.Load()) == joinResume:
				c.b.resume.Record(ji.ttff.Microseconds())
			default:
				c.b.join.Record(ji.ttff.Microseconds())
			}
		}
		if f.hasActive {
			turn := c.intern(f.active.turn)
			ji.active, ji.seq, ji.hasFrom = turn, f.active.seq, f.active.from > 0
			if !c.trk.Known(turn) {
				c.open.Add(1)
			}
			if c.trk.Snapshot(turn, f.active.from, f.active.seq) == GapSeen {
				c.rejoin(turn)
			}
			if c.sender && c.conv != nil {
				c.conv.seq.Store(f.active.seq)
			}
		}
		select {
		case c.joined <- ji:
		default:
		}
	case "error":
		code := string(f.code)
		c.b.count("server error: " + code)
		if string(f.id) == joinID {
			select {
			case c.joinErr <- code:
			default:
			}
		}
		if c.sender && c.conv != nil {
			c.conv.onError(string(f.id), code)
		}
	case "ack", "message", "pong":
	default:
		c.b.count("client: unknown frame type " + string(f.typ))
	}
}

// rejoin follows rule 2 of PROTOCOL.md after a gap: join again with after,
// ignoring deltas until the joined frame.
func (c *conn) rejoin(turn string) {
	c.resync = true
	c.b.count("client: re-join after a gap")
	if c.conv == nil {
		return
	}
	last, _ := c.trk.Last(turn)
	c.joinKind.Store(int32(joinResume))
	c.joinSent.Store(time.Now().UnixNano())
	go func() { // never block the reader on a write
		if err := c.write(context.Background(), clientFrame{Type: "join", ConversationID: c.conv.id, After: &after{TurnID: turn, Seq: last}}); err != nil {
			c.b.count("client: re-join write failed")
		}
	}()
}

// closeReason names how a connection ended, for the error table.
func closeReason(err error) string {
	if code := closeCode(err); code != -1 {
		return fmt.Sprintf("close %d", code)
	}
	var ne net.Error
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "eof"
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	}
	msg := err.Error()
	if i := strings.LastIndex(msg, ": "); i >= 0 {
		msg = msg[i+2:]
	}
	return msg
}

// errorCounts is a concurrent tally of named events (errors, closes).
type errorCounts struct {
	mu sync.Mutex
	m  map[string]int64
}

func (e *errorCounts) add(name string, n int64) {
	e.mu.Lock()
	if e.m == nil {
		e.m = map[string]int64{}
	}
	e.m[name] += n
	e.mu.Unlock()
}

func (e *errorCounts) snapshot() map[string]int64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make(map[string]int64, len(e.m))
	for k, v := range e.m {
		out[k] = v
	}
	return out
}
