// Package redistrace turns on go-redis's own OpenTelemetry instrumentation
// (redisotel) for a client, configured the way a cache needs it: command
// spans and connection-pool metrics, but never a command's arguments. By
// default redisotel records every command in full as db.statement, values
// included (a cached JSON document with whatever it holds); Instrument turns
// that off, and the caller's source location too.
//
// It lives apart from package metrics so that the core packages do not
// depend on redisotel; call it once per client, before use.
package redistrace

import (
	"fmt"

	"github.com/redis/go-redis/extra/redisotel/v9"
	"github.com/redis/go-redis/v9"

	"github.com/tiercache/tiercache/metrics"
)

// Instrument adds command spans (without arguments) and pool metrics to
// rdb, reporting to p (nil fields: the global providers).
func Instrument(rdb redis.UniversalClient, p metrics.Providers) error {
	topts := []redisotel.TracingOption{redisotel.WithDBStatement(false), redisotel.WithCallerEnabled(false)}
	if p.Tracer != nil {
		topts = append(topts, redisotel.WithTracerProvider(p.Tracer))
	}
	if err := redisotel.InstrumentTracing(rdb, topts...); err != nil {
		return fmt.Errorf("redistrace: tracing: %w", err)
	}
	var mopts []redisotel.MetricsOption
	if p.Meter != nil {
		mopts = append(mopts, redisotel.WithMeterProvider(p.Meter))
	}
	if err := redisotel.InstrumentMetrics(rdb, mopts...); err != nil {
		return fmt.Errorf("redistrace: metrics: %w", err)
	}
	return nil
}
