package e2e_test

import (
	"fmt"
	"net/http/httptest"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/store/postgres/pgtest"
	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// The same send arriving twice at once (a client's retry racing its first
// try, on two connections, through one gateway or two) stores one message,
// announces one turn, asks the model once, and both senders get the ack
// naming the stored pair.
func TestConcurrentDuplicateSends(t *testing.T) {
	for _, kind := range []string{"sqlite", "postgres"} {
		for _, layout := range []string{"serve", "two-gateways"} {
			t.Run(kind+"/"+layout, func(t *testing.T) {
				concurrentDuplicateSends(t, kind, layout)
			})
		}
	}
}

func concurrentDuplicateSends(t *testing.T, kind, layout string) {
	storeURL := ""
	if kind == "postgres" {
		storeURL = pgtest.SchemaURL(t)
	}
	fm := &fakeModel{closed: make(chan time.Time, 1000), answer: func(int) []string { return []string{"An", " answer."} }}
	srv := httptest.NewServer(fm)
	t.Cleanup(srv.Close)
	model := []string{"--provider", "openai", "--openai-base-url", srv.URL + "/v1", "--openai-api-key", "sk-test-secret", "--model", "m1"}
	limits := []string{"--limit-sends", "0", "--limit-turns", "0", "--limit-new-conversations", "0"}

	var gw [2]*trtest.Proc
	switch layout {
	case "serve":
		args := append(append([]string{}, model...), limits...)
		if storeURL != "" {
			args = append(args, "--store-url", storeURL)
		}
		gw[0] = trtest.Serve(t, args...)
		gw[1] = gw[0]
	case "two-gateways":
		_, natsURL, sqliteURL := trtest.ScaleOutDeps(t)
		if storeURL == "" {
			storeURL = sqliteURL
		} else if out, err := exec.Command(trtest.Binary(t), "migrate", "--store-url", storeURL).CombinedOutput(); err != nil {
			t.Fatalf("migrate: %v\n%s", err, out)
		}
		common := []string{"--nats-url", natsURL, "--store-url", storeURL}
		for range 2 {
			trtest.Start(t, append(append([]string{"worker"}, common...), model...)...)
		}
		for i := range gw {
			gw[i] = trtest.Start(t, append(append([]string{"gateway", "--addr", "127.0.0.1:0", "--model", "m1"}, common...), limits...)...)
			gw[i].WaitReady(t)
		}
	}
	watchers := []*trtest.Client{trtest.Dial(t, gw[0].WSURL(), nil), trtest.Dial(t, gw[1].WSURL(), nil)}
	senders := []*trtest.Client{trtest.Dial(t, gw[0].WSURL(), nil), trtest.Dial(t, gw[1].WSURL(), nil)}
	for _, w := range watchers {
		w.Join("dup", nil)
	}

	// sendTwice sends the same frame on both senders at once and checks
	// that both are answered with the ack naming message m and turn tid.
	sendTwice := func(conv, m, tid, text string) {
		t.Helper()
		var ready, start sync.WaitGroup
		ready.Add(len(senders))
		start.Add(1)
		var sent sync.WaitGroup
		for _, c := range senders {
			sent.Add(1)
			go func() {
				defer sent.Done()
				ready.Done()
				start.Wait()
				c.Send(map[string]any{"type": "send", "conversation_id": conv, "text": text, "message_id": m, "turn_id": tid, "id": tid})
			}()
		}
		ready.Wait()
		start.Done()
		sent.Wait()
		for i, c := range senders {
			fs := c.Until(wait, func(f trtest.Frame) bool { return f.Str("id") == tid })
			a := fs[len(fs)-1]
			if a.Type() != "ack" || a.Str("message_id") != m || a.Str("turn_id") != tid {
				t.Fatalf("sender %d: send of %s answered %v, want an ack naming %s and %s", i, m, a, m, tid)
			}
		}
	}

	const rounds = 25
	type seen struct{ messages, starts, ends int }
	counts := make([]map[string]*seen, len(watchers))
	for i := range counts {
		counts[i] = map[string]*seen{}
	}
	// drain reads watcher i's frames until turn tid has ended on it.
	drain := func(i int, tid string) {
		t.Helper()
		watchers[i].Until(wait, func(f trtest.Frame) bool {
			id := f.Str("turn_id")
			if f.Type() == "message" {
				id = strings.Replace(f.Obj("message").Str("message_id"), "m-", "t-", 1)
			}
			s := counts[i][id]
			if s == nil {
				s = &seen{}
				counts[i][id] = s
			}
			switch f.Type() {
			case "message":
				s.messages++
			case "turn.start":
				s.starts++
			case "turn.end":
				s.ends++
				if st := f.Str("status"); st != "complete" {
					t.Errorf("watcher %d: turn %s ended %s: %s", i, id, st, f.Str("error"))
				}
			case "error":
				t.Fatalf("watcher %d: %v", i, f)
			}
			return f.Type() == "turn.end" && id == tid
		})
	}
	for r := range rounds {
		tid := fmt.Sprintf("t-%d", r)
		sendTwice("dup", fmt.Sprintf("m-%d", r), tid, fmt.Sprintf("question %d", r))
		for i := range watchers {
			drain(i, tid)
		}
	}
	// A last turn, sent once: every event of the turns before it comes
	// before its end.
	senders[0].Send(map[string]any{"type": "send", "conversation_id": "dup", "text": "last", "message_id": "m-last", "turn_id": "t-last", "id": "t-last"})
	for i := range watchers {
		drain(i, "t-last")
	}
	for i := range watchers {
		for r := range rounds {
			tid := fmt.Sprintf("t-%d", r)
			if s := counts[i][tid]; s == nil || *s != (seen{1, 1, 1}) {
				t.Errorf("watcher %d saw turn %s as %+v, want one message, one turn.start and one turn.end", i, tid, s)
			}
		}
	}

	// Sends racing to create their conversation.
	for r := range rounds {
		sendTwice(fmt.Sprintf("fresh-%d", r), "m-fresh", fmt.Sprintf("t-fresh-%d", r), fmt.Sprintf("fresh question %d", r))
	}
	for r := range rounds {
		conv := fmt.Sprintf("fresh-%d", r)
		deadline := time.Now().Add(wait)
		for {
			ms := messages(t, gw[0].URL, conv, "")
			if len(ms) != 2 {
				t.Fatalf("%s holds %d messages, want 2: %v", conv, len(ms), ms)
			}
			if ms[1].Status == "complete" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("turn of %s still %s", conv, ms[1].Status)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	asked := map[string]int{}
	fm.mu.Lock()
	for _, req := range fm.requests {
		asked[req.Messages[len(req.Messages)-1].Content]++
	}
	fm.mu.Unlock()
	for r := range rounds {
		for _, q := range []string{fmt.Sprintf("question %d", r), fmt.Sprintf("fresh question %d", r)} {
			if asked[q] != 1 {
				t.Errorf("the model was asked %q %d times, want once", q, asked[q])
			}
		}
	}
	if ms := messages(t, gw[1].URL, "dup", "?limit=500"); len(ms) != 2*(rounds+1) {
		t.Errorf("dup holds %d messages, want %d", len(ms), 2*(rounds+1))
	}
	// Each turn was announced and enqueued by one gateway only, even where
	// the views and the workers would have absorbed a second start.
	created := trtest.Metric(t, gw[0].URL, "tokenrelay_sends_total", "")
	if gw[1] != gw[0] {
		created += trtest.Metric(t, gw[1].URL, "tokenrelay_sends_total", "")
	}
	if created != 2*rounds+1 {
		t.Errorf("the gateways created %v turns, want %d", created, 2*rounds+1)
	}
}
