package gateway

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/auth"
	"github.com/tokenrelay/tokenrelay/internal/bus/bustest"
	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/store"
	"github.com/tokenrelay/tokenrelay/internal/store/sqlite"
)

// togetherStore holds the first n Conversation reads until all n have
// read, so that n claims all find the id unused before any creates it.
type togetherStore struct {
	store.Store
	n    int
	mu   sync.Mutex
	read int
	all  chan struct{}
}

func (s *togetherStore) Conversation(ctx context.Context, id string) (chat.Conversation, error) {
	c, err := s.Store.Conversation(ctx, id)
	s.mu.Lock()
	s.read++
	first, last := s.read <= s.n, s.read == s.n
	s.mu.Unlock()
	if last {
		close(s.all)
	}
	if first {
		select {
		case <-s.all:
		case <-ctx.Done():
		}
	}
	return c, err
}

// A user who loses the race for an unused id to another user created
// nothing, and keeps her allowance of new conversations.
func TestClaimLostToAnotherUserSpendsNothing(t *testing.T) {
	st, err := sqlite.Open(t.Context(), filepath.Join(t.TempDir(), "t.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	ts := &togetherStore{Store: st, n: 2, all: make(chan struct{})}
	a, err := auth.New(auth.Config{Dev: true})
	if err != nil {
		t.Fatal(err)
	}
	s := New(Config{Limits: Limits{NewConversations: 1}}, bustest.Start(t), ts, a)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = s.Shutdown(ctx)
	})
	errs := make(map[string]error)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, u := range []string{"alice", "bob"} {
		wg.Go(func() {
			err := s.claim(t.Context(), u, "c-contested")
			mu.Lock()
			errs[u] = err
			mu.Unlock()
		})
	}
	wg.Wait()
	loser := "alice"
	if errs["alice"] == nil {
		loser = "bob"
	}
	if errs[loser] == nil || !errors.Is(errs[loser], chat.ErrForbidden) {
		t.Fatalf("claims: %v; want one of them forbidden", errs)
	}
	if err := s.claim(t.Context(), loser, "c-mine"); err != nil {
		t.Errorf("%s created nothing, yet her next new conversation got %v", loser, err)
	}
}
