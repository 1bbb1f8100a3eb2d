// Package metrics holds every OpenTelemetry instrument and span of
// tiercache in one place: names, units, attributes. Caches and Buses create
// their telemetry here when they start; nothing here is called on an L1 hit.
//
// Counters that move on hot paths are the caches' and Buses' own atomics,
// exported through observable instruments whose callbacks read a snapshot
// at collection time. Synchronous instruments (histograms) and spans are
// used only around Redis round trips, loads and publishes, always with
// precomputed attribute sets. Attributes are small enums (namespace, tier,
// result, operation); never a cache key or a value.
//
// Every method is nil-safe: a nil *Cache or *Bus records nothing. With no
// SDK installed, the global providers are no-ops and the cost is a few
// nanoseconds per slow-path operation.
package metrics

import (
	"context"
	"errors"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"
)

// Scope is the instrumentation scope of every meter and tracer.
const Scope = "github.com/tiercache/tiercache"

// Attribute keys. Values are small enums, never keys or values.
const (
	KeyNamespace = attribute.Key("tiercache.namespace")
	KeyTier      = attribute.Key("tiercache.tier")      // l1, l2, loader
	KeyResult    = attribute.Key("tiercache.result")    // hit, miss, stale, error, ok, not_found, panic, applied, own, ignored, malformed, rejected
	KeyOperation = attribute.Key("tiercache.operation") // get, set, delete, get_many, ...
	KeyKeys      = attribute.Key("tiercache.keys")      // how many keys a batch span covers (a count)
	KeyBus       = attribute.Key("tiercache.bus")       // the Bus's name (invalidate.Options.Name): one per Bus in the process
	keyDBSystem  = attribute.Key("db.system.name")
	keyDBOp      = attribute.Key("db.operation.name")
)

// Operations, the values of KeyOperation.
const (
	OpGet           = "get"
	OpGetMany       = "get_many"
	OpExists        = "exists"
	OpSet           = "set"
	OpSetMany       = "set_many"
	OpDelete        = "delete"
	OpDeleteMany    = "delete_many"
	OpClear         = "clear"
	OpDeletePattern = "delete_pattern"
	OpRemember      = "remember"
	OpRememberMany  = "remember_many"
	OpFill          = "fill"
	OpLease         = "lease"
	OpReplay        = "replay"
)

// Providers chooses where telemetry goes. Nil fields mean the global
// providers (otel.GetMeterProvider, otel.GetTracerProvider), read once
// when a cache or Bus is created; a global installed later still receives
// it, through the global's delegation.
type Providers struct {
	Meter  metric.MeterProvider
	Tracer trace.TracerProvider
}

func (p Providers) meter() metric.Meter {
	mp := p.Meter
	if mp == nil {
		mp = otel.GetMeterProvider()
	}
	return mp.Meter(Scope)
}

func (p Providers) tracer() trace.Tracer {
	tp := p.Tracer
	if tp == nil {
		tp = otel.GetTracerProvider()
	}
	return tp.Tracer(Scope)
}

// CacheSnapshot is what a cache's observable instruments report; the cache
// fills it from its counters at collection time.
type CacheSnapshot struct {
	L1Hits, L1Misses            uint64
	L2Hits, L2Misses, L2Errors  uint64 // reads, per key; L2Errors: reads Redis failed or the circuit refused
	LoaderHits, LoaderNotFound  uint64
	LoaderErrors                uint64
	StaleServed                 uint64
	FailSafe                    uint64 // failed refreshes that kept a stale value
	DegradedLoads               uint64 // loader answers because Redis could not
	Refused                     uint64 // Redis calls refused by the open circuit
	Joined                      uint64 // callers that joined another's read or load
	Published                   uint64 // invalidation messages published with writes
	L1Keys, L1Cost, L1Evictions uint64
	L1Flushes                   uint64 // whole-namespace voids (Clear, flush, mode switch)
}

// Cache is the telemetry of one cache (namespace).
type Cache struct {
	tracer trace.Tracer
	ns     attribute.KeyValue
	opDur  metric.Float64Histogram
	ldDur  metric.Float64Histogram
	reg    metric.Registration
	// Precomputed attribute sets, per operation and outcome, as the
	// one-element option lists Record takes (a list built per call would be
	// allocated).
	opSets map[string][2][]metric.RecordOption
	ldSets map[string][]metric.RecordOption
}

// durationBuckets suit cache operations: 50 µs to 10 s.
var durationBuckets = []float64{0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}

// NewCache creates the instruments of the cache of namespace ns. snap is
// called at each collection and must be cheap and safe for concurrent use.
// Close unregisters the callbacks.
func NewCache(p Providers, ns string, snap func() CacheSnapshot) (*Cache, error) {
	m := p.meter()
	t := &Cache{tracer: p.tracer(), ns: KeyNamespace.String(ns)}
	var errs []error
	add := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	var err error
	t.opDur, err = m.Float64Histogram("tiercache.operation.duration", metric.WithUnit("s"),
		metric.WithDescription("Duration of cache operations that left L1 (L1 hits are counted in tiercache.requests, not timed)."),
		metric.WithExplicitBucketBoundaries(durationBuckets...))
	add(err)
	t.ldDur, err = m.Float64Histogram("tiercache.loader.duration", metric.WithUnit("s"),
		metric.WithDescription("Duration of loader calls (Remember's source of truth), by result."),
		metric.WithExplicitBucketBoundaries(durationBuckets...))
	add(err)

	t.opSets = make(map[string][2][]metric.RecordOption)
	for _, op := range []string{OpGet, OpGetMany, OpExists, OpSet, OpSetMany, OpDelete, OpDeleteMany, OpClear, OpDeletePattern, OpRemember, OpRememberMany} {
		t.opSets[op] = [2][]metric.RecordOption{
			{metric.WithAttributeSet(attribute.NewSet(t.ns, KeyOperation.String(op), KeyResult.String("ok")))},
			{metric.WithAttributeSet(attribute.NewSet(t.ns, KeyOperation.String(op), KeyResult.String("error")))},
		}
	}
	t.ldSets = make(map[string][]metric.RecordOption)
	for _, r := range []string{"ok", "not_found", "error", "panic"} {
		t.ldSets[r] = []metric.RecordOption{metric.WithAttributeSet(attribute.NewSet(t.ns, KeyResult.String(r)))}
	}

	requests, err := m.Int64ObservableCounter("tiercache.requests", metric.WithUnit("{request}"),
		metric.WithDescription("Reads answered or not by each tier: l1 hit/miss, l2 hit/miss/error, loader hit/miss (not found)/error."))
	add(err)
	stale, err := m.Int64ObservableCounter("tiercache.stale.served", metric.WithUnit("{request}"),
		metric.WithDescription("Remember answers past their fresh period (FreshFor), refreshed meanwhile."))
	add(err)
	failSafe, err := m.Int64ObservableCounter("tiercache.failsafe.activations", metric.WithUnit("{refresh}"),
		metric.WithDescription("Failed refreshes after which the stale value kept being served."))
	add(err)
	degraded, err := m.Int64ObservableCounter("tiercache.degraded.loads", metric.WithUnit("{load}"),
		metric.WithDescription("Loader answers given because Redis could not answer (fallback use)."))
	add(err)
	refused, err := m.Int64ObservableCounter("tiercache.circuit.refused", metric.WithUnit("{call}"),
		metric.WithDescription("Redis calls refused at once because the circuit was open."))
	add(err)
	joined, err := m.Int64ObservableCounter("tiercache.singleflight.joined", metric.WithUnit("{call}"),
		metric.WithDescription("Callers that joined a read or load already in flight for the same key instead of starting their own."))
	add(err)
	published, err := m.Int64ObservableCounter("tiercache.invalidations.published", metric.WithUnit("{message}"),
		metric.WithDescription("Invalidation messages published with writes (one per batch of up to 1,000 keys)."))
	add(err)
	keys, err := m.Int64ObservableGauge("tiercache.l1.keys", metric.WithUnit("{entry}"),
		metric.WithDescription("Entries held in L1."))
	add(err)
	cost, err := m.Int64ObservableGauge("tiercache.l1.cost", metric.WithUnit("By"),
		metric.WithDescription("Approximate bytes held in L1 (encoded size, key and per-entry overhead)."))
	add(err)
	evictions, err := m.Int64ObservableCounter("tiercache.l1.evictions", metric.WithUnit("{entry}"),
		metric.WithDescription("L1 entries evicted to make room."))
	add(err)
	flushes, err := m.Int64ObservableCounter("tiercache.l1.flushes", metric.WithUnit("{flush}"),
		metric.WithDescription("Times the namespace's whole L1 was voided (Clear, a received flush, a mode switch)."))
	add(err)
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}

	set := func(kvs ...attribute.KeyValue) metric.ObserveOption {
		return metric.WithAttributeSet(attribute.NewSet(append([]attribute.KeyValue{t.ns}, kvs...)...))
	}
	tr := func(tier, result string) metric.ObserveOption {
		return set(KeyTier.String(tier), KeyResult.String(result))
	}
	l1Hit, l1Miss := tr("l1", "hit"), tr("l1", "miss")
	l2Hit, l2Miss, l2Err := tr("l2", "hit"), tr("l2", "miss"), tr("l2", "error")
	ldHit, ldMiss, ldErr := tr("loader", "hit"), tr("loader", "miss"), tr("loader", "error")
	plain := set()
	t.reg, err = m.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		s := snap()
		o.ObserveInt64(requests, i64(s.L1Hits), l1Hit)
		o.ObserveInt64(requests, i64(s.L1Misses), l1Miss)
		o.ObserveInt64(requests, i64(s.L2Hits), l2Hit)
		o.ObserveInt64(requests, i64(s.L2Misses), l2Miss)
		o.ObserveInt64(requests, i64(s.L2Errors), l2Err)
		o.ObserveInt64(requests, i64(s.LoaderHits), ldHit)
		o.ObserveInt64(requests, i64(s.LoaderNotFound), ldMiss)
		o.ObserveInt64(requests, i64(s.LoaderErrors), ldErr)
		o.ObserveInt64(stale, i64(s.StaleServed), plain)
		o.ObserveInt64(failSafe, i64(s.FailSafe), plain)
		o.ObserveInt64(degraded, i64(s.DegradedLoads), plain)
		o.ObserveInt64(refused, i64(s.Refused), plain)
		o.ObserveInt64(joined, i64(s.Joined), plain)
		o.ObserveInt64(published, i64(s.Published), plain)
		o.ObserveInt64(keys, i64(s.L1Keys), plain)
		o.ObserveInt64(cost, i64(s.L1Cost), plain)
		o.ObserveInt64(evictions, i64(s.L1Evictions), plain)
		o.ObserveInt64(flushes, i64(s.L1Flushes), plain)
		return nil
	}, requests, stale, failSafe, degraded, refused, joined, published, keys, cost, evictions, flushes)
	if err != nil {
		return nil, err
	}
	return t, nil
}

func i64(u uint64) int64 { return int64(min(u, 1<<63-1)) }

// Close unregisters the cache's callbacks; its instruments stop reporting.
func (t *Cache) Close() {
	if t != nil && t.reg != nil {
		_ = t.reg.Unregister()
	}
}

// Op records the duration of an operation that left L1, from start.
func (t *Cache) Op(ctx context.Context, op string, start time.Time, err error) {
	if t == nil {
		return
	}
	sets, ok := t.opSets[op]
	if !ok {
		return
	}
	i := 0
	if err != nil {
		i = 1
	}
	t.opDur.Record(ctx, time.Since(start).Seconds(), sets[i]...)
}

// Load records a loader call of result "ok", "not_found", "error" or
// "panic".
func (t *Cache) Load(ctx context.Context, start time.Time, result string) {
	if t == nil {
		return
	}
	if set, ok := t.ldSets[result]; ok {
		t.ldDur.Record(ctx, time.Since(start).Seconds(), set...)
	}
}

// Span starts a span around a Redis round trip (dbOp is its Redis command
// or "PIPELINE"/"MULTI"/"EVALSHA"), or around a load or lease when dbOp is
// empty. keys is how many keys it covers. End it with [End].
//
// The attributes are set after the start, and only on a recording span: a
// span nobody records (no SDK installed, or sampled out) then costs no
// attribute slice and no option: 5 of the 42 allocations of an L2 read. The
// price is that a sampler does not see them at the start.
func (t *Cache) Span(ctx context.Context, name, dbOp string, keys int) (context.Context, trace.Span) {
	if t == nil {
		return ctx, trace.SpanFromContext(ctx)
	}
	kind := internalSpan
	if dbOp != "" {
		kind = clientSpan
	}
	ctx, span := t.tracer.Start(ctx, name, kind...)
	if span.IsRecording() {
		if dbOp != "" {
			span.SetAttributes(t.ns, KeyKeys.Int(keys), keyDBSystem.String("redis"), keyDBOp.String(dbOp))
		} else {
			span.SetAttributes(t.ns, KeyKeys.Int(keys))
		}
	}
	return ctx, span
}

// The span kinds, as ready-made option lists (a literal list would be
// allocated on every call).
var (
	internalSpan = []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindInternal)}
	clientSpan   = []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindClient)}
)

// End ends a span from [Cache.Span], marking it failed when err is not nil.
// The error's text is recorded as the status description (errors of this
// library name keys only as %q in messages of their own, which End
// replaces by the error's type, so neither keys nor values reach a span).
func End(span trace.Span, err error) {
	if err != nil && span.IsRecording() {
		span.SetStatus(codes.Error, errorType(err))
		span.SetAttributes(attribute.String("error.type", errorType(err)))
	}
	span.End()
}

// errorType is a low-cardinality description of err: the sentinel it
// wraps, or a timeout, or "other".
func errorType(err error) string {
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, context.Canceled):
		return "canceled"
	}
	for e := err; e != nil; e = errors.Unwrap(e) {
		if s, ok := e.(interface{ ErrorType() string }); ok {
			return s.ErrorType()
		}
	}
	return "error"
}

// BusSnapshot is what a Bus's observable instruments report.
type BusSnapshot struct {
	Live                                       bool
	SinceHeard                                 time.Duration // since anything was last heard on the subscription
	Reconnects, Resets                         uint64
	Received                                   uint64
	Applied, Own, Ignored, Malformed, Rejected uint64
	CircuitOpen                                bool
	CircuitOpens                               uint64
	OutboxDepth                                int
	Deferred, Replayed, Overflows, Dropped     uint64
	HeartbeatTimeout                           time.Duration
}

// Bus is the telemetry of one invalidate.Bus.
type Bus struct {
	tracer trace.Tracer
	lag    metric.Float64Histogram
	lagSet []metric.RecordOption // the Bus's attribute, built once
	reg    metric.Registration
}

// lagBuckets suit pub/sub delivery: 10 µs to 5 s.
var lagBuckets = []float64{0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5}

// NewBus creates a Bus's instruments. snap is called at each collection.
// Every series carries the Bus's name (KeyBus), so that two Buses of one
// process (one per Redis deployment) report apart.
func NewBus(p Providers, name string, snap func() BusSnapshot) (*Bus, error) {
	m := p.meter()
	bus := KeyBus.String(name)
	t := &Bus{tracer: p.tracer(), lagSet: []metric.RecordOption{metric.WithAttributeSet(attribute.NewSet(bus))}}
	var errs []error
	add := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	var err error
	t.lag, err = m.Float64Histogram("tiercache.invalidation.lag", metric.WithUnit("s"),
		metric.WithDescription("Time from publishing an invalidation (its timestamp, the publisher's clock) to applying it here."),
		metric.WithExplicitBucketBoundaries(lagBuckets...))
	add(err)
	received, err := m.Int64ObservableCounter("tiercache.invalidations.received", metric.WithUnit("{message}"),
		metric.WithDescription("Invalidation messages received, by result: applied, own (this process's, skipped), ignored (no such namespace here), malformed, rejected (no valid tag under a Secret)."))
	add(err)
	live, err := m.Int64ObservableGauge("tiercache.bus.live", metric.WithUnit("1"),
		metric.WithDescription("1 while the invalidation stream is trusted (subscribed, circuit closed) and L1 is served; 0 while L1 is bypassed."))
	add(err)
	silence, err := m.Float64ObservableGauge("tiercache.bus.silence", metric.WithUnit("s"),
		metric.WithDescription("Time since anything was heard on the subscription; past tiercache.bus.heartbeat_timeout the instance stops trusting L1. How stale this instance's L1 could be right now, if an invalidation had been lost."))
	add(err)
	hbt, err := m.Float64ObservableGauge("tiercache.bus.heartbeat_timeout", metric.WithUnit("s"),
		metric.WithDescription("The configured staleness bound under faults (HeartbeatTimeout)."))
	add(err)
	reconnects, err := m.Int64ObservableCounter("tiercache.bus.reconnects", metric.WithUnit("{reconnect}"),
		metric.WithDescription("Subscriptions confirmed after the first: each one voided L1."))
	add(err)
	resets, err := m.Int64ObservableCounter("tiercache.l1.resets", metric.WithUnit("{reset}"),
		metric.WithDescription("Epoch changes that voided every namespace's L1 in this process (stream lost or regained, circuit opened or closed, an unreadable message)."))
	add(err)
	circuit, err := m.Int64ObservableGauge("tiercache.circuit.open", metric.WithUnit("1"),
		metric.WithDescription("1 while the circuit breaker on Redis is open."))
	add(err)
	opens, err := m.Int64ObservableCounter("tiercache.circuit.opens", metric.WithUnit("{open}"),
		metric.WithDescription("Times the circuit breaker opened."))
	add(err)
	depth, err := m.Int64ObservableGauge("tiercache.outbox.depth", metric.WithUnit("{entry}"),
		metric.WithDescription("Keys and namespace flushes waiting in the outbox to be replayed."))
	add(err)
	deferred, err := m.Int64ObservableCounter("tiercache.outbox.deferred", metric.WithUnit("{invalidation}"),
		metric.WithDescription("Invalidations put in the outbox because their write did not reach Redis."))
	add(err)
	replayed, err := m.Int64ObservableCounter("tiercache.outbox.replayed", metric.WithUnit("{invalidation}"),
		metric.WithDescription("Invalidations replayed from the outbox."))
	add(err)
	overflows, err := m.Int64ObservableCounter("tiercache.outbox.overflows", metric.WithUnit("{overflow}"),
		metric.WithDescription("Times a namespace's pending invalidations became one flush because the outbox was full."))
	add(err)
	dropped, err := m.Int64ObservableCounter("tiercache.outbox.dropped", metric.WithUnit("{invalidation}"),
		metric.WithDescription("Invalidations dropped unreplayed: their cache or the Bus closed first (or their namespace had no cache on the Bus). Other instances may serve what their writes replaced until it expires."))
	add(err)
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	res := func(r string) metric.ObserveOption {
		return metric.WithAttributeSet(attribute.NewSet(bus, KeyResult.String(r)))
	}
	applied, own, ignored, malformed, rejected := res("applied"), res("own"), res("ignored"), res("malformed"), res("rejected")
	b := metric.WithAttributeSet(attribute.NewSet(bus))
	t.reg, err = m.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		s := snap()
		o.ObserveInt64(received, i64(s.Applied), applied)
		o.ObserveInt64(received, i64(s.Own), own)
		o.ObserveInt64(received, i64(s.Ignored), ignored)
		o.ObserveInt64(received, i64(s.Malformed), malformed)
		o.ObserveInt64(received, i64(s.Rejected), rejected)
		o.ObserveInt64(live, b2i(s.Live), b)
		o.ObserveFloat64(silence, s.SinceHeard.Seconds(), b)
		o.ObserveFloat64(hbt, s.HeartbeatTimeout.Seconds(), b)
		o.ObserveInt64(reconnects, i64(s.Reconnects), b)
		o.ObserveInt64(resets, i64(s.Resets), b)
		o.ObserveInt64(circuit, b2i(s.CircuitOpen), b)
		o.ObserveInt64(opens, i64(s.CircuitOpens), b)
		o.ObserveInt64(depth, int64(s.OutboxDepth), b)
		o.ObserveInt64(deferred, i64(s.Deferred), b)
		o.ObserveInt64(replayed, i64(s.Replayed), b)
		o.ObserveInt64(overflows, i64(s.Overflows), b)
		o.ObserveInt64(dropped, i64(s.Dropped), b)
		return nil
	}, received, live, silence, hbt, reconnects, resets, circuit, opens, depth, deferred, replayed, overflows, dropped)
	if err != nil {
		return nil, err
	}
	return t, nil
}

func b2i(b bool) int64 {
	if b {
		return 1
	}
	return 0
}

// Close unregisters the Bus's callbacks.
func (t *Bus) Close() {
	if t != nil && t.reg != nil {
		_ = t.reg.Unregister()
	}
}

// Lag records the delivery lag of one applied invalidation.
func (t *Bus) Lag(ctx context.Context, d time.Duration) {
	if t == nil {
		return
	}
	t.lag.Record(ctx, max(d, 0).Seconds(), t.lagSet...)
}

// Span starts a span for the Bus (a replay, a resubscription).
func (t *Bus) Span(ctx context.Context, name string) (context.Context, trace.Span) {
	if t == nil {
		return ctx, trace.SpanFromContext(ctx)
	}
	return t.tracer.Start(ctx, name, internalSpan...)
}
