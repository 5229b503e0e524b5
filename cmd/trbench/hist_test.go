package main

import (
	"math"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
)

func TestBucketRoundTrip(t *testing.T) {
	tests := []struct {
		name string
		v    uint64
	}{
		{"zero", 0}, {"exact range", 200}, {"last exact", 2*subBuckets - 1},
		{"first log bucket", 2 * subBuckets}, {"odd", 257}, {"ms", 1000}, {"s", 1_000_000},
		{"hour", 3_600_000_000}, {"top", 1<<44 - 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			i := bucketOf(tt.v)
			lo, hi := bucketRange(i)
			if tt.v < lo || tt.v > hi {
				t.Fatalf("bucketOf(%d) = %d holding [%d, %d]", tt.v, i, lo, hi)
			}
			if w := float64(hi-lo+1) / float64(max(lo, 1)); lo >= 2*subBuckets && w > 1.0/subBuckets+1e-12 {
				t.Fatalf("bucket [%d, %d] is %.4f wide, more than 1/%d", lo, hi, w, subBuckets)
			}
		})
	}
}

func TestBucketsContiguous(t *testing.T) {
	var next uint64
	for i := range numBuckets {
		lo, hi := bucketRange(i)
		if lo != next {
			t.Fatalf("bucket %d starts at %d, want %d", i, lo, next)
		}
		if bucketOf(lo) != i || bucketOf(hi) != i {
			t.Fatalf("bucket %d [%d, %d] does not map back", i, lo, hi)
		}
		next = hi + 1
	}
}

func TestQuantile(t *testing.T) {
	tests := []struct {
		name    string
		samples []int64
		q       float64
		want    uint64 // exact for small values
	}{
		{"empty", nil, 0.5, 0},
		{"one", []int64{42}, 0.99, 42},
		{"median of 1..100", seq(1, 100), 0.5, 50},
		{"p99 of 1..100", seq(1, 100), 0.99, 99},
		{"p100 of 1..100", seq(1, 100), 1, 100},
		{"p0 is the smallest", seq(5, 9), 0, 5},
		{"negative counts as zero", []int64{-5, 1, 2}, 0, 0},
		{"outlier is the max", append(seq(1, 99), 100000), 1, 100000},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var h Histogram
			for _, s := range tt.samples {
				h.Record(s)
			}
			if got := h.Quantile(tt.q); got != tt.want {
				t.Fatalf("Quantile(%v) = %d, want %d", tt.q, got, tt.want)
			}
		})
	}
}

// TestQuantilePrecision compares with sorted samples over a wide range:
// the histogram never understates and overstates by less than 1%.
func TestQuantilePrecision(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var h Histogram
	var all []int64
	for range 100000 {
		v := int64(math.Exp(rng.Float64() * 18)) // 1 µs .. ~65 s, log-uniform
		h.Record(v)
		all = append(all, v)
	}
	slices.Sort(all)
	for _, q := range []float64{0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 1} {
		exact := all[int(math.Ceil(q*float64(len(all))))-1]
		got := h.Quantile(q)
		if got < uint64(exact) || float64(got) > float64(exact)*1.01+1 {
			t.Errorf("q=%v: got %d, exact %d", q, got, exact)
		}
	}
	if h.Max() != uint64(all[len(all)-1]) {
		t.Errorf("Max = %d, want %d", h.Max(), all[len(all)-1])
	}
	var sum float64
	for _, v := range all {
		sum += float64(v)
	}
	if m := h.Mean(); math.Abs(m-sum/float64(len(all))) > 1e-6*m {
		t.Errorf("Mean = %v, want %v", m, sum/float64(len(all)))
	}
}

func TestMergeAndConcurrentRecord(t *testing.T) {
	var shards [4]Histogram
	var wg sync.WaitGroup
	for i := range shards {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for v := range int64(1000) {
				shards[i].Record(v + int64(i)*1000)
			}
		}()
	}
	wg.Wait()
	var h Histogram
	for i := range shards {
		h.Merge(&shards[i])
	}
	if h.Count() != 4000 || h.Max() != 3999 {
		t.Fatalf("count %d max %d, want 4000 3999", h.Count(), h.Max())
	}
	if got := h.Quantile(0.5); got < 1999 || got > 2020 {
		t.Fatalf("median %d, want about 1999", got)
	}
	s := h.Summarize()
	if s.Max != 3.999 || s.Count != 4000 {
		t.Fatalf("summary %+v", s)
	}
}

func seq(a, b int64) []int64 {
	var out []int64
	for v := a; v <= b; v++ {
		out = append(out, v)
	}
	return out
}
