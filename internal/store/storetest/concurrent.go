package storetest

import (
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/store"
)

// together runs fn(0) … fn(n-1) in n goroutines released at once and waits
// for them. fn must not call t.Fatal; it reports through what it captures.
func together(n int, fn func(i int)) {
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			<-start
			fn(i)
		})
	}
	close(start)
	wg.Wait()
}

func testConcurrentSend(t *testing.T, s store.Store) {
	// Round 0 races to create the conversation, round 1 to use it once it
	// exists.
	const n = 20
	var stored []string
	for round := range 2 {
		results := make([]store.SendResult, n)
		errs := make([]error, n)
		together(n, func(i int) {
			id := fmt.Sprintf("%d-%d", round, i)
			results[i], errs[i] = s.Send(t.Context(), req("race", "m"+id, "t"+id, at(1+round)))
		})

		winner := -1
		for i, err := range errs {
			if err == nil {
				if winner >= 0 {
					t.Fatalf("round %d: sends %d and %d both started a turn", round, winner, i)
				}
				winner = i
			}
		}
		if winner < 0 {
			t.Fatalf("round %d: no send succeeded: %v", round, errs)
		}
		turn := results[winner].Turn.ID
		for i, err := range errs {
			if i != winner {
				wantErr(t, fmt.Sprintf("round %d: send %d", round, i), err, &chat.TurnActiveError{TurnID: turn})
			}
		}
		stored = append(stored, results[winner].Message.ID, turn)
		equal(t, "messages", messageIDs(t, s, "race"), stored)
		finish(t, s, turn, chat.StatusComplete, at(1+round))
	}
}

func testConcurrentRetry(t *testing.T, s store.Store) {
	const n = 20
	results := make([]store.SendResult, n)
	errs := make([]error, n)
	together(n, func(i int) {
		results[i], errs[i] = s.Send(t.Context(), req("retry", "m1", fmt.Sprintf("retry-t%d", i), at(1)))
	})

	stored := 0
	var turn string
	for i, err := range errs {
		if err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
		if !results[i].Duplicate {
			stored++
			turn = results[i].Turn.ID
		}
	}
	if stored != 1 {
		t.Fatalf("%d sends stored the message, want 1", stored)
	}
	for i, res := range results {
		if res.Message.ID != "m1" || res.Turn.ID != turn {
			t.Fatalf("send %d = %s / %s, want m1 / %s", i, res.Message.ID, res.Turn.ID, turn)
		}
	}
	equal(t, "messages", messageIDs(t, s, "retry"), []string{"m1", turn})
}

func testConcurrentSendTooManyTurns(t *testing.T, s store.Store) {
	const n, limit = 10, 3
	errs := make([]error, n)
	together(n, func(i int) {
		r := req(fmt.Sprintf("many%d", i), "m1", fmt.Sprintf("many%d-t1", i), at(1))
		r.MaxActiveTurns = limit
		_, errs[i] = s.Send(t.Context(), r)
	})

	ok := 0
	for i, err := range errs {
		switch {
		case err == nil:
			ok++
		case !errors.Is(err, chat.ErrTooManyTurns):
			t.Fatalf("send %d: %v", i, err)
		}
	}
	equal(t, "sends that started a turn", ok, limit)
	turns, err := s.UnfinishedTurns(t.Context())
	wantErr(t, "UnfinishedTurns", err, nil)
	equal(t, "unfinished turns", len(turns), limit)
}

func testConcurrentFinish(t *testing.T, s store.Store) {
	id := newTurn(t, s, "end", chat.StatusStreaming)
	const n = 10
	statuses := []chat.TurnStatus{chat.StatusComplete, chat.StatusCancelled, chat.StatusError, chat.StatusInterrupted}
	got := make([]chat.TurnStatus, n)
	oks := make([]bool, n)
	errs := make([]error, n)
	together(n, func(i int) {
		got[i], oks[i], errs[i] = s.FinishTurn(t.Context(), store.TurnResult{
			TurnID: id, Status: statuses[i%len(statuses)], Content: fmt.Sprintf("by %d", i), Seq: int64(i), Now: at(3),
		})
	})

	winner := -1
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("finish %d: %v", i, errs[i])
		}
		if oks[i] {
			if winner >= 0 {
				t.Fatalf("finishes %d and %d both ended the turn", winner, i)
			}
			winner = i
		}
	}
	if winner < 0 {
		t.Fatal("no finish ended the turn")
	}
	want := statuses[winner%len(statuses)]
	for i, st := range got {
		if st != want {
			t.Fatalf("finish %d saw status %s, want the winner's %s", i, st, want)
		}
	}
	turn, err := s.Turn(t.Context(), id)
	wantErr(t, "Turn", err, nil)
	if turn.Status != want || turn.Content != fmt.Sprintf("by %d", winner) || turn.Seq != int64(winner) {
		t.Fatalf("Turn = %s, want the result of finish %d", show(turn), winner)
	}
}

func testConcurrentClaim(t *testing.T, s store.Store) {
	const n = 10
	convs := make([]chat.Conversation, n)
	errs := make([]error, n)
	together(n, func(i int) {
		convs[i], errs[i] = s.ClaimConversation(t.Context(), "claimed", fmt.Sprintf("user%d", i), at(1))
	})

	winner := -1
	for i, err := range errs {
		switch {
		case err == nil && winner >= 0:
			t.Fatalf("users %d and %d both own the conversation", winner, i)
		case err == nil:
			winner = i
		case !errors.Is(err, chat.ErrForbidden):
			t.Fatalf("claim %d: %v", i, err)
		}
	}
	if winner < 0 {
		t.Fatal("no claim succeeded")
	}
	c, err := s.Conversation(t.Context(), "claimed")
	wantErr(t, "Conversation", err, nil)
	equal(t, "owner", c.Owner, fmt.Sprintf("user%d", winner))
}
