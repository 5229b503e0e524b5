package postgres

import "testing"

func TestRebind(t *testing.T) {
	tests := []struct {
		name, query, want string
	}{
		{"none", `SELECT 1`, `SELECT 1`},
		{"numbered", `SELECT ? WHERE a = ? AND b IN (?, ?)`, `SELECT $1 WHERE a = $2 AND b IN ($3, $4)`},
		{"literal", `SELECT '?', ? WHERE t = 'it''s ?' AND u = ?`, `SELECT '?', $1 WHERE t = 'it''s ?' AND u = $2`},
		{"many", `VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`, `VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := rebind(tt.query); got != tt.want {
				t.Errorf("rebind(%q)\n got  %q\n want %q", tt.query, got, tt.want)
			}
		})
	}
}
