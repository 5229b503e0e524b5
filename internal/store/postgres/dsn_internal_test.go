package postgres

import "testing"

// A connection string's own connect_timeout, and only that, keeps the
// default of DefaultConnectTimeout away; text that merely contains the
// name (another parameter's name or value) does not.
func TestConnectTimeoutGiven(t *testing.T) {
	for dsn, want := range map[string]bool{
		"postgres://u:p@h/db":                                  false,
		"postgres://u:p@h/db?connect_timeout=0":                true,
		"postgresql://h/db?sslmode=disable&connect_timeout=3":  true,
		"postgres://h/db?connect%5Ftimeout=0":                  true,
		"postgres://h/db?application_name=no_connect_timeout":  false,
		"postgres://u:connect_timeout@h/db":                    false,
		"host=h user=u dbname=db":                              false,
		"host=h user=u connect_timeout=0":                      true,
		"connect_timeout = 4 host=h":                           true,
		"host=h password='connect_timeout'":                    false,
		"host=h application_name=no_connect_timeout dbname=db": false,
	} {
		if got := connectTimeoutGiven(dsn); got != want {
			t.Errorf("connectTimeoutGiven(%q) = %v, want %v", dsn, got, want)
		}
	}
}
