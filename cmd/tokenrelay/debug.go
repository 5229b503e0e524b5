package main

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"

	"github.com/tokenrelay/tokenrelay/internal/auth"
)

// startDebug serves Go's profiler on addr (for `go tool pprof`), apart from
// the public listener so it is never exposed by accident. It has no
// authentication; /debug/pprof/cmdline is left out, since the command line
// may hold --jwt-secret or --openai-api-key.
func startDebug(addr string, log *slog.Logger, stderr io.Writer) (func(), error) {
	if addr == "" {
		return func() {}, nil
	}
	warnUnauthenticated("--debug-addr", addr, "Go's profiler", log, stderr)
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	log.Info("debug server", "addr", ln.Addr().String())
	return func() { srv.Close() }, nil
}

// warnUnauthenticated warns, in the log and past any --log-level on stderr,
// that flag serves what (with no authentication) on addr when addr is not
// a loopback address.
func warnUnauthenticated(flag, addr, what string, log *slog.Logger, stderr io.Writer) {
	if auth.IsLoopback(addr) {
		return
	}
	log.Warn("UNAUTHENTICATED LISTENER ON A NON-LOOPBACK ADDRESS: "+flag+" serves "+what+" to anyone who can reach it", "addr", addr)
	fmt.Fprintf(stderr, "tokenrelay: WARNING: %s %s serves %s without authentication to anyone who can reach it; keep it on a private network or a loopback address\n", flag, addr, what)
}
