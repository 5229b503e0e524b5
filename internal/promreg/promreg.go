// Package promreg holds what the gateway's and the worker's Prometheus
// metrics share when both run in one process (serve) on one registry.
package promreg

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// Shared registers vec with reg, or returns the identical collector that is
// registered already: serve's gateway and worker both count the turns they
// end (the gateway those no worker started: a cancel of a queued turn, a
// job the broker refused) under one tokenrelay_turns_total. A collector of
// the same name that differs from vec panics, as reg.MustRegister does.
func Shared(reg prometheus.Registerer, vec *prometheus.CounterVec) *prometheus.CounterVec {
	var are prometheus.AlreadyRegisteredError
	err := reg.Register(vec)
	if errors.As(err, &are) {
		if existing, ok := are.ExistingCollector.(*prometheus.CounterVec); ok {
			return existing
		}
	}
	if err != nil {
		panic(err)
	}
	return vec
}
