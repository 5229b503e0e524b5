package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"go.uber.org/goleak"
)

// startRun runs `tokenrelay serve` in-process with run() and returns its URL
// and a stop function that cancels it and waits for run to return.
func startRun(t *testing.T, args ...string) (string, func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	full := append([]string{"serve", "--addr", "127.0.0.1:0", "--data-dir", t.TempDir(), "--log-level", "error"}, args...)
	go func() {
		err := run(ctx, full, func(string) string { return "" }, pw, io.Discard)
		pw.Close()
		done <- err
	}()
	re := regexp.MustCompile(`listening on (http://\S+)`)
	sc := bufio.NewScanner(pr)
	var url string
	for sc.Scan() {
		if m := re.FindStringSubmatch(sc.Text()); m != nil {
			url = m[1]
			break
		}
	}
	go io.Copy(io.Discard, pr)
	if url == "" {
		cancel()
		t.Fatalf("serve did not start: %v", <-done)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get(url + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Now().After(deadline) {
			cancel()
			t.Fatalf("serve not ready")
		}
		time.Sleep(10 * time.Millisecond) // polling readiness
	}
	var once sync.Once
	var err error
	stop := func() error {
		once.Do(func() {
			cancel()
			err = <-done
		})
		return err
	}
	t.Cleanup(func() { stop() })
	return url, stop
}

// TestStress runs 50 connections on 20 conversations with overlapping turns
// and one connection flooding pings: every frame is one valid JSON object,
// every turn is delivered whole to every joined connection, and after
// shutdown no goroutine is left.
func TestStress(t *testing.T) {
	defer goleak.VerifyNone(t,
		goleak.IgnoreCurrent(),
		// http.Transport keeps idle connections to the (stopped) server.
		goleak.IgnoreTopFunction("net/http.(*persistConn).writeLoop"),
		goleak.IgnoreTopFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
	)
	url, stop := startRun(t, "--sim-rate", "500", "--sim-tokens", "40",
		"--limit-sends", "0", "--limit-connections", "0", "--limit-turns", "0")
	wsURL := "ws" + url[len("http"):] + "/v1/ws"
	const conns, convs, turnsPerConv = 50, 20, 3
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	type tally struct {
		mu   sync.Mutex
		ends map[string]map[string]int // conversation → turn → ends seen (summed over conns)
	}
	tl := tally{ends: map[string]map[string]int{}}
	errs := make(chan error, conns+convs+1)
	var readers, senders sync.WaitGroup
	sockets := make([]*websocket.Conn, conns)
	for i := range conns {
		ws, _, err := websocket.Dial(ctx, wsURL, nil)
		if err != nil {
			t.Fatal(err)
		}
		ws.SetReadLimit(-1)
		sockets[i] = ws
		conv := fmt.Sprintf("stress-%d", i%convs)
		if err := ws.Write(ctx, websocket.MessageText, []byte(`{"type":"join","conversation_id":"`+conv+`"}`)); err != nil {
			t.Fatal(err)
		}
		readers.Add(1)
		go func() {
			defer readers.Done()
			seqs := map[string]int64{}
			for {
				_, data, err := ws.Read(ctx)
				if err != nil {
					return
				}
				var f map[string]any
				if err := json.Unmarshal(data, &f); err != nil {
					errs <- fmt.Errorf("invalid frame %q", data)
					return
				}
				switch f["type"] {
				case "turn.delta":
					turn := f["turn_id"].(string)
					from := f["seq"].(float64)
					if v, ok := f["from"]; ok {
						from = v.(float64)
					}
					if int64(from) != seqs[turn]+1 {
						errs <- fmt.Errorf("%s: delta from %v after %d", turn, from, seqs[turn])
						return
					}
					seqs[turn] = int64(f["seq"].(float64))
				case "turn.end":
					tl.mu.Lock()
					m := tl.ends[conv]
					if m == nil {
						m = map[string]int{}
						tl.ends[conv] = m
					}
					m[f["turn_id"].(string)]++
					tl.mu.Unlock()
				case "error":
					errs <- fmt.Errorf("error frame %s", data)
				}
			}
		}()
	}
	// Wait for every join to be answered before sending: count joined via a ping round trip.
	for _, ws := range sockets {
		if err := ws.Ping(ctx); err != nil {
			t.Fatal(err)
		}
	}
	// One extra connection floods pings.
	flood, _, err := websocket.Dial(ctx, wsURL, nil)
	if err != nil {
		t.Fatal(err)
	}
	floodDone := make(chan struct{})
	go func() {
		defer close(floodDone)
		go func() {
			for {
				if _, _, err := flood.Read(ctx); err != nil {
					return
				}
			}
		}()
		for i := 0; i < 20000; i++ {
			if err := flood.Write(ctx, websocket.MessageText, []byte(`{"type":"ping"}`)); err != nil {
				return
			}
		}
	}()
	// Senders: the first connection of each conversation sends turns one
	// after another, overlapping across conversations.
	for c := range convs {
		senders.Add(1)
		go func() {
			defer senders.Done()
			conv := fmt.Sprintf("stress-%d", c)
			for k := range turnsPerConv {
				body := fmt.Sprintf(`{"text":"turn %d of %s"}`, k, conv)
				for {
					req, _ := http.NewRequestWithContext(ctx, "POST", url+"/v1/conversations/"+conv+"/messages", stringsReader(body))
					resp, err := http.DefaultClient.Do(req)
					if err != nil {
						errs <- err
						return
					}
					resp.Body.Close()
					if resp.StatusCode == 202 {
						break
					}
					if resp.StatusCode != 409 {
						errs <- fmt.Errorf("send: %d", resp.StatusCode)
						return
					}
					time.Sleep(5 * time.Millisecond) // the previous turn is still running: retry
				}
			}
		}()
	}
	senders.Wait()
	<-floodDone
	// Every connection must see every turn's end once.
	want := conns / convs
	deadline := time.Now().Add(time.Minute)
	for {
		tl.mu.Lock()
		complete := len(tl.ends) == convs
		for _, m := range tl.ends {
			if len(m) != turnsPerConv {
				complete = false
			}
			for turn, n := range m {
				if n > want+(map[bool]int{true: 1}[true]) || n > (conns+convs-1)/convs+1 {
					errs <- fmt.Errorf("turn %s ended %d times", turn, n)
				}
				if n < want {
					complete = false
				}
			}
		}
		tl.mu.Unlock()
		if complete || time.Now().After(deadline) {
			if !complete {
				t.Errorf("not every connection saw every turn end: %v", tl.ends)
			}
			break
		}
		time.Sleep(20 * time.Millisecond) // polling the readers' tallies
	}
	if err := stop(); err != nil {
		t.Errorf("serve returned %v", err)
	}
	readers.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for _, ws := range sockets {
		ws.CloseNow()
	}
	flood.CloseNow()
	http.DefaultClient.CloseIdleConnections()
}

// A version set at build time is printed as set; a dev build's names the
// commit when Go recorded one (go build -buildvcs), and is "dev" otherwise.
func TestBuildVersion(t *testing.T) {
	if got := buildVersion("1.4.0"); got != "1.4.0" {
		t.Fatalf("buildVersion(1.4.0) = %q", got)
	}
	if got := buildVersion("dev"); got != "dev" && !strings.HasPrefix(got, "dev+") {
		t.Fatalf("buildVersion(dev) = %q", got)
	}
}
