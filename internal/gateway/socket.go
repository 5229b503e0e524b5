package gateway

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// onOwnStack runs f on a goroutine of its own and waits for it. A socket's
// long-lived goroutine calls what runs deep (JSON decoding, store and bus
// calls) this way, so that its own stack stays at the few KiB an idle read
// needs instead of keeping whatever f grew it to for the connection's life.
func onOwnStack(f func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	<-done
}

// keepAlive pings the peer of ws every PingInterval until ctx ends; a peer
// that does not answer within IdleTimeout is closed with closeWith (1001),
// so dead connections are reaped. A PingInterval of 0 disables it.
//
// One timer measures both the interval and the wait for the pong, and the
// ping takes no context: an idle connection keeps no goroutine for this,
// and each ping allocates only what the library does (a context and a timer
// per ping were most of an idle server's garbage, which its heap, and so
// its RSS, grew by between collections).
func (s *Server) keepAlive(ctx context.Context, ws *websocket.Conn, closeWith func(websocket.StatusCode, string)) {
	if s.cfg.PingInterval <= 0 {
		return
	}
	p := &pinger{s: s, ctx: ctx, ws: ws, closeWith: closeWith}
	p.t = time.AfterFunc(s.cfg.PingInterval, p.fire)
}

type pinger struct {
	s         *Server
	ctx       context.Context
	ws        *websocket.Conn
	closeWith func(websocket.StatusCode, string)
	t         *time.Timer
	// waiting is set while a ping is out: the timer then measures
	// IdleTimeout, and its firing means the pong is late.
	waiting atomic.Bool
}

func (p *pinger) fire() {
	if p.ctx.Err() != nil {
		return
	}
	if p.waiting.Load() {
		p.s.m.limitHits.WithLabelValues("idle_timeout").Inc()
		p.closeWith(websocket.StatusGoingAway, "idle timeout")
		return
	}
	p.waiting.Store(true)
	p.t.Reset(p.s.cfg.IdleTimeout)
	// Ping returns at the pong, or with an error once the socket is
	// closed: by the timer above, or because the connection ended.
	if err := p.ws.Ping(context.Background()); err != nil {
		return
	}
	if p.waiting.CompareAndSwap(true, false) {
		p.t.Reset(p.s.cfg.PingInterval)
	}
}

// stallTimer closes a connection whose writer has been blocked for
// WriteTimeout: a slow consumer whose socket is too full to even carry the
// 4008. The writer arms it before a batch of writes and stops it after;
// sockets are written without a context, which would cost a timer and a
// registration per write. Ending the connection closes its TCP connection,
// which fails the blocked write.
type stallTimer struct {
	t *time.Timer
}

// arm starts the timer; end ends the connection whose context is ctx.
func (st *stallTimer) arm(s *Server, ctx context.Context, end func()) {
	if st.t != nil {
		st.t.Reset(s.cfg.WriteTimeout)
		return
	}
	st.t = time.AfterFunc(s.cfg.WriteTimeout, func() {
		if ctx.Err() != nil {
			return
		}
		s.m.slowCloses.Inc()
		s.log.Debug("write stalled; closing", "timeout", s.cfg.WriteTimeout)
		end()
	})
}

func (st *stallTimer) stop() {
	if st.t != nil {
		st.t.Stop()
	}
}
