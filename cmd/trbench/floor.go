package main

import (
	"bufio"
	"context"
	"crypto/sha1"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/protocol"
)

// The floor scenario measures what the stream load costs a server that
// does nothing but put the frames on the sockets: trbench starts itself as
// a child process (floor-serve) that accepts the WebSocket connections and,
// from one goroutine per conversation waking on a ticker at the turn's
// rate, writes each watcher the same turn.delta frame tokenrelay would
// (the same encoder, ids and word sizes, with the send-time stamp). It
// stores nothing, runs no turns, decodes nothing. Its CPU, read from /proc
// like the server's, is the floor under the server's on this machine and
// kernel: the system calls, the loopback's TCP work, the timers and the
// wake-ups that any server delivering these tokens pays. Run in the same
// invocation as a stream, it turns "server cores" into a multiple of what
// the machine makes unavoidable.

// floorServeArg is the argument that makes trbench the floor's server.
const floorServeArg = "floor-serve"

// floorServe is the floor's server. It listens on a free loopback port,
// prints the address as its first line on out, and serves until in ends
// (its parent closed the pipe, or died).
func floorServe(in io.Reader, out io.Writer) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	if _, err := fmt.Fprintln(out, ln.Addr().String()); err != nil {
		return err
	}
	fs := &floorServer{groups: map[string]*floorGroup{}}
	go func() {
		_, _ = io.Copy(io.Discard, in)
		ln.Close()
	}()
	for {
		c, err := ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return nil
		}
		if err != nil {
			// Out of descriptors, say: the dial fails, the floor goes on.
			fmt.Fprintln(os.Stderr, "floor-serve: accept:", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go fs.upgrade(c)
	}
}

type floorServer struct {
	mu     sync.Mutex
	groups map[string]*floorGroup // conversations still gathering their watchers; guarded by mu
}

// floorGroup is one conversation: its watchers' connections and the
// stream written to them.
type floorGroup struct {
	conv  string
	rate  float64
	size  int
	conns []net.Conn
}

// upgrade answers the WebSocket handshake of
// /floor?conv=ID&rate=R&watchers=W and adds the connection to conversation
// ID, whose stream starts once W connections have joined it.
func (fs *floorServer) upgrade(c net.Conn) {
	br := bufio.NewReader(c)
	req, err := http.ReadRequest(br)
	if err != nil {
		c.Close()
		return
	}
	q := req.URL.Query()
	conv := q.Get("conv")
	rate, rerr := strconv.ParseFloat(q.Get("rate"), 64)
	size, serr := strconv.Atoi(q.Get("watchers"))
	key := req.Header.Get("Sec-WebSocket-Key")
	if !chat.ValidID(conv) || rerr != nil || rate <= 0 || serr != nil || size <= 0 || key == "" ||
		!strings.EqualFold(req.Header.Get("Upgrade"), "websocket") {
		_, _ = io.WriteString(c, "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
		c.Close()
		return
	}
	sum := sha1.Sum([]byte(key + wsGUID))
	resp := "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " +
		base64.StdEncoding.EncodeToString(sum[:]) + "\r\n\r\n"
	if _, err := io.WriteString(c, resp); err != nil {
		c.Close()
		return
	}
	fs.mu.Lock()
	g := fs.groups[conv]
	if g == nil {
		g = &floorGroup{conv: conv, rate: rate, size: size}
		fs.groups[conv] = g
	}
	g.conns = append(g.conns, c)
	full := len(g.conns) == g.size
	if full {
		delete(fs.groups, conv)
	}
	fs.mu.Unlock()
	if full {
		g.stream()
	}
}

// floorWords are words of the simulator's sizes: its vocabulary averages
// about 8 bytes a word with its space.
var floorWords = [][]byte{[]byte(" latency"), []byte(" token"), []byte(" stream"), []byte(" resume"), []byte(" a"), []byte(" quickly"), []byte(" over")}

// stream writes the conversation's deltas, one frame per watcher per token,
// until none of its watchers is left. Turns follow one another as in the
// stream scenario, with ids of the same length, without their start and
// end frames.
func (g *floorGroup) stream() {
	const tokens = 100
	every := time.Duration(float64(time.Second) / g.rate)
	t := time.NewTicker(every)
	defer t.Stop()
	var k int
	turn := "t" + g.conv[1:] + "-0"
	var seq int64
	buf := make([]byte, 0, 512)
	for range t.C {
		seq++
		if seq > tokens {
			k++
			seq, turn = 1, "t"+g.conv[1:]+"-"+strconv.Itoa(k)
		}
		// The header goes in front of the payload: at most 4 bytes for
		// a payload under 64 KiB.
		buf = append(buf[:0], 0, 0, 0, 0)
		buf = protocol.AppendDelta(buf, g.conv, turn, seq, seq, floorWords[seq%int64(len(floorWords))], time.Now().UnixMicro())
		frame := wsServerFrame(buf, 4)
		live := g.conns[:0]
		for _, c := range g.conns {
			if _, err := c.Write(frame); err != nil {
				c.Close()
				continue
			}
			live = append(live, c)
		}
		g.conns = live
		if len(live) == 0 {
			return
		}
	}
}

// wsServerFrame fills in the header of an unmasked text frame whose payload
// follows the room reserved in buf[:room] and returns the frame.
func wsServerFrame(buf []byte, room int) []byte {
	n := len(buf) - room
	switch {
	case n < 126:
		buf[room-2], buf[room-1] = 0x80|opText, byte(n)
		return buf[room-2:]
	default: // under 64 KiB: room is 4
		buf[0], buf[1], buf[2], buf[3] = 0x80|opText, 126, byte(n>>8), byte(n)
		return buf
	}
}

// floorConn counts and times what one floor connection reads.
type floorConn struct {
	ws  *wsConn
	b   *bench
	lat *Histogram
	c   counters
	f   frame
}

func (c *floorConn) message(data []byte) {
	if !c.b.recording.Load() {
		return
	}
	now := time.Now()
	c.c.frames.Add(1)
	c.c.bytes.Add(int64(len(data)))
	if err := parseFrame(data, &c.f); err != nil || string(c.f.typ) != "turn.delta" {
		c.b.count("floor: unexpected frame")
		return
	}
	c.c.deltaFrames.Add(1)
	c.c.deltas.Add(1)
	if c.f.ts > 0 {
		c.lat.Record(now.UnixMicro() - c.f.ts)
	}
}

func (c *floorConn) close() { c.ws.closeNow() }

func (c *floorConn) closed(err error) {
	if !c.b.stopping.Load() {
		c.b.count("floor: closed: " + shortErr(err))
	}
}

// runFloor runs the floor's server as a child process, connects p.Turns ×
// p.Watchers connections to it and measures it over p.Duration after
// p.Warmup, as runStream measures the server.
func runFloor(ctx context.Context, e *env, p streamParams) (*Result, error) {
	if p.Turns <= 0 || p.Rate <= 0 || p.Watchers <= 0 {
		return nil, errors.New("floor: turns, rate and watchers must be positive")
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("floor: %w", err)
	}
	cmd := exec.Command(exe, floorServeArg)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("floor: %w", err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("floor: %w", err)
	}
	cmd.Stderr = e.stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("floor: start its server: %w", err)
	}
	defer func() {
		stdin.Close() // the server's cue to stop
		done := make(chan struct{})
		go func() {
			_ = cmd.Wait()
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	}()
	addr, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		return nil, fmt.Errorf("floor: its server did not start: %w", err)
	}
	addr = strings.TrimSpace(addr)
	probe := &serverProbe{pid: cmd.Process.Pid}

	b := newBench(e.cfg, e.d, e.nextRunID())
	p.Tokens = 100
	r := &Result{Scenario: "floor", Label: e.cfg.Label, Params: p, Started: time.Now()}
	r.Notes = append(r.Notes, fmt.Sprintf("server: trbench %s (pid %d), which only writes each token's turn.delta frame to its watchers, from a ticker per conversation: the floor under a server's CPU for this load on this machine", floorServeArg, cmd.Process.Pid))
	base := probe.settledRSS(ctx, 3)
	r.ServerRSSBase = base.RSS

	e.logf("floor: connecting %d × %d connections", p.Turns, p.Watchers)
	t0 := time.Now()
	var conns []*floorConn
	var mu sync.Mutex
	var failed atomic.Int64
	eachWatcher(p.Turns, p.Watchers, e.cfg.DialConcurrency, func(i, w int) {
		u := fmt.Sprintf("ws://%s/floor?conv=c-%s-%d&rate=%g&watchers=%d", addr, b.runID, i, p.Rate, p.Watchers)
		ws, err := e.d.dialURL(ctx, u)
		if err != nil {
			failed.Add(1)
			b.count("floor: dial: " + shortErr(err))
			return
		}
		fc := &floorConn{ws: ws, b: b, lat: b.latShard(i*p.Watchers + w)}
		ws.start(fc)
		mu.Lock()
		conns = append(conns, fc)
		mu.Unlock()
	})
	r.Conns, r.ConnFailures, r.SetupS = len(conns), failed.Load(), time.Since(t0).Seconds()
	defer func() {
		b.stopping.Store(true)
		closeEach(conns)
	}()
	joined := probe.settledRSS(ctx, 1)
	r.ServerRSSJoined = joined.RSS
	if r.Conns > 0 {
		r.RSSPerConn = float64(joined.RSS-base.RSS) / float64(r.Conns)
	}
	if !sleepCtx(ctx, p.Warmup) {
		return nil, ctx.Err()
	}
	s0 := probe.sample()
	self0 := selfCPU()
	tot0, idle0 := machineIdle()
	b.recording.Store(true)
	wstart := time.Now()
	if !sleepCtx(ctx, p.Duration) {
		return nil, ctx.Err()
	}
	b.recording.Store(false)
	window := time.Since(wstart)
	s1 := probe.sample()
	self1 := selfCPU()
	tot1, idle1 := machineIdle()

	var frames, deltaFrames, deltas, bytes int64
	for _, c := range conns {
		frames += c.c.frames.Load()
		deltaFrames += c.c.deltaFrames.Load()
		deltas += c.c.deltas.Load()
		bytes += c.c.bytes.Load()
	}
	w := window.Seconds()
	r.WindowS = w
	r.AvgActive = float64(p.Turns)
	r.OfferedTokS = p.Rate * float64(p.Turns)
	r.TokensPerDelt = 1
	r.DeltasS = float64(deltas) / w
	r.TokensS = r.DeltasS
	r.FramesS = float64(frames) / w
	r.DeltaFramesS = float64(deltaFrames) / w
	r.BytesS = float64(bytes) / w
	r.KeepUp = r.TokensS / (r.OfferedTokS * float64(p.Watchers))
	lat := b.latency().Summarize()
	r.Latency = &lat
	if s1.RSS == 0 {
		return nil, errors.New("floor: its server exited during the window")
	}
	cpu := (s1.CPU - s0.CPU).Seconds()
	r.ServerCPUs = cpu / w
	if r.TokensS > 0 {
		r.ServerCPUPer1k = cpu / (r.TokensS * w / 1000)
	}
	r.ServerRSSLoaded = s1.RSS
	r.RSSPerTurn = float64(s1.RSS-joined.RSS) / float64(p.Turns)
	r.ServerThreads = s1.Thread
	r.ClientCPUs = (self1 - self0).Seconds() / w
	if tot1 > tot0 {
		r.MachineBusy = 1 - float64(idle1-idle0)/float64(tot1-tot0)
		r.OtherCPUs = max(0, r.MachineBusy*float64(runtime.NumCPU())-r.ServerCPUs-r.ClientCPUs)
	}
	r.Events = b.errs.snapshot()
	return r, nil
}
