package gateway

import (
	"context"
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

// keepAlive pings the peer of ws every PingInterval, from a timer rather
// than a goroutine of its own, until ctx ends; a peer that does not answer
// within IdleTimeout is closed with closeWith (1001), so dead connections
// are reaped. A PingInterval of 0 disables it.
func (s *Server) keepAlive(ctx context.Context, ws *websocket.Conn, closeWith func(websocket.StatusCode, string)) {
	if s.cfg.PingInterval <= 0 {
		return
	}
	time.AfterFunc(s.cfg.PingInterval, func() {
		if ctx.Err() != nil {
			return
		}
		pctx, cancel := context.WithTimeout(ctx, s.cfg.IdleTimeout)
		err := ws.Ping(pctx)
		cancel()
		if err != nil {
			if ctx.Err() == nil {
				s.m.limitHits.WithLabelValues("idle_timeout").Inc()
				closeWith(websocket.StatusGoingAway, "idle timeout")
			}
			return
		}
		s.keepAlive(ctx, ws, closeWith)
	})
}
