package auth

import "testing"

func TestIsLoopback(t *testing.T) {
	tests := []struct {
		addr string
		want bool
	}{
		{"127.0.0.1:8080", true},
		{"127.1.2.3:80", true},
		{"[::1]:0", true},
		{"localhost:8080", true},
		{"LOCALHOST:8080", true},
		{"localhost", true},
		{"127.0.0.1", true},
		{"::1", true},
		{"[::1]", true},
		{"[::ffff:127.0.0.1]:80", true},
		{":8080", false},
		{"", false},
		{"0.0.0.0:8080", false},
		{"[::]:8080", false},
		{"10.1.2.3:80", false},
		{"192.168.1.1:80", false},
		{"example.com:80", false},
		{"localhost.evil.com:80", false},
		{"[::2]:80", false},
	}
	for _, tt := range tests {
		t.Run(tt.addr, func(t *testing.T) {
			if got := IsLoopback(tt.addr); got != tt.want {
				t.Errorf("IsLoopback(%q) = %v, want %v", tt.addr, got, tt.want)
			}
		})
	}
}
