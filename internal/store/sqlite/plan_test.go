package sqlite

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/tokenrelay/tokenrelay/internal/store/sqlstore"
)

// TestActiveTurnPlan checks that the queries for active turns use the
// messages_active partial index, which SQLite does only when the query
// repeats the index's predicate exactly.
func TestActiveTurnPlan(t *testing.T) {
	db, err := Open(t.Context(), filepath.Join(t.TempDir(), "plan.db"))
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	t.Cleanup(func() { db.Close() })

	tests := []struct {
		name  string
		query string
		args  []any
	}{
		{"conversation", `SELECT m.id FROM messages m WHERE m.conversation_id = ? AND ` + sqlstore.ActiveTurn +
			` ORDER BY m.position DESC LIMIT 1`, []any{"c"}},
		{"all", `SELECT ` + sqlstore.TurnColumns + ` FROM messages m JOIN conversations c ON c.id = m.conversation_id
			WHERE ` + sqlstore.ActiveTurn + ` ORDER BY m.created_at, m.position`, nil},
		{"owner", `SELECT count(*) FROM messages m JOIN conversations c ON c.id = m.conversation_id
			WHERE c.owner = ? AND ` + sqlstore.ActiveTurn, []any{"alice"}},
		{"send checks", sqlstore.SendChecks, []any{"c", "m", "c", "t", "t", "c", "t"}},
		{"listed", `SELECT ` + sqlstore.ConversationColumns + ` FROM conversations c WHERE c.id = ?`, []any{"c"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rows, err := db.read.QueryContext(t.Context(), "EXPLAIN QUERY PLAN "+tt.query, tt.args...)
			if err != nil {
				t.Fatalf("explain: %v", err)
			}
			defer rows.Close()
			var plan []string
			for rows.Next() {
				var id, parent, unused int
				var detail string
				if err := rows.Scan(&id, &parent, &unused, &detail); err != nil {
					t.Fatalf("scan: %v", err)
				}
				plan = append(plan, detail)
			}
			if err := rows.Err(); err != nil {
				t.Fatalf("explain: %v", err)
			}
			if !strings.Contains(strings.Join(plan, "\n"), "messages_active") {
				t.Fatalf("plan does not use messages_active:\n%s", strings.Join(plan, "\n"))
			}
		})
	}
}
