package auth

import (
	"net"
	"net/http"
	"net/url"
	"strings"
)

// OriginAllowed reports whether the Origin header of r, a WebSocket upgrade or
// other browser request, may use the server.
//
// A request without Origin comes from a non-browser client and is allowed.
// With an empty allowed list only the same origin is allowed: the Origin's
// host and port must equal r.Host, whatever the scheme (default ports 80 and
// 443 are ignored on both sides). Otherwise each entry of allowed is one of
//   - "*": any origin;
//   - an exact origin such as "https://chat.example.com" (scheme, host and
//     port must match; case-insensitive);
//   - a host pattern such as "chat.example.com" or "*.example.com", matching
//     the Origin's host name under any scheme and port; "*.example.com"
//     matches subdomains only, not example.com itself.
//
// An Origin that is not a plain scheme://host[:port], such as "null", is
// allowed only by "*".
func OriginAllowed(r *http.Request, allowed []string) bool {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return true
	}
	for _, pattern := range allowed {
		if strings.TrimSpace(pattern) == "*" {
			return true
		}
	}
	u, ok := parseOrigin(origin)
	if !ok {
		return false
	}
	if len(allowed) == 0 {
		return hostPort(u.Hostname(), u.Port()) == hostPort(splitHost(r.Host))
	}
	for _, pattern := range allowed {
		pattern = strings.ToLower(strings.TrimSpace(pattern))
		if strings.Contains(pattern, "://") {
			p, ok := parseOrigin(pattern)
			if ok && originKey(p) == originKey(u) {
				return true
			}
			continue
		}
		if suffix, ok := strings.CutPrefix(pattern, "*."); ok {
			if strings.HasSuffix(u.Hostname(), "."+suffix) {
				return true
			}
			continue
		}
		if pattern != "" && pattern == u.Hostname() {
			return true
		}
	}
	return false
}

// parseOrigin parses a serialized origin "scheme://host[:port]", lowercased.
func parseOrigin(s string) (*url.URL, bool) {
	u, err := url.Parse(strings.ToLower(strings.TrimSuffix(s, "/")))
	if err != nil || u.Scheme == "" || u.Host == "" || u.User != nil ||
		u.Path != "" || u.RawQuery != "" || u.Fragment != "" || u.Opaque != "" {
		return nil, false
	}
	return u, true
}

// splitHost splits a Host header into its lowercased name and port.
func splitHost(host string) (string, string) {
	host = strings.ToLower(host)
	if h, p, err := net.SplitHostPort(host); err == nil {
		return h, p
	}
	return strings.TrimSuffix(strings.TrimPrefix(host, "["), "]"), ""
}

// hostPort joins name and port, dropping the default ports 80 and 443 so that
// "example.com" and "example.com:443" compare equal.
func hostPort(name, port string) string {
	if port == "" || port == "80" || port == "443" {
		return name
	}
	return net.JoinHostPort(name, port)
}

// originKey serializes u as scheme://host[:port] without the scheme's default
// port, so that "https://example.com:443" equals "https://example.com".
func originKey(u *url.URL) string {
	port := u.Port()
	if u.Scheme == "http" && port == "80" || u.Scheme == "https" && port == "443" || u.Scheme == "ws" && port == "80" || u.Scheme == "wss" && port == "443" {
		port = ""
	}
	if port == "" {
		return u.Scheme + "://" + u.Hostname()
	}
	return u.Scheme + "://" + net.JoinHostPort(u.Hostname(), port)
}
