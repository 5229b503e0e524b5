package auth

import (
	"net"
	"net/netip"
	"strings"
)

// Dev reports whether requests without a token are accepted.
func (a *Authenticator) Dev() bool { return a.dev }

// IsLoopback reports whether the listen address addr ("host:port", or a bare
// host) binds only the loopback interface: "localhost", 127.0.0.0/8 or ::1.
// An empty host (":8080") or an unspecified one ("0.0.0.0", "::") binds every
// interface and is not loopback; names other than "localhost" are not
// resolved and count as not loopback.
func IsLoopback(addr string) bool {
	host := addr
	if h, _, err := net.SplitHostPort(addr); err == nil {
		host = h
	} else {
		host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	}
	if host == "" {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return false
	}
	return ip.Unmap().IsLoopback()
}
