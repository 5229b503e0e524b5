package e2e_test

import (
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/gateway"
	"github.com/tokenrelay/tokenrelay/internal/store"
	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// TestStoredEndNeverPublished: a turn ended in the store whose end never
// reached the bus (the gateway that cancelled it before it started died
// before publishing the end) ends for the clients following it at the
// next quiet sweep, with the stored status; its text the stream lacks
// comes from the stored reply.
func TestStoredEndNeverPublished(t *testing.T) {
	server := bustest.Start(t)
	st, a := storeAndAuth(t)
	gw := gateway.New(gateway.Config{QuietCheck: 20 * time.Millisecond}, bustest.Open(t, server.Conn().ConnectedUrl()), st, a)
	wsURL := serveGateway(t, gw)

	for _, tt := range []struct {
		conv, text string
		status     chat.TurnStatus
		seq        int64
	}{
		{"cancelled-queued", "", chat.StatusCancelled, 0},
		{"ended-unheard", "words the stream never had", chat.StatusComplete, 3},
	} {
		t.Run(tt.conv, func(t *testing.T) {
			res, err := st.Send(t.Context(), store.SendRequest{ConversationID: tt.conv, Owner: "dev", MessageID: "m1", Text: "hello", Now: time.Now()})
			if err != nil {
				t.Fatal(err)
			}
			c := trtest.Dial(t, wsURL, nil)
			j := c.Join(tt.conv, nil)
			if j.Obj("active").Str("turn_id") != res.Turn.ID {
				t.Fatalf("joined: %v, want turn %s active", j, res.Turn.ID)
			}
			if _, _, err := st.FinishTurn(t.Context(), store.TurnResult{TurnID: res.Turn.ID, Status: tt.status, Content: tt.text, Seq: tt.seq, Now: time.Now()}); err != nil {
				t.Fatal(err)
			}
			fs := c.Until(10*time.Second, func(f trtest.Frame) bool { return f.Type() == "turn.end" })
			end := fs[len(fs)-1]
			if end.Type() != "turn.end" || end.Str("status") != string(tt.status) || end.Int("seq") != tt.seq {
				t.Fatalf("frames %v, want turn.end %s at seq %d", fs, tt.status, tt.seq)
			}
			got := ""
			for _, f := range fs {
				if f.Type() == "turn.delta" {
					got += f.Str("text")
				}
			}
			if got != tt.text {
				t.Fatalf("text %q before the end, want %q", got, tt.text)
			}
		})
	}
}
