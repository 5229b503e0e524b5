package security_test

import (
	"context"
	"net/http"
	"strings"
	"testing"

	"github.com/coder/websocket"

	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// upgradeStatus tries a WebSocket upgrade with origin ("" for none) and
// returns the HTTP status: 101 when accepted.
func upgradeStatus(t *testing.T, wsURL, origin string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	h := http.Header{}
	if origin != "" {
		h.Set("Origin", origin)
	}
	ws, resp, err := websocket.Dial(ctx, wsURL, &websocket.DialOptions{HTTPHeader: h})
	if err == nil {
		ws.CloseNow()
		return http.StatusSwitchingProtocols
	}
	if resp == nil {
		t.Fatalf("dial with Origin %q: %v", origin, err)
	}
	return resp.StatusCode
}

// TestOrigin checks the Origin check of /v1/ws: same origin only by
// default, --allowed-origins otherwise; no Origin (a non-browser client) is
// allowed; refusals answer 403 before any upgrade and are counted as
// tokenrelay_auth_failures_total{reason="origin"}.
func TestOrigin(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		args    []string
		origins map[string]bool // origin → allowed; "SELF" is the server's own
	}{
		{
			name: "default: same origin",
			origins: map[string]bool{
				"":                           true,
				"SELF":                       true,
				"https://SELF":               true, // scheme is not compared (TLS may end at a proxy)
				"http://evil.example":        false,
				"http://127.0.0.1:1":         false, // another port
				"http://localhost.evil.test": false,
				"null":                       false,
			},
		},
		{
			name: "allowed list",
			args: []string{"--allowed-origins", "https://app.example.com, *.corp.example"},
			origins: map[string]bool{
				"SELF":                         false, // a list replaces the default
				"https://app.example.com":      true,
				"https://app.example.com:443":  true,
				"http://app.example.com":       false, // exact origin: scheme counts
				"https://app.example.com:8443": false,
				"https://chat.corp.example":    true,
				"https://corp.example":         false,
				"https://evilcorp.example":     false,
				"https://app.example.com.evil": false,
				"null":                         false,
				"":                             true,
			},
		},
		{
			name:    "any origin",
			args:    []string{"--allowed-origins", "*"},
			origins: map[string]bool{"https://anything.example": true, "null": true},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			p := trtest.Serve(t, tt.args...)
			self := strings.TrimPrefix(p.URL, "http://")
			refused := 0
			for origin, ok := range tt.origins {
				o := origin
				if o == "SELF" {
					o = p.URL
				}
				o = strings.Replace(o, "://SELF", "://"+self, 1)
				got := upgradeStatus(t, p.WSURL(), o)
				if ok && got != 101 || !ok && got != 403 {
					t.Errorf("Origin %q: status %d, want allowed=%v", o, got, ok)
				}
				if !ok {
					refused++
				}
			}
			if got := trtest.Metric(t, p.URL, "tokenrelay_auth_failures_total", `reason="origin"`); got != float64(refused) {
				t.Errorf("auth failures for origin = %v, want %d", got, refused)
			}
		})
	}
}
