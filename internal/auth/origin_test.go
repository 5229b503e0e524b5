package auth

import (
	"net/http/httptest"
	"testing"
)

func TestOriginAllowed(t *testing.T) {
	tests := []struct {
		name    string
		host    string
		origin  string
		allowed []string
		want    bool
	}{
		{name: "no origin", host: "chat.example.com", want: true},
		{name: "no origin, strict list", host: "chat.example.com", allowed: []string{"https://other.example.com"}, want: true},
		{name: "same origin", host: "chat.example.com", origin: "https://chat.example.com", want: true},
		{name: "same origin with port", host: "localhost:8080", origin: "http://localhost:8080", want: true},
		{name: "same origin, other scheme", host: "localhost:8080", origin: "https://localhost:8080", want: true},
		{name: "same origin, default port in Host", host: "chat.example.com:443", origin: "https://chat.example.com", want: true},
		{name: "same origin, case", host: "Chat.Example.com", origin: "https://chat.example.COM", want: true},
		{name: "same origin IPv6", host: "[::1]:8080", origin: "http://[::1]:8080", want: true},
		{name: "other port", host: "localhost:8080", origin: "http://localhost:3000", want: false},
		{name: "other host", host: "chat.example.com", origin: "https://evil.example.com", want: false},
		{name: "suffix trick", host: "chat.example.com", origin: "https://chat.example.com.evil.net", want: false},
		{name: "null origin", host: "chat.example.com", origin: "null", want: false},
		{name: "origin with path", host: "chat.example.com", origin: "https://chat.example.com/x", want: false},
		{name: "origin with userinfo", host: "chat.example.com", origin: "https://chat.example.com@evil.net", want: false},
		{name: "star", host: "api.example.com", origin: "https://anything.net", allowed: []string{"*"}, want: true},
		{name: "star allows null", host: "api.example.com", origin: "null", allowed: []string{"*"}, want: true},
		{name: "exact origin", host: "api.example.com", origin: "https://chat.example.com", allowed: []string{"https://chat.example.com"}, want: true},
		{name: "exact origin, trailing slash and case", host: "api.example.com", origin: "https://chat.example.com", allowed: []string{"HTTPS://Chat.Example.com/"}, want: true},
		{name: "exact origin, default port", host: "api.example.com", origin: "https://chat.example.com:443", allowed: []string{"https://chat.example.com"}, want: true},
		{name: "exact origin, other scheme", host: "api.example.com", origin: "http://chat.example.com", allowed: []string{"https://chat.example.com"}, want: false},
		{name: "exact origin, other port", host: "api.example.com", origin: "https://chat.example.com:8443", allowed: []string{"https://chat.example.com"}, want: false},
		{name: "list excludes same origin", host: "api.example.com", origin: "https://api.example.com", allowed: []string{"https://chat.example.com"}, want: false},
		{name: "second entry", host: "api.example.com", origin: "http://localhost:5173", allowed: []string{"https://chat.example.com", "http://localhost:5173"}, want: true},
		{name: "wildcard subdomain", host: "api.example.com", origin: "https://chat.example.com", allowed: []string{"*.example.com"}, want: true},
		{name: "wildcard deep subdomain", host: "api.example.com", origin: "https://a.b.example.com:8443", allowed: []string{"*.example.com"}, want: true},
		{name: "wildcard excludes apex", host: "api.example.com", origin: "https://example.com", allowed: []string{"*.example.com"}, want: false},
		{name: "wildcard suffix trick", host: "api.example.com", origin: "https://evilexample.com", allowed: []string{"*.example.com"}, want: false},
		{name: "wildcard other domain", host: "api.example.com", origin: "https://example.com.evil.net", allowed: []string{"*.example.com"}, want: false},
		{name: "bare host", host: "api.example.com", origin: "http://chat.example.com:3000", allowed: []string{"chat.example.com"}, want: true},
		{name: "bare host mismatch", host: "api.example.com", origin: "https://www.chat.example.com", allowed: []string{"chat.example.com"}, want: false},
		{name: "null with list", host: "api.example.com", origin: "null", allowed: []string{"null"}, want: false},
		{name: "empty entry", host: "api.example.com", origin: "https://chat.example.com", allowed: []string{""}, want: false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := httptest.NewRequest("GET", "/v1/ws", nil)
			r.Host = tt.host
			if tt.origin != "" {
				r.Header.Set("Origin", tt.origin)
			}
			if got := OriginAllowed(r, tt.allowed); got != tt.want {
				t.Errorf("OriginAllowed(Origin %q, Host %q, %q) = %v, want %v", tt.origin, tt.host, tt.allowed, got, tt.want)
			}
		})
	}
}
