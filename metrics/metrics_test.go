package metrics_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.uber.org/goleak"

	"github.com/tiercache/tiercache/internal/redistest"
	"github.com/tiercache/tiercache/invalidate"
	"github.com/tiercache/tiercache/metrics"
	"github.com/tiercache/tiercache/metrics/redistrace"
	"github.com/tiercache/tiercache/tiered"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// telemetry is an SDK meter provider with a manual reader and a tracer
// provider with an in-memory recorder.
type telemetry struct {
	reader *sdkmetric.ManualReader
	mp     *sdkmetric.MeterProvider
	spans  *tracetest.SpanRecorder
	tp     *sdktrace.TracerProvider
}

func newTelemetry(t testing.TB) *telemetry {
	tel := &telemetry{reader: sdkmetric.NewManualReader(), spans: tracetest.NewSpanRecorder()}
	tel.mp = sdkmetric.NewMeterProvider(sdkmetric.WithReader(tel.reader))
	tel.tp = sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(tel.spans))
	t.Cleanup(func() {
		_ = tel.mp.Shutdown(context.Background())
		_ = tel.tp.Shutdown(context.Background())
	})
	return tel
}

func (tel *telemetry) providers() metrics.Providers {
	return metrics.Providers{Meter: tel.mp, Tracer: tel.tp}
}

func (tel *telemetry) collect(t testing.TB) metricdata.ResourceMetrics {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := tel.reader.Collect(context.Background(), &rm); err != nil {
		t.Fatalf("Collect: %v", err)
	}
	return rm
}

// value returns the value of metric name at the data point whose attributes
// include all of want (int sums and gauges), or the count of a histogram.
func value(rm metricdata.ResourceMetrics, name string, want ...attribute.KeyValue) (float64, bool) {
	match := func(set attribute.Set) bool {
		for _, kv := range want {
			if v, ok := set.Value(kv.Key); !ok || v != kv.Value {
				return false
			}
		}
		return true
	}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name != name {
				continue
			}
			switch d := m.Data.(type) {
			case metricdata.Sum[int64]:
				for _, p := range d.DataPoints {
					if match(p.Attributes) {
						return float64(p.Value), true
					}
				}
			case metricdata.Gauge[int64]:
				for _, p := range d.DataPoints {
					if match(p.Attributes) {
						return float64(p.Value), true
					}
				}
			case metricdata.Gauge[float64]:
				for _, p := range d.DataPoints {
					if match(p.Attributes) {
						return p.Value, true
					}
				}
			case metricdata.Histogram[float64]:
				for _, p := range d.DataPoints {
					if match(p.Attributes) {
						return float64(p.Count), true
					}
				}
			}
		}
	}
	return 0, false
}

// instance is one process: its client (instrumented by redistrace), Bus
// and Cache, all reporting to tel.
type instance struct {
	rdb *redis.Client
	bus *invalidate.Bus
	c   *tiered.Cache[string]
}

func newInstance(t *testing.T, s *redistest.Server, ns string, tel *telemetry, bo invalidate.Options) *instance {
	t.Helper()
	rdb := s.Client(t)
	if tel != nil {
		if err := redistrace.Instrument(rdb, tel.providers()); err != nil {
			t.Fatal(err)
		}
		bo.MeterProvider, bo.TracerProvider = tel.mp, tel.tp
	}
	bo.Prefix = s.Prefix()
	bus, err := invalidate.New(rdb, bo)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bus.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := bus.WaitLive(ctx); err != nil {
		t.Fatal(err)
	}
	opts := tiered.Options{KeyPrefix: s.Prefix(), CommandTimeout: 200 * time.Millisecond}
	if tel != nil {
		opts.MeterProvider, opts.TracerProvider = tel.mp, tel.tp
	}
	c, err := tiered.New[string](ns, rdb, bus, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &instance{rdb: rdb, bus: bus, c: c}
}

var (
	nsAttr = func(ns string) attribute.KeyValue { return metrics.KeyNamespace.String(ns) }
	tier   = metrics.KeyTier.String
	result = metrics.KeyResult.String
	op     = metrics.KeyOperation.String
)

// TestInstrumentsMove drives one scenario through a real Redis and checks
// that each instrument moves as it should: hit, miss, load, invalidation
// received, reset, outbox, circuit; and that spans carry the right names
// and attributes and never a key or a value.
func TestInstrumentsMove(t *testing.T) {
	s := redistest.Start(t)
	tel := newTelemetry(t)
	ns := "users"
	bo := invalidate.Options{HeartbeatInterval: 50 * time.Millisecond, HeartbeatTimeout: 300 * time.Millisecond,
		BreakerThreshold: 2, BreakerCooldown: 50 * time.Millisecond}
	a := newInstance(t, s, ns, tel, bo)
	b := newInstance(t, s, ns, nil, bo) // another process, not observed
	ctx := context.Background()
	const secretKey, secretValue = "key-7f3a9", "value-SSN-123-45-6789"

	// A miss in both tiers, then a write, then an L2 hit and an L1 hit.
	if _, ok, err := a.c.Get(ctx, secretKey); ok || err != nil {
		t.Fatalf("Get on an empty cache: %v %v", ok, err)
	}
	if err := a.c.Set(ctx, secretKey, secretValue, 0); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if v, ok, err := a.c.Get(ctx, secretKey); !ok || err != nil || v != secretValue {
			t.Fatalf("Get = %q %v %v", v, ok, err)
		}
	}
	// Loads: one found, one not found, one failing.
	loader := func(_ context.Context, k string) (string, error) {
		switch k {
		case "absent":
			return "", tiered.ErrNotFound
		case "failing":
			return "", errors.New("database down")
		}
		return secretValue, nil
	}
	if _, err := a.c.Remember(ctx, "loaded", loader); err != nil {
		t.Fatal(err)
	}
	if _, err := a.c.Remember(ctx, "absent", loader); !errors.Is(err, tiered.ErrNotFound) {
		t.Fatal(err)
	}
	if _, err := a.c.Remember(ctx, "failing", loader); err == nil {
		t.Fatal("the failing loader's error was lost")
	}
	rm := tel.collect(t)
	want := []struct {
		name  string
		attrs []attribute.KeyValue
		min   float64
	}{
		{"tiercache.requests", []attribute.KeyValue{nsAttr(ns), tier("l1"), result("hit")}, 1},
		{"tiercache.requests", []attribute.KeyValue{nsAttr(ns), tier("l1"), result("miss")}, 2},
		{"tiercache.requests", []attribute.KeyValue{nsAttr(ns), tier("l2"), result("hit")}, 1},
		{"tiercache.requests", []attribute.KeyValue{nsAttr(ns), tier("l2"), result("miss")}, 1},
		{"tiercache.requests", []attribute.KeyValue{nsAttr(ns), tier("loader"), result("hit")}, 1},
		{"tiercache.requests", []attribute.KeyValue{nsAttr(ns), tier("loader"), result("miss")}, 1},
		{"tiercache.requests", []attribute.KeyValue{nsAttr(ns), tier("loader"), result("error")}, 1},
		{"tiercache.operation.duration", []attribute.KeyValue{nsAttr(ns), op("get"), result("ok")}, 2},
		{"tiercache.operation.duration", []attribute.KeyValue{nsAttr(ns), op("set"), result("ok")}, 1},
		{"tiercache.operation.duration", []attribute.KeyValue{nsAttr(ns), op("remember"), result("ok")}, 2},
		{"tiercache.operation.duration", []attribute.KeyValue{nsAttr(ns), op("remember"), result("error")}, 1},
		{"tiercache.loader.duration", []attribute.KeyValue{nsAttr(ns), result("ok")}, 1},
		{"tiercache.loader.duration", []attribute.KeyValue{nsAttr(ns), result("not_found")}, 1},
		{"tiercache.loader.duration", []attribute.KeyValue{nsAttr(ns), result("error")}, 1},
		{"tiercache.invalidations.published", []attribute.KeyValue{nsAttr(ns)}, 1},
		{"tiercache.l1.keys", []attribute.KeyValue{nsAttr(ns)}, 1},
		{"tiercache.l1.cost", []attribute.KeyValue{nsAttr(ns)}, 64},
		{"tiercache.bus.live", nil, 1},
		{"tiercache.bus.heartbeat_timeout", nil, 0.3},
		{"tiercache.outbox.depth", nil, 0},
		{"tiercache.circuit.open", nil, 0},
	}
	for _, w := range want {
		got, ok := value(rm, w.name, w.attrs...)
		if !ok || got < w.min {
			t.Errorf("%s %v = %v (present %v), want at least %v", w.name, w.attrs, got, ok, w.min)
		}
	}
	if got, _ := value(rm, "tiercache.requests", nsAttr(ns), tier("l1"), result("hit")); got != 1 {
		t.Errorf("l1 hits = %v, want exactly 1", got)
	}

	// An invalidation from B: received, applied, its lag recorded.
	if err := b.c.Set(ctx, secretKey, "v2", 0); err != nil {
		t.Fatal(err)
	}
	eventually(t, func() bool {
		v, _ := value(tel.collect(t), "tiercache.invalidations.received", result("applied"))
		return v >= 1
	}, "the invalidation to be applied")
	rm = tel.collect(t)
	if n, _ := value(rm, "tiercache.invalidation.lag"); n < 1 {
		t.Errorf("invalidation.lag count = %v, want ≥ 1", n)
	}

	// Concurrent misses of one key join one load.
	release := make(chan struct{})
	started := make(chan struct{}, 1)
	slow := func(ctx context.Context, _ string) (string, error) {
		started <- struct{}{}
		<-release
		return "x", nil
	}
	done := make(chan error, 2)
	go func() { _, err := a.c.Remember(ctx, "joined", slow); done <- err }()
	<-started
	go func() { _, err := a.c.Remember(ctx, "joined", slow); done <- err }()
	eventually(t, func() bool {
		v, _ := value(tel.collect(t), "tiercache.singleflight.joined", nsAttr(ns))
		return v >= 1
	}, "the second caller to join")
	close(release)
	for range 2 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}

	// A reset: the subscription is killed and comes back.
	resets, _ := value(tel.collect(t), "tiercache.l1.resets")
	s.KillPubSub(t)
	eventually(t, func() bool {
		rm := tel.collect(t)
		r, _ := value(rm, "tiercache.bus.reconnects")
		n, _ := value(rm, "tiercache.l1.resets")
		live, _ := value(rm, "tiercache.bus.live")
		return r >= 1 && n >= resets+2 && live == 1
	}, "the reconnect and two resets")

	// Redis stopped: writes go to the outbox, the circuit opens; back up:
	// replayed, closed.
	s.Stop(t)
	for _, k := range []string{"o1", "o2", "o3"} {
		_ = a.c.Delete(ctx, k)
	}
	rm = tel.collect(t)
	for _, c := range []struct {
		name string
		want float64
	}{{"tiercache.outbox.depth", 3}, {"tiercache.outbox.deferred", 3}, {"tiercache.circuit.open", 1}, {"tiercache.circuit.opens", 1}} {
		if got, _ := value(rm, c.name); got != c.want {
			t.Errorf("with Redis down: %s = %v, want %v", c.name, got, c.want)
		}
	}
	if v, err := a.c.Remember(ctx, "during", loader); err != nil || v != secretValue {
		t.Fatalf("Remember with Redis down = %q, %v", v, err)
	}
	rm = tel.collect(t)
	if got, _ := value(rm, "tiercache.degraded.loads", nsAttr(ns)); got < 1 {
		t.Errorf("degraded.loads = %v, want ≥ 1", got)
	}
	s.Restart(t)
	eventually(t, func() bool {
		rm := tel.collect(t)
		d, _ := value(rm, "tiercache.outbox.depth")
		r, _ := value(rm, "tiercache.outbox.replayed")
		o, _ := value(rm, "tiercache.circuit.open")
		return d == 0 && r >= 3 && o == 0
	}, "the outbox to be replayed and the circuit to close")
	if got, ok := value(tel.collect(t), "tiercache.outbox.dropped"); !ok || got != 0 {
		t.Errorf("outbox.dropped = %v (reported %v) after a full replay, want 0", got, ok)
	}
	// Closed with Redis down and a write unreplayed: the drop is counted.
	s.Stop(t)
	if err := a.c.Delete(ctx, "o4"); err == nil {
		t.Fatal("Delete with Redis stopped returned nil")
	}
	if err := a.c.Close(); !errors.Is(err, invalidate.ErrOutboxDropped) {
		t.Errorf("Close with an unreplayable outbox entry: %v; want ErrOutboxDropped (bus: %+v)", err, a.bus.Stats())
	}
	if got, _ := value(tel.collect(t), "tiercache.outbox.dropped"); got != 1 {
		t.Errorf("outbox.dropped = %v after closing with one entry unreplayed, want 1", got)
	}
	s.Restart(t)

	// Spans: the expected names, db.system.name on Redis round trips, and
	// no key or value anywhere.
	names := map[string]int{}
	for _, sp := range tel.spans.Ended() {
		names[sp.Name()]++
		if strings.HasPrefix(sp.Name(), "tiercache.l2.") {
			if v, ok := attr(sp.Attributes(), "db.system.name"); !ok || v != "redis" {
				t.Errorf("span %s: db.system.name = %q", sp.Name(), v)
			}
		}
		check := func(where, s string) {
			for _, secret := range []string{secretKey, secretValue, "database down"} {
				if strings.Contains(s, secret) {
					t.Errorf("span %s: %s contains %q", sp.Name(), where, secret)
				}
			}
		}
		check("name", sp.Name())
		check("status", sp.Status().Description)
		for _, kv := range sp.Attributes() {
			check("attribute "+string(kv.Key), kv.Value.String())
		}
		for _, ev := range sp.Events() {
			check("event "+ev.Name, ev.Name)
			for _, kv := range ev.Attributes {
				check("event attribute "+string(kv.Key), kv.Value.String())
			}
		}
	}
	for _, n := range []string{"tiercache.l2.get", "tiercache.l2.write", "tiercache.load", "tiercache.l2.fill", "tiercache.outbox.replay"} {
		if names[n] == 0 {
			t.Errorf("no %q span; got %v", n, names)
		}
	}
	// redisotel's command spans are there too, without arguments.
	var cmdSpans int
	for n, c := range names {
		if !strings.HasPrefix(n, "tiercache.") {
			cmdSpans += c
		}
	}
	if cmdSpans == 0 {
		t.Errorf("no Redis command spans from redistrace; got %v", names)
	}
}

func attr(kvs []attribute.KeyValue, key string) (string, bool) {
	for _, kv := range kvs {
		if string(kv.Key) == key {
			return kv.Value.String(), true
		}
	}
	return "", false
}

// eventually polls cond (a metrics collection: there is no event to await)
// every 5 ms for up to 5 s.
func eventually(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestCardinality: 10,000 distinct keys through every operation add no
// attribute set to any instrument.
func TestCardinality(t *testing.T) {
	s := redistest.Shared(t)
	tel := newTelemetry(t)
	a := newInstance(t, s, "cardinality", tel, invalidate.Options{})
	ctx := context.Background()
	load := func(_ context.Context, k string) (string, error) {
		if strings.HasSuffix(k, "7") {
			return "", tiered.ErrNotFound
		}
		return "v" + k, nil
	}
	loadMany := func(_ context.Context, ks []string) (map[string]string, error) {
		out := make(map[string]string, len(ks))
		for _, k := range ks {
			if !strings.HasSuffix(k, "7") {
				out[k] = "v" + k
			}
		}
		return out, nil
	}
	// Every operation over every key, batched where the API allows so that
	// 10,000 keys stay quick under -race; single-key calls then mostly hit L1.
	exercise := func(keys []string) {
		for start := 0; start < len(keys); start += 1000 {
			part := keys[start:min(start+1000, len(keys))]
			items := make(map[string]string, len(part))
			for _, k := range part {
				items[k] = "v"
			}
			_, _ = a.c.GetMany(ctx, part)
			_ = a.c.SetMany(ctx, items, 0)
			_, _ = a.c.GetMany(ctx, part)
			_, _ = a.c.RememberMany(ctx, part, loadMany)
			for _, k := range part {
				_, _, _ = a.c.Get(ctx, k)
				_, _ = a.c.Exists(ctx, k)
				_, _ = a.c.Remember(ctx, k, load)
			}
			_ = a.c.DeleteMany(ctx, part[:min(len(part), 100)]...)
		}
		for _, k := range keys[:10] {
			_, _, _ = a.c.Get(ctx, "never-"+k)
			_, _ = a.c.Exists(ctx, "never-"+k)
			_, _ = a.c.Remember(ctx, "r-"+k, load)
			_ = a.c.Set(ctx, k, "v", 0)
			_ = a.c.Delete(ctx, k)
		}
	}
	// points lists each instrument's attribute sets, encoded.
	points := func() map[string][]string {
		out := map[string][]string{}
		enc := attribute.DefaultEncoder()
		for _, sm := range tel.collect(t).ScopeMetrics {
			for _, m := range sm.Metrics {
				var sets []attribute.Set
				switch d := m.Data.(type) {
				case metricdata.Sum[int64]:
					for _, p := range d.DataPoints {
						sets = append(sets, p.Attributes)
					}
				case metricdata.Gauge[int64]:
					for _, p := range d.DataPoints {
						sets = append(sets, p.Attributes)
					}
				case metricdata.Gauge[float64]:
					for _, p := range d.DataPoints {
						sets = append(sets, p.Attributes)
					}
				case metricdata.Histogram[float64]:
					for _, p := range d.DataPoints {
						sets = append(sets, p.Attributes)
					}
				}
				for _, s := range sets {
					out[m.Name] = append(out[m.Name], s.Encoded(enc))
				}
			}
		}
		return out
	}
	keys := func(from, n int) []string {
		ks := make([]string, n)
		for i := range ks {
			ks[i] = fmt.Sprintf("k%d", from+i)
		}
		return ks
	}
	exercise(keys(0, 20))
	before := points()
	exercise(keys(20, 10000))
	after := points()
	// Every attribute value comes from a closed set, so however many keys
	// pass, the attribute sets stay bounded; and no key or value appears.
	allowed := map[string][]string{
		"tiercache.bus":       {s.Prefix() + "@" + s.Addr()}, // the Bus's name: prefix@address by default
		"tiercache.namespace": {"cardinality"},
		"tiercache.tier":      {"l1", "l2", "loader"},
		"tiercache.result":    {"hit", "miss", "error", "ok", "not_found", "panic", "applied", "own", "ignored", "malformed", "rejected"},
		"tiercache.operation": {"get", "get_many", "exists", "set", "set_many", "delete", "delete_many", "clear", "delete_pattern", "remember", "remember_many"},
	}
	for name, sets := range after {
		if !strings.HasPrefix(name, "tiercache.") {
			continue
		}
		if len(sets) > len(before[name])+2 {
			t.Errorf("%s: %d attribute sets after 10,000 keys, %d before: %v", name, len(sets), len(before[name]), sets)
		}
		for _, set := range sets {
			for _, kv := range strings.Split(set, ",") {
				if kv == "" {
					continue
				}
				k, v, _ := strings.Cut(kv, "=")
				if !slices.Contains(allowed[k], v) {
					t.Errorf("%s: attribute %s=%q is not from its closed set", name, k, v)
				}
			}
		}
	}
	if len(before) < 10 {
		t.Fatalf("only %d instruments reported: %v", len(before), before)
	}
}

// BenchmarkL1Hit compares an L1 hit with no telemetry installed (the
// global no-op providers) against one with a real SDK meter and tracer
// provider, in one run. The hit path touches neither: both should match,
// at 0 allocs/op.
func BenchmarkL1Hit(b *testing.B) {
	s := redistest.Shared(b)
	for _, withSDK := range []bool{false, true} {
		name := "no-sdk"
		var tel *telemetry
		if withSDK {
			name, tel = "sdk", newTelemetry(b)
		}
		rdb := s.Client(b)
		bus, err := invalidate.New(rdb, invalidate.Options{Prefix: s.Prefix(), HeartbeatInterval: time.Second, HeartbeatTimeout: 10 * time.Second})
		if err != nil {
			b.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := bus.WaitLive(ctx); err != nil {
			b.Fatal(err)
		}
		cancel()
		opts := tiered.Options{KeyPrefix: s.Prefix()}
		if tel != nil {
			opts.MeterProvider, opts.TracerProvider = tel.mp, tel.tp
		}
		c, err := tiered.New[string]("bench-"+name, rdb, bus, opts)
		if err != nil {
			b.Fatal(err)
		}
		bg := context.Background()
		keys := make([]string, 1000)
		for i := range keys {
			keys[i] = fmt.Sprintf("key-%d", i)
			if err := c.Set(bg, keys[i], "value", 0); err != nil {
				b.Fatal(err)
			}
			for range 2 {
				if _, ok, err := c.Get(bg, keys[i]); !ok || err != nil {
					b.Fatal("warm-up Get missed", err)
				}
			}
		}
		b.Run(name+"/serial", func(b *testing.B) {
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if _, ok, _ := c.Get(bg, keys[i%len(keys)]); !ok {
					b.Fatal("miss")
				}
				i++
			}
		})
		b.Run(name+"/parallel", func(b *testing.B) {
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				i := 0
				for pb.Next() {
					if _, ok, _ := c.Get(bg, keys[i%len(keys)]); !ok {
						b.Error("miss")
						return
					}
					i++
				}
			})
		})
		c.Close()
		bus.Close()
	}
}

// TestBusesReportApart: two Buses in one process (one per Redis
// deployment) report each into series of their own, told apart by
// tiercache.bus. Before, both observed into one series per instrument, so
// a dead Bus's tiercache.bus.live could be hidden by a live one's.
func TestBusesReportApart(t *testing.T) {
	s := redistest.Shared(t)
	tel := newTelemetry(t)
	live := newInstance(t, s, "twobuses", tel, invalidate.Options{})
	// A second Bus, on a Redis that does not answer: never live.
	dead := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", DialTimeout: 50 * time.Millisecond, ContextTimeoutEnabled: true, MaxRetries: -1})
	t.Cleanup(func() { dead.Close() })
	db, err := invalidate.New(dead, invalidate.Options{Prefix: s.Prefix(), MeterProvider: tel.mp, TracerProvider: tel.tp})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	got := map[string]int64{}
	for _, sm := range tel.collect(t).ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name != "tiercache.bus.live" {
				continue
			}
			for _, p := range m.Data.(metricdata.Gauge[int64]).DataPoints {
				name, _ := p.Attributes.Value(metrics.KeyBus)
				got[name.AsString()] = p.Value
			}
		}
	}
	want := map[string]int64{s.Prefix() + "@" + s.Addr(): 1, s.Prefix() + "@127.0.0.1:1": 0}
	if !maps.Equal(got, want) || !live.bus.Live() {
		t.Fatalf("tiercache.bus.live by tiercache.bus = %v, want %v", got, want)
	}
}
