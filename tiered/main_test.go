package tiered

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/tiercache/tiercache/internal/redistest"
	"github.com/tiercache/tiercache/invalidate"
)

// srv is the package's standalone Redis: a private redis-server, or
// REDIS_ADDR. Benchmarks and tests that need a standalone server use it.
var srv *redistest.Server

// shared is where the suite's shared-server tests run: srv, or with
// TIERCACHE_TEST_CLUSTER=1 a private Redis Cluster (3 masters, 3 replicas),
// so the core and read-through suites run unchanged against a cluster
// (make test runs both). Fault tests start their own servers either way.
var shared backend

// testShards is the shared-server tests' invalidate.Options.ShardChannels:
// TIERCACHE_TEST_SHARDS=N runs them over sharded pub/sub on N channels.
var testShards int

// backend is a Redis deployment the tests can get clients of.
type backend interface {
	Client(tb testing.TB) redis.UniversalClient
	Prefix() string
}

type standalone struct{ *redistest.Server }

func (s standalone) Client(tb testing.TB) redis.UniversalClient { return s.Server.Client(tb) }

type clusterBackend struct{ *redistest.Cluster }

func (c clusterBackend) Client(tb testing.TB) redis.UniversalClient { return c.Cluster.Client(tb) }
func (clusterBackend) Prefix() string                               { return "tct:" }

func TestMain(m *testing.M) {
	s, cleanup, err := redistest.NewShared()
	if err != nil {
		fmt.Fprintln(os.Stderr, "tiered tests need Redis:", err)
		os.Exit(1)
	}
	srv = s
	shared = standalone{s}
	if os.Getenv("TIERCACHE_TEST_CLUSTER") == "1" {
		c, err := redistest.NewCluster(redistest.ClusterConfig{})
		if err != nil {
			cleanup()
			fmt.Fprintln(os.Stderr, "TIERCACHE_TEST_CLUSTER=1: cannot start a Redis Cluster:", err)
			os.Exit(1)
		}
		stop := cleanup
		cleanup = func() { c.Close(); stop() }
		shared = clusterBackend{c}
		fmt.Fprintln(os.Stderr, "tiered: shared-server tests run against a local Redis Cluster:", c.Addrs())
	}
	if v := os.Getenv("TIERCACHE_TEST_SHARDS"); v != "" {
		if testShards, err = strconv.Atoi(v); err != nil || testShards < 0 {
			cleanup()
			fmt.Fprintln(os.Stderr, "TIERCACHE_TEST_SHARDS must be a count of channels:", v)
			os.Exit(1)
		}
		fmt.Fprintf(os.Stderr, "tiered: shared-server tests use sharded pub/sub on %d channels\n", testShards)
	}
	os.Setenv("TIERCACHE_EXAMPLE_REDIS", s.Addr())
	code := m.Run()
	cleanup()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

var nsSeq atomic.Uint64

// namespace returns a namespace unique to this test run.
func namespace(t testing.TB) string {
	n := strings.NewReplacer("/", "-", ":", "-", "{", "(", "}", ")").Replace(t.Name())
	if len(n) > 200 {
		n = n[:200]
	}
	return fmt.Sprintf("%s-%d", n, nsSeq.Add(1))
}

// instance is one simulated process: its own client, Bus and Cache.
type instance[V any] struct {
	rdb redis.UniversalClient
	bus *invalidate.Bus
	c   *Cache[V]
}

func newBus(t testing.TB, s backend, rdb redis.UniversalClient, o invalidate.Options) *invalidate.Bus {
	t.Helper()
	o.Prefix = s.Prefix()
	bus, err := invalidate.New(rdb, o)
	if err != nil {
		t.Fatalf("invalidate.New: %v", err)
	}
	t.Cleanup(func() { bus.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := bus.WaitLive(ctx); err != nil {
		t.Fatalf("bus.WaitLive: %v", err)
	}
	return bus
}

// newFleet starts n instances of one namespace on server s.
func newFleet[V any](t testing.TB, s backend, n int, opts Options) []*instance[V] {
	t.Helper()
	return newFleetBus[V](t, s, n, opts, invalidate.Options{})
}

// newFleetBus is newFleet with Bus options (heartbeats).
func newFleetBus[V any](t testing.TB, s backend, n int, opts Options, bo invalidate.Options) []*instance[V] {
	t.Helper()
	if s == shared && !opts.PlainJSON && bo.ShardChannels == 0 {
		bo.ShardChannels = testShards
	}
	ns := namespace(t)
	if opts.KeyPrefix == "" {
		opts.KeyPrefix = s.Prefix()
		if opts.PlainJSON {
			opts.KeyPrefix += "plain:" // a prefix of its own (see Options.PlainJSON)
		}
	}
	out := make([]*instance[V], n)
	for i := range out {
		rdb := s.Client(t)
		var bus *invalidate.Bus
		if opts.Mode != ModeMemory {
			bus = newBus(t, s, rdb, bo)
		}
		c, err := New[V](ns, rdb, bus, opts)
		if err != nil {
			t.Fatalf("New: %v", err)
		}
		t.Cleanup(func() { c.Close() })
		out[i] = &instance[V]{rdb: rdb, bus: bus, c: c}
	}
	return out
}

func newCache[V any](t testing.TB, opts Options) *Cache[V] {
	t.Helper()
	return newFleet[V](t, shared, 1, opts)[0].c
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// The setters install test seams under the cache's lock, so the goroutines
// that later read them (the Bus's handler, fills) are ordered after it.

func (c *Cache[V]) setReadHook(afterL2Read func(key string)) {
	c.mu.Lock()
	c.afterL2Read = afterL2Read
	c.mu.Unlock()
}

func (c *Cache[V]) setStoreHook(beforeL1Store func(key string)) {
	c.mu.Lock()
	c.beforeL1Store = beforeL1Store
	c.mu.Unlock()
}

// applied returns a channel that receives once per message the cache
// applies from the Bus.
func applied[V any](c *Cache[V]) <-chan struct{} {
	ch := make(chan struct{}, 1024)
	c.mu.Lock()
	c.afterApply = func() { ch <- struct{}{} }
	c.mu.Unlock()
	return ch
}

func (c *Cache[V]) setFlightHooks(flightStart func(key string), beforeApply func()) {
	c.mu.Lock()
	c.flightStart, c.beforeApply = flightStart, beforeApply
	c.mu.Unlock()
}
