package worker

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenrelay/tokenrelay/internal/promreg"
)

type metrics struct {
	turns        *prometheus.CounterVec
	running      prometheus.Gauge
	providerReqs prometheus.Counter
	duration     prometheus.Histogram
	firstDelta   prometheus.Histogram
	deltas       prometheus.Counter
	cancelToEnd  prometheus.Histogram
	snapFails    prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		turns: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tokenrelay_turns_total", Help: "Turns ended, by terminal status.",
		}, []string{"status"}),
		running: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "tokenrelay_turns_running", Help: "Turns this worker is producing now.",
		}),
		providerReqs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tokenrelay_provider_requests_total", Help: "Requests made to the model provider.",
		}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "tokenrelay_turn_duration_seconds", Help: "From a turn's start to its end.",
			Buckets: prometheus.ExponentialBuckets(0.05, 2, 14),
		}),
		firstDelta: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "tokenrelay_turn_first_delta_seconds", Help: "From a turn's creation to its first delta.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 16),
		}),
		deltas: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tokenrelay_deltas_published_total", Help: "Deltas published by this worker.",
		}),
		cancelToEnd: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "tokenrelay_worker_cancel_to_end_seconds", Help: "From the worker seeing a cancel to the turn's end, stored in the chat store, going live.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}),
		snapFails: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "tokenrelay_snapshot_write_failures_total", Help: "Snapshots of streaming turns that could not be written (retried at the next one).",
		}),
	}
	if reg != nil {
		m.turns = promreg.Shared(reg, m.turns)
		reg.MustRegister(m.running, m.providerReqs, m.duration, m.firstDelta, m.deltas, m.cancelToEnd, m.snapFails)
	}
	return m
}
