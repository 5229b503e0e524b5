// Package storetest is the conformance suite that every [store.Store]
// implementation passes: call [Run] from the implementation's tests.
package storetest

import (
	"errors"
	"fmt"
	"reflect"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/store"
)

// Run runs the conformance suite against the stores that open makes. Each
// subtest calls open once and expects a new, empty store that open has
// arranged (with t.Cleanup) to close and remove. Subtests run in parallel,
// so stores from concurrent calls must not share data.
func Run(t *testing.T, open func(t testing.TB) store.Store) {
	tests := []struct {
		name string
		fn   func(t *testing.T, s store.Store)
	}{
		{"Ping", testPing},
		{"ClaimConversation", testClaimConversation},
		{"SendStores", testSendStores},
		{"SendTitle", testSendTitle},
		{"SendErrors", testSendErrors},
		{"SendGeneratesIDs", testSendGeneratesIDs},
		{"SendTooManyTurns", testSendTooManyTurns},
		{"StartTurn", testStartTurn},
		{"FinishTurn", testFinishTurn},
		{"FinishTurnRoundTrip", testFinishTurnRoundTrip},
		{"ActiveTurn", testActiveTurn},
		{"Messages", testMessages},
		{"Heads", testHeads},
		{"HistoryOrder", testHistoryOrder},
		{"PagingWhileWriting", testPagingWhileWriting},
		{"UpdatedAtOrder", testUpdatedAtOrder},
		{"Message", testMessage},
		{"Conversations", testConversations},
		{"DeleteConversation", testDeleteConversation},
		{"UnfinishedTurns", testUnfinishedTurns},
		{"TimePrecision", testTimePrecision},
		{"ConcurrentSend", testConcurrentSend},
		{"ConcurrentRetry", testConcurrentRetry},
		{"ConcurrentSendTooManyTurns", testConcurrentSendTooManyTurns},
		{"ConcurrentFinish", testConcurrentFinish},
		{"ConcurrentClaim", testConcurrentClaim},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			tt.fn(t, open(t))
		})
	}
}

// epoch is the suite's clock origin; at(n) is n seconds after it.
var epoch = time.Date(2025, 3, 14, 15, 9, 26, 0, time.UTC)

func at(sec int) time.Time { return epoch.Add(time.Duration(sec) * time.Second) }

// req is a send of text from alice to conversation conv with the given ids.
func req(conv, msg, turn string, now time.Time) store.SendRequest {
	return store.SendRequest{
		ConversationID: conv,
		Owner:          "alice",
		MessageID:      msg,
		TurnID:         turn,
		Text:           "hello " + msg,
		Model:          "sim",
		Now:            now,
	}
}

// send stores r and fails the test when it cannot.
func send(t testing.TB, s store.Store, r store.SendRequest) store.SendResult {
	t.Helper()
	res, err := s.Send(t.Context(), r)
	if err != nil {
		t.Fatalf("Send(%s/%s): %v", r.ConversationID, r.MessageID, err)
	}
	if res.Duplicate {
		t.Fatalf("Send(%s/%s): unexpected Duplicate", r.ConversationID, r.MessageID)
	}
	return res
}

// finish ends turn id with status and fails the test when it does not.
func finish(t testing.TB, s store.Store, id string, status chat.TurnStatus, now time.Time) {
	t.Helper()
	got, ok, err := s.FinishTurn(t.Context(), store.TurnResult{TurnID: id, Status: status, Content: "reply " + id, Seq: 1, Now: now})
	if err != nil || !ok || got != status {
		t.Fatalf("FinishTurn(%s, %s) = %s, %v, %v; want %[2]s, true, nil", id, status, got, ok, err)
	}
}

// ids lists the ids of ms.
func ids(ms []chat.Message) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.ID
	}
	return out
}

// messageIDs returns the ids of every message of conversation conv.
func messageIDs(t testing.TB, s store.Store, conv string) []string {
	t.Helper()
	ms, err := s.Messages(t.Context(), conv, 1000, "")
	if err != nil {
		t.Fatalf("Messages(%s): %v", conv, err)
	}
	return ids(ms)
}

// wantErr fails the test unless err is want: a sentinel matched with
// errors.Is, or a *chat.TurnActiveError matched by TurnID, or nil.
func wantErr(t testing.TB, what string, err, want error) {
	t.Helper()
	var wantActive *chat.TurnActiveError
	switch {
	case want == nil:
		if err != nil {
			t.Fatalf("%s: error %v, want none", what, err)
		}
	case errors.As(want, &wantActive):
		var got *chat.TurnActiveError
		if !errors.As(err, &got) || got.TurnID != wantActive.TurnID {
			t.Fatalf("%s: error %v, want %v", what, err, want)
		}
	case !errors.Is(err, want):
		t.Fatalf("%s: error %v, want %v", what, err, want)
	}
}

// equal fails the test unless got and want are deeply equal.
func equal[T any](t testing.TB, what string, got, want T) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("%s:\n got  %s\n want %s", what, show(got), show(want))
	}
}

// show prints v with any *chat.Usage inside it followed, not as an address.
func show(v any) string {
	usage := func(u *chat.Usage) string {
		if u == nil {
			return "<nil>"
		}
		return fmt.Sprintf("%+v", *u)
	}
	switch v := v.(type) {
	case chat.Message:
		return fmt.Sprintf("%+v (usage %s)", v, usage(v.Usage))
	case chat.Turn:
		return fmt.Sprintf("%+v (usage %s)", v, usage(v.Usage))
	case *chat.Usage:
		return usage(v)
	}
	return fmt.Sprintf("%+v", v)
}

func testPing(t *testing.T, s store.Store) {
	if err := s.Ping(t.Context()); err != nil {
		t.Fatalf("Ping: %v", err)
	}
}
