package gateway

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/store"
	"github.com/tokenrelay/tokenrelay/internal/store/sqlite"
)

// recordingSink counts the starts and ends a view sends per turn.
type recordingSink struct {
	mu     sync.Mutex
	starts map[string]int
	ends   map[string]int
}

func (r *recordingSink) message(string, chat.Message) {}
func (r *recordingSink) start(_, turn, _, _ string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.starts[turn]++
}
func (r *recordingSink) delta(string, string, int64, int64, int64, string, int64) {}
func (r *recordingSink) end(_, turn string, _ int64, _ chat.TurnStatus, _ string, _ *chat.Usage) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ends[turn]++
}
func (r *recordingSink) fail(error)            {}
func (r *recordingSink) revoked(*view)         {}
func (r *recordingSink) gone(*view)            {}
func (r *recordingSink) dropped(*view, string) {}

// A join with a long history of ended turns finds the conversation's turn
// still running in the store, but its end already in the stream: the
// joined frame shows it active and the end follows at once. Its live end,
// buffered during the join, comes after that and must be dropped as a
// duplicate, however many ended turns the history held: a view that had
// forgotten the turn would take that end for a turn it never heard of and
// send it again from its start.
func TestJoinRemembersTheTurnThatEndedDuringIt(t *testing.T) {
	ctx := t.Context()
	st, err := sqlite.Open(ctx, filepath.Join(t.TempDir(), "tokenrelay.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	b := bustest.Start(t)
	s := New(Config{QuietCheck: -1}, b, st, nil)
	t.Cleanup(func() { _ = s.Shutdown(context.Background()) })

	const conv, ended = "long", 120
	now := time.Now().Add(-time.Hour)
	for i := range ended {
		turn := fmt.Sprintf("t%d", i)
		if _, err := st.Send(ctx, store.SendRequest{ConversationID: conv, Owner: "dev", MessageID: fmt.Sprintf("m%d", i), TurnID: turn, Text: "hi", Now: now}); err != nil {
			t.Fatal(err)
		}
		if _, _, err := st.FinishTurn(ctx, store.TurnResult{TurnID: turn, Status: chat.StatusComplete, Content: "x", Seq: 1, Now: now}); err != nil {
			t.Fatal(err)
		}
	}
	// Rounds of the same race: which ended turns a view that forgets some
	// would keep depends on a map's order.
	for round := range 20 {
		turn, msg := fmt.Sprintf("last%d", round), fmt.Sprintf("lastm%d", round)
		if _, err := st.Send(ctx, store.SendRequest{ConversationID: conv, Owner: "dev", MessageID: msg, TurnID: turn, Text: "hi", Now: time.Now()}); err != nil {
			t.Fatal(err)
		}
		end := bus.Event{Kind: bus.KindEnd, ConversationID: conv, TurnID: turn, Status: chat.StatusInterrupted}
		if _, err := b.PublishEvent(ctx, &end); err != nil {
			t.Fatal(err)
		}
		sink := &recordingSink{starts: map[string]int{}, ends: map[string]int{}}
		var wg sync.WaitGroup
		v := newView(s, ctx, &wg, conv, "dev", sink)
		j, followUps, turns, err := v.join(ctx, 500, nil)
		if err != nil {
			t.Fatal(err)
		}
		if j.Active == nil || j.Active.TurnID != turn {
			t.Fatalf("round %d: joined.active = %+v, want %s", round, j.Active, turn)
		}
		// The turn's end is stored after the join's read, then arrives live.
		if _, _, err := st.FinishTurn(ctx, store.TurnResult{TurnID: turn, Status: chat.StatusInterrupted, Now: time.Now()}); err != nil {
			t.Fatal(err)
		}
		v.deliver(end)
		for _, fu := range followUps {
			fu()
		}
		v.ready(turns)
		wg.Wait()
		v.close()
		if sink.starts[turn] != 0 || sink.ends[turn] != 1 {
			t.Fatalf("round %d: the turn that ended during the join was sent %d starts and %d ends, want none and one", round, sink.starts[turn], sink.ends[turn])
		}
	}
}
