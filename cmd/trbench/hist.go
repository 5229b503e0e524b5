package main

import (
	"math"
	"math/bits"
	"sync/atomic"
)

// Histogram records non-negative integer samples (microseconds here) in
// log-linear buckets: values below 2·subBuckets are exact, larger ones fall
// in buckets whose width is at most 1/subBuckets of their lower bound, so a
// quantile is within 0.8% of the true sample. Record is safe for
// concurrent use and takes no lock (one atomic add per sample); the other
// methods read a consistent enough view once writers are quiet.
type Histogram struct {
	counts [numBuckets]atomic.Uint64
	n      atomic.Uint64
	sum    atomic.Uint64
	max    atomic.Uint64
}

const (
	subBits    = 7
	subBuckets = 1 << subBits // 128 → ≤ 0.78% relative bucket width
	// maxShift bounds the range at 2^(subBits+1+maxShift) ≈ 2^44 µs
	// (about 200 days); larger samples land in the last bucket.
	maxShift   = 36
	numBuckets = 2*subBuckets + maxShift*subBuckets
)

// bucketOf returns the bucket index of v.
func bucketOf(v uint64) int {
	if v < 2*subBuckets {
		return int(v)
	}
	shift := bits.Len64(v) - (subBits + 1) // ≥ 1
	if shift > maxShift {
		return numBuckets - 1
	}
	return 2*subBuckets + (shift-1)*subBuckets + int(v>>uint(shift)) - subBuckets
}

// bucketRange returns the smallest and largest value of bucket i.
func bucketRange(i int) (lo, hi uint64) {
	if i < 2*subBuckets {
		return uint64(i), uint64(i)
	}
	j := i - 2*subBuckets
	shift := uint(j/subBuckets + 1)
	m := uint64(j%subBuckets + subBuckets)
	lo = m << shift
	return lo, lo + (1 << shift) - 1
}

// Record adds one sample; negative samples count as 0 (a clock step).
func (h *Histogram) Record(v int64) {
	if v < 0 {
		v = 0
	}
	u := uint64(v)
	h.counts[bucketOf(u)].Add(1)
	h.n.Add(1)
	h.sum.Add(u)
	for {
		m := h.max.Load()
		if u <= m || h.max.CompareAndSwap(m, u) {
			break
		}
	}
}

// Count is the number of samples.
func (h *Histogram) Count() uint64 { return h.n.Load() }

// Max is the largest sample, exactly.
func (h *Histogram) Max() uint64 { return h.max.Load() }

// Mean is the average sample, exactly; 0 without samples.
func (h *Histogram) Mean() float64 {
	n := h.n.Load()
	if n == 0 {
		return 0
	}
	return float64(h.sum.Load()) / float64(n)
}

// Quantile returns the sample at quantile q (0..1): the upper bound of the
// bucket holding the ⌈q·n⌉-th smallest sample, capped by Max, so it never
// understates. It returns 0 without samples.
func (h *Histogram) Quantile(q float64) uint64 {
	n := h.n.Load()
	if n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(n)))
	if rank < 1 {
		rank = 1
	}
	if rank > n {
		rank = n
	}
	var seen uint64
	for i := range h.counts {
		seen += h.counts[i].Load()
		if seen >= rank {
			_, hi := bucketRange(i)
			return min(hi, h.max.Load())
		}
	}
	return h.max.Load()
}

// Merge adds o's samples to h.
func (h *Histogram) Merge(o *Histogram) {
	for i := range o.counts {
		if c := o.counts[i].Load(); c > 0 {
			h.counts[i].Add(c)
		}
	}
	h.n.Add(o.n.Load())
	h.sum.Add(o.sum.Load())
	if m := o.max.Load(); m > h.max.Load() {
		h.max.Store(m)
	}
}

// Summary is a histogram's figures in milliseconds, for reports.
type Summary struct {
	Count uint64  `json:"count"`
	Mean  float64 `json:"mean_ms"`
	P50   float64 `json:"p50_ms"`
	P90   float64 `json:"p90_ms"`
	P99   float64 `json:"p99_ms"`
	P999  float64 `json:"p999_ms"`
	Max   float64 `json:"max_ms"`
}

// Summarize reads h, whose samples are microseconds.
func (h *Histogram) Summarize() Summary {
	ms := func(us uint64) float64 { return float64(us) / 1000 }
	return Summary{
		Count: h.Count(), Mean: h.Mean() / 1000,
		P50: ms(h.Quantile(0.50)), P90: ms(h.Quantile(0.90)), P99: ms(h.Quantile(0.99)),
		P999: ms(h.Quantile(0.999)), Max: ms(h.Max()),
	}
}
