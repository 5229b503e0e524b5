package main

import "testing"

func TestCompatURL(t *testing.T) {
	tests := []struct {
		name, native, session, user, token string
		want                               string
	}{
		{"bench/run.sh's url", "ws://127.0.0.1:18282/v1/ws", "ic-ab1-7", "dev", "dev-token",
			"ws://127.0.0.1:18282/ws/chat?session_id=ic-ab1-7&token=dev-token&user_id=dev"},
		{"other path, query and fragment dropped", "wss://relay.example.com:8443/prefix/v1/ws?token=x&a=b#f", "s", "u", "t",
			"wss://relay.example.com:8443/ws/chat?session_id=s&token=t&user_id=u"},
		{"no path", "ws://localhost:8080", "s", "dev", "dev-token",
			"ws://localhost:8080/ws/chat?session_id=s&token=dev-token&user_id=dev"},
		{"escaped session, no token", "ws://[::1]:9000/v1/ws", "a b&c=d/é", "dev", "",
			"ws://[::1]:9000/ws/chat?session_id=a+b%26c%3Dd%2F%C3%A9&user_id=dev"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := compatURL(tt.native, tt.session, tt.user, tt.token)
			if err != nil || got != tt.want {
				t.Errorf("compatURL(%q) = %q, %v; want %q", tt.native, got, err, tt.want)
			}
		})
	}
	for _, bad := range []string{"://x", "ws:///v1/ws", "v1/ws"} {
		if got, err := compatURL(bad, "s", "dev", "dev-token"); err == nil {
			t.Errorf("compatURL(%q) = %q, want an error", bad, got)
		}
	}
}
