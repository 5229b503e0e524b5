package gateway

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenrelay/tokenrelay/internal/promreg"
)

type metrics struct {
	connections       prometheus.Gauge
	connectsTotal     prometheus.Counter
	joins             *prometheus.CounterVec
	resumes           *prometheus.CounterVec
	sends             prometheus.Counter
	framesSent        prometheus.Counter
	bytesSent         prometheus.Counter
	writeErrors       prometheus.Counter
	mergedFrames      prometheus.Counter
	slowCloses        prometheus.Counter
	gapsRepaired      prometheus.Counter
	duplicatesDropped prometheus.Counter
	badFrames         prometheus.Counter
	cancels           *prometheus.CounterVec
	cancelLatency     prometheus.Histogram
	authFailures      *prometheus.CounterVec
	limitHits         *prometheus.CounterVec
	sseStreams        prometheus.Gauge
	resyncs           *prometheus.CounterVec
	quietChecks       prometheus.Counter
	turns             *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		connections:   prometheus.NewGauge(prometheus.GaugeOpts{Name: "tokenrelay_connections", Help: "Open WebSocket connections."}),
		connectsTotal: prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenrelay_connections_total", Help: "WebSocket connections accepted."}),
		joins: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenrelay_joins_total",
			Help: "Joins, by kind: fresh (snapshot) or after (resume from a seq)."}, []string{"kind"}),
		resumes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenrelay_resumes_total",
			Help: "Joins with after, by outcome: active (the turn still streams) or ended (the rest and its end were sent)."}, []string{"outcome"}),
		sends:        prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenrelay_sends_total", Help: "User messages accepted (turns created)."}),
		framesSent:   prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenrelay_frames_sent_total", Help: "WebSocket frames written."}),
		bytesSent:    prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenrelay_bytes_sent_total", Help: "WebSocket payload bytes written."}),
		writeErrors:  prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenrelay_write_errors_total", Help: "Socket and SSE stream writes that failed."}),
		mergedFrames: prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenrelay_merged_deltas_total", Help: "Deltas merged into an earlier queued frame of a slow connection."}),
		slowCloses:   prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenrelay_slow_consumer_closes_total", Help: "Connections and SSE streams closed as slow consumers: with 4008 (or past --limit-outbound-bytes), or when a write was blocked for --write-timeout."}),
		gapsRepaired: prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenrelay_gap_repairs_total", Help: "Gaps in a connection's live events repaired from JetStream."}),
		duplicatesDropped: prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenrelay_duplicate_deltas_dropped_total",
			Help: "Live deltas dropped because the connection already had them."}),
		badFrames: prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenrelay_bad_frames_total", Help: "Client frames rejected as bad_request."}),
		cancels: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenrelay_cancel_requests_total",
			Help: "Cancel requests, by outcome."}, []string{"outcome"}),
		cancelLatency: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "tokenrelay_cancel_to_end_seconds",
			Help: "From a cancel request to the turn's end reaching the gateway.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)}),
		authFailures: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenrelay_auth_failures_total",
			Help: "Rejected authentications, by reason."}, []string{"reason"}),
		limitHits: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenrelay_limit_hits_total",
			Help: "Requests refused by a limit, by limit."}, []string{"limit"}),
		sseStreams: prometheus.NewGauge(prometheus.GaugeOpts{Name: "tokenrelay_sse_streams", Help: "Open SSE streams."}),
		resyncs: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenrelay_resyncs_total",
			Help: "Conversations whose views read their open turns again after live events may have been lost, by reason: reconnect (the bus connection was down) or slow_consumer (the bus dropped messages)."}, []string{"reason"}),
		quietChecks: prometheus.NewCounter(prometheus.CounterOpts{Name: "tokenrelay_quiet_turn_checks_total",
			Help: "Open turns read again from the stream because no event of theirs came for --quiet-check."}),
		turns: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenrelay_turns_total",
			Help: "Turns ended, by terminal status."}, []string{"status"}),
	}
	if reg != nil {
		reg.MustRegister(m.connections, m.connectsTotal, m.joins, m.resumes, m.sends, m.framesSent, m.bytesSent, m.writeErrors,
			m.mergedFrames, m.slowCloses, m.gapsRepaired, m.duplicatesDropped, m.badFrames, m.cancels, m.cancelLatency,
			m.authFailures, m.limitHits, m.sseStreams, m.resyncs, m.quietChecks)
		m.turns = promreg.Shared(reg, m.turns)
	}
	return m
}
