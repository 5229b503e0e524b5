package trtest

import (
	"bufio"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Metric returns the value of the sample name{labels} (labels as written
// in the exposition, e.g. `limit="sends"`; "" for none) at base/metrics, or
// 0 when there is none.
func Metric(t testing.TB, base, name, labels string) float64 {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	want := name
	if labels != "" {
		want += "{" + labels + "}"
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), want+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("metric %s: %v", want, err)
			}
			return f
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("read /metrics: %v", err)
	}
	return 0
}

// WaitMetric polls the sample name{labels} at base/metrics until ok holds
// for its value and returns that value; it fails the test after timeout.
func WaitMetric(t testing.TB, base, name, labels string, timeout time.Duration, ok func(float64) bool) float64 {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		v := Metric(t, base, name, labels)
		if ok(v) {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s{%s} is still %v after %v", name, labels, v, timeout)
		}
		time.Sleep(20 * time.Millisecond) // polling a metric, not synchronising
	}
}
