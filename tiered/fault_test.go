package tiered

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tiercache/tiercache/internal/faultproxy"
	"github.com/tiercache/tiercache/internal/redistest"
	"github.com/tiercache/tiercache/invalidate"
)

// The failure policy of DESIGN.md, one test per row, each on a real
// redis-server that the test slows, stops, pauses or cuts off.

// faultBus is a Bus tuned for fault tests: a short heartbeat so a dead
// stream is noticed in 300 ms, a quick breaker.
var faultBus = invalidate.Options{HeartbeatInterval: 50 * time.Millisecond, HeartbeatTimeout: 300 * time.Millisecond,
	BreakerThreshold: 3, BreakerCooldown: 100 * time.Millisecond}

// proxied is an instance whose client and Bus reach Redis through a fault
// proxy, so a test can slow or cut this one instance alone.
func proxied[V any](t *testing.T, s *redistest.Server, ns string, opts Options, bo invalidate.Options) (*instance[V], *faultproxy.Proxy) {
	t.Helper()
	rdb, p := proxyClient(t, s)
	return newInstance[V](t, s, ns, rdb, opts, bo), p
}

// proxyClient is a client of s through a fault proxy of its own, with a
// short dial timeout; both close when the test ends.
func proxyClient(t *testing.T, s *redistest.Server) (*redis.Client, *faultproxy.Proxy) {
	t.Helper()
	p, err := faultproxy.Start(s.Addr())
	if err != nil {
		t.Fatalf("faultproxy: %v", err)
	}
	t.Cleanup(func() { p.Close() })
	o := s.Options()
	o.Addr = p.Addr()
	o.DialTimeout = 200 * time.Millisecond
	rdb := redis.NewClient(o)
	t.Cleanup(func() { rdb.Close() })
	return rdb, p
}

// direct is an instance with its own plain client.
func direct[V any](t *testing.T, s *redistest.Server, ns string, opts Options, bo invalidate.Options) *instance[V] {
	t.Helper()
	return newInstance[V](t, s, ns, s.Client(t), opts, bo)
}

func newInstance[V any](t *testing.T, s *redistest.Server, ns string, rdb *redis.Client, opts Options, bo invalidate.Options) *instance[V] {
	t.Helper()
	if opts.KeyPrefix == "" {
		opts.KeyPrefix = s.Prefix()
		if opts.PlainJSON {
			opts.KeyPrefix += "plain:" // a prefix of its own (see Options.PlainJSON)
		}
	}
	bus := newBus(t, standalone{s}, rdb, bo)
	c, err := New[V](ns, rdb, bus, opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return &instance[V]{rdb: rdb, bus: bus, c: c}
}

func waitLiveT(t *testing.T, b *invalidate.Bus, within time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	if err := b.WaitLive(ctx); err != nil {
		t.Fatalf("Bus not live again within %v: %v (%+v)", within, err, b.Stats())
	}
}

// versioned is a loader over a versioned "database" that counts its calls.
type versioned struct {
	version atomic.Int64
	calls   atomic.Int64
}

func (s *versioned) load(_ context.Context, key string) (string, error) {
	s.calls.Add(1)
	return key + "@" + strconv.FormatInt(s.version.Load(), 10), nil
}

// Row "Redis slow": per-call timeouts are honoured, the circuit opens after
// repeated failures and then fails fast, a failed write is kept in the
// outbox, and on recovery the outbox is replayed so that another instance
// stops serving what the failed write replaced.
func TestFailure_RedisSlow(t *testing.T) {
	s := redistest.Start(t)
	ns := namespace(t)
	opts := Options{CommandTimeout: 100 * time.Millisecond}
	// A's Bus keeps a long heartbeat so only the breaker reacts to the
	// latency, not the stream.
	bo := faultBus
	bo.HeartbeatInterval, bo.HeartbeatTimeout = time.Second, 5*time.Second
	logs := &lockedBuffer{}
	bo.Logger = slog.New(slog.NewTextHandler(logs, nil))
	a, p := proxied[string](t, s, ns, opts, bo)
	b := direct[string](t, s, ns, opts, faultBus)
	ctx := ctxT(t)
	if err := b.c.Set(ctx, "k", "v1", 0); err != nil {
		t.Fatal(err)
	}
	mustGet(t, b.c, "k", "v1", "B before the fault")
	mustGet(t, b.c, "k", "v1", "B from L1")

	p.SetLatency(150 * time.Millisecond) // a round trip takes ≥ 300 ms, beyond CommandTimeout
	for i := range 3 {
		start := time.Now()
		_, _, err := a.c.Get(ctx, "miss"+strconv.Itoa(i))
		if el := time.Since(start); err == nil || el > 250*time.Millisecond {
			t.Fatalf("Get through a slow Redis: err %v after %v; want a timeout after ~100 ms", err, el)
		}
	}
	if !a.bus.CircuitOpen() {
		t.Fatalf("circuit closed after 3 timeouts in a row: %+v", a.bus.Stats())
	}
	start := time.Now()
	_, _, err := a.c.Get(ctx, "other")
	if !errors.Is(err, ErrCircuitOpen) || time.Since(start) > 20*time.Millisecond {
		t.Fatalf("Get with the circuit open: %v after %v; want ErrCircuitOpen at once", err, time.Since(start))
	}
	// The read-through still answers, from the loader, without error.
	src := &versioned{}
	v, err := a.c.Remember(ctx, "r", src.load)
	if err != nil || v != "r@0" {
		t.Fatalf("Remember with the circuit open = %q, %v; want the loader's value", v, err)
	}
	// A write fails fast, and its key waits in the outbox.
	if err := a.c.Set(ctx, "k", "v2", 0); !errors.Is(err, ErrCircuitOpen) {
		t.Fatalf("Set with the circuit open: %v, want ErrCircuitOpen", err)
	}
	if !a.bus.Pending(ns, "k") {
		t.Fatal("the failed write's key is not in the outbox")
	}
	// B never heard of it: it still serves v1 (the documented limit of a
	// write that returned an error).
	mustGet(t, b.c, "k", "v1", "B while A's write is in the outbox")

	bApplied := applied(b.c)
	p.SetLatency(0)
	waitLiveT(t, a.bus, 5*time.Second) // the probe closed the circuit after replaying
	await(t, bApplied, "B applying A's replayed invalidation")
	if _, ok, err := b.c.Get(ctx, "k"); err != nil || ok {
		t.Fatalf("B after the replay: ok %v err %v; want a miss (the key was deleted)", ok, err)
	}
	st := a.bus.Stats()
	if st.OutboxDepth != 0 || st.Replayed == 0 || st.CircuitCloses == 0 {
		t.Fatalf("after recovery: %+v", st)
	}
	if a.c.Stats().Refused == 0 {
		t.Fatal("Stats().Refused did not count the refused calls")
	}
	// The outage is logged once when it starts and once when it ends, not
	// per request. The probe logs the end after it has closed the circuit
	// (which the waits above see), so the line may still be on its way.
	eventually(t, time.Second, "the 'circuit closed' log line", func() bool { return strings.Contains(logs.String(), "circuit closed") })
	out := logs.String()
	if n := strings.Count(out, "circuit open"); n != 1 {
		t.Errorf("%d 'circuit open' log lines, want 1:\n%s", n, out)
	}
	if n := strings.Count(out, "circuit closed"); n != 1 {
		t.Errorf("%d 'circuit closed' log lines, want 1:\n%s", n, out)
	}
}

// lockedBuffer is an io.Writer safe for the Bus's goroutines and the test.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Row "Redis down": reads are served from L1 within its bound, else by the
// loader, with no error; writes return an error and go to the outbox; on
// recovery L1 is voided and the outbox replayed.
func TestFailure_RedisDown(t *testing.T) {
	s := redistest.Start(t)
	ns := namespace(t)
	opts := Options{CommandTimeout: 100 * time.Millisecond, DegradedL1TTL: 200 * time.Millisecond}
	a := direct[string](t, s, ns, opts, faultBus)
	ctx := ctxT(t)
	src := &versioned{}
	if v, err := a.c.Remember(ctx, "k", src.load); err != nil || v != "k@0" {
		t.Fatalf("Remember = %q, %v", v, err)
	}

	s.Stop(t)
	// Every read-through answers, without error, while Redis is down. Until
	// the Bus notices (HeartbeatTimeout), L1 serves what it held; once it
	// has, L1 keeps loaded values for DegradedL1TTL only, so a change at the
	// source made after that shows within DegradedL1TTL: no read that
	// starts later than that after the change may return the old value.
	// (The bound is on staleness, not on latency: a read that starts in time
	// and returns the new value late, Redis calls timing out first, keeps it.)
	deadline := time.Now().Add(time.Second)
	var changedAt time.Time
	oldAfter := time.Duration(-1) // start of the last read that returned the old value, after the change
	sawNew := false
	degradedReads := 0 // reads completed after the Bus noticed, before the change
	for time.Now().Before(deadline) {
		// Change the source once a degraded read has put the old value in
		// L1 under DegradedL1TTL: that entry is what the bound is about.
		if changedAt.IsZero() && degradedReads > 0 {
			src.version.Store(1)
			changedAt = time.Now()
		}
		dead := !a.bus.Live()
		start := time.Now()
		v, err := a.c.Remember(ctx, "k", src.load)
		if dead && changedAt.IsZero() {
			degradedReads++
		}
		if err != nil {
			t.Fatalf("Remember while Redis is down: %v", err)
		}
		switch {
		case v == "k@1":
			sawNew = true
		case !changedAt.IsZero():
			oldAfter = start.Sub(changedAt)
		}
		time.Sleep(time.Millisecond)
	}
	if !a.bus.CircuitOpen() || a.bus.Live() {
		t.Fatalf("Redis down for 1s: circuit open %v, live %v", a.bus.CircuitOpen(), a.bus.Live())
	}
	if !sawNew {
		t.Fatal("the versioned change was never seen while Redis was down")
	}
	if oldAfter < 0 {
		t.Fatal("no read after the change returned the old value: the degraded L1 entry was not kept, so the bound went untested")
	}
	if oldAfter > opts.DegradedL1TTL+50*time.Millisecond {
		t.Fatalf("a read started %v after the change returned the old value; want none after DegradedL1TTL (%v)", oldAfter, opts.DegradedL1TTL)
	}
	// L1 spared the versioned: far fewer loads than reads.
	if n := src.calls.Load(); n > 20 {
		t.Errorf("%d loads in 1 s of reads: degraded L1 entries are not being kept", n)
	}
	st := a.c.Stats()
	if st.DegradedLoads == 0 || st.DegradedFills == 0 {
		t.Errorf("degraded figures not counted: %+v", st)
	}
	// Get has no loader: it reports that Redis is unavailable.
	if _, _, err := a.c.Get(ctx, "nothing"); !errors.Is(err, ErrCircuitOpen) {
		t.Fatalf("Get while Redis is down: %v, want ErrCircuitOpen", err)
	}
	// A write returns an error, but is served locally and kept.
	if err := a.c.Set(ctx, "w", "written", 0); err == nil {
		t.Fatal("Set while Redis is down returned nil")
	}
	mustGet(t, a.c, "w", "written", "the writer, from L1 while degraded")
	if err := a.c.Delete(ctx, "k"); err == nil {
		t.Fatal("Delete while Redis is down returned nil")
	}
	if d := a.bus.OutboxDepth(); d != 2 {
		t.Fatalf("OutboxDepth = %d, want 2 (w and k)", d)
	}

	s.Restart(t)
	waitLiveT(t, a.bus, 5*time.Second)
	if d := a.bus.OutboxDepth(); d != 0 {
		t.Fatalf("live again with %d entries in the outbox", d)
	}
	// L1 was voided: the degraded entry of w is gone, and Redis holds the
	// replay's tombstone, not the value.
	if _, ok, err := a.c.Get(ctx, "w"); err != nil || ok {
		t.Fatalf("Get(w) after recovery: ok %v err %v; want a miss", ok, err)
	}
	if v, err := a.c.Remember(ctx, "k", src.load); err != nil || v != "k@1" {
		t.Fatalf("Remember after recovery = %q, %v", v, err)
	}
	if !a.bus.Live() || a.bus.CircuitOpen() {
		t.Fatal("not back to normal after recovery")
	}
}

// Row "Redis slow", the write half: CLIENT PAUSE WRITE stalls writes; Set
// returns within CommandTimeout with an error, its key goes to the outbox,
// reads keep being answered, and the outbox drains once the pause ends.
func TestFailure_PauseWrite(t *testing.T) {
	s := redistest.Start(t)
	ns := namespace(t)
	opts := Options{CommandTimeout: 100 * time.Millisecond}
	bo := faultBus
	bo.BreakerThreshold = -1 // isolate the timeout and the outbox
	a := direct[string](t, s, ns, opts, bo)
	ctx := ctxT(t)
	src := &versioned{}
	s.Pause(t, 600*time.Millisecond, true)
	start := time.Now()
	err := a.c.Set(ctx, "k", "v", 0)
	if err == nil || time.Since(start) > 300*time.Millisecond {
		t.Fatalf("Set during CLIENT PAUSE WRITE: %v after %v; want a timeout near 100 ms", err, time.Since(start))
	}
	if !a.bus.Pending(ns, "k") {
		t.Fatal("the timed-out write is not in the outbox")
	}
	// The key is read from the loader, never from Redis, while pending.
	if v, err := a.c.Remember(ctx, "k", src.load); err != nil || v != "k@0" {
		t.Fatalf("Remember of a pending key = %q, %v", v, err)
	}
	if a.c.Stats().PendingSkips == 0 {
		t.Fatal("the pending key was read from Redis")
	}
	// Other keys are read normally (reads are not paused).
	if v, err := a.c.Remember(ctx, "other", src.load); err != nil || v != "other@0" {
		t.Fatalf("Remember during the pause = %q, %v", v, err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for a.bus.OutboxDepth() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("outbox not drained 5 s after the pause: %+v", a.bus.Stats())
		}
		time.Sleep(10 * time.Millisecond)
	}
	raw, err := a.rdb.Get(ctx, a.c.dataKey(0, "k")).Bytes()
	if err != nil || len(raw) == 0 {
		t.Fatalf("after the replay Redis holds %x, %v; want a tombstone", raw, err)
	}
	if _, _, found, err := a.c.decode(raw); err != nil || found {
		t.Fatalf("after the replay the key decodes as found=%v err=%v; want a tombstone", found, err)
	}
}

// Row "Redis down" for one instance only: A is cut off while B keeps
// working. A's failed deletes overflow its outbox, which degrades to a
// namespace flush; when A comes back, the flush reaches B, whose L1 held the
// values A meant to delete.
func TestFailure_CutOffOutboxOverflowFlushes(t *testing.T) {
	s := redistest.Start(t)
	ns := namespace(t)
	opts := Options{CommandTimeout: 100 * time.Millisecond}
	bo := faultBus
	bo.OutboxLimit = 5
	a, p := proxied[string](t, s, ns, opts, bo)
	b := direct[string](t, s, ns, opts, faultBus)
	ctx := ctxT(t)
	for i := range 10 {
		k := "k" + strconv.Itoa(i)
		if err := b.c.Set(ctx, k, "old", 0); err != nil {
			t.Fatal(err)
		}
		mustGet(t, b.c, k, "old", "B")
		mustGet(t, b.c, k, "old", "B from L1")
	}
	p.Refuse(true)
	p.Cut()
	for i := range 10 {
		if err := a.c.Delete(ctx, "k"+strconv.Itoa(i)); err == nil {
			t.Fatal("Delete from a cut-off instance returned nil")
		}
	}
	st := a.bus.Stats()
	if st.Overflows != 1 || st.OutboxDepth != 1 {
		t.Fatalf("outbox after 10 deletes with limit 5: overflows %d depth %d; want a single flush", st.Overflows, st.OutboxDepth)
	}
	mustGet(t, b.c, "k3", "old", "B while A is cut off")
	bApplied := applied(b.c)
	p.Refuse(false)
	waitLiveT(t, a.bus, 5*time.Second)
	await(t, bApplied, "B applying A's replayed flush")
	for i := range 10 {
		if _, ok, err := b.c.Get(ctx, "k"+strconv.Itoa(i)); err != nil || ok {
			t.Fatalf("B after the flush: k%d ok %v err %v; want a miss", i, ok, err)
		}
	}
}

// The live mode switch: SetMode(ModeMemory) stops using Redis; writes made
// meanwhile are invalidated fleet-wide through the outbox, so no instance
// serves what they replaced; switching back voids L1.
func TestSetMode(t *testing.T) {
	s := redistest.Shared(t)
	ns := namespace(t)
	a := direct[string](t, s, ns, Options{}, faultBus)
	b := direct[string](t, s, ns, Options{}, faultBus)
	ctx := ctxT(t)
	if err := a.c.Set(ctx, "k", "v1", 0); err != nil {
		t.Fatal(err)
	}
	mustGet(t, b.c, "k", "v1", "B")
	mustGet(t, b.c, "k", "v1", "B from L1")

	if err := a.c.SetMode(ModeMemory); err != nil {
		t.Fatal(err)
	}
	if a.c.CurrentMode() != ModeMemory || a.c.Stats().Type != "memory" || a.c.Health(ctx).Status != "degraded" {
		t.Fatalf("after SetMode(memory): mode %v, stats type %q, health %q", a.c.CurrentMode(), a.c.Stats().Type, a.c.Health(ctx).Status)
	}
	if _, ok, _ := a.c.Get(ctx, "k"); ok {
		t.Fatal("memory mode read Redis (or kept the tiered L1)")
	}
	bApplied := applied(b.c)
	if err := a.c.Set(ctx, "k", "v2", 0); err != nil {
		t.Fatalf("Set in memory mode: %v", err)
	}
	mustGet(t, a.c, "k", "v2", "A from its memory-only L1")
	await(t, bApplied, "B applying the outbox's invalidation")
	if v, ok, err := b.c.Get(ctx, "k"); err != nil || ok {
		t.Fatalf("B after A's memory-mode write = %q, %v, %v; want a miss, never v1", v, ok, err)
	}

	if err := a.c.SetMode(ModeTiered); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := a.c.Get(ctx, "k"); err != nil || ok {
		t.Fatalf("A back in tiered mode: ok %v err %v; want a miss (L1 voided, Redis holds a tombstone)", ok, err)
	}
	if a.c.Health(ctx).Status != "ok" {
		t.Fatal("health still degraded after switching back")
	}

	if err := a.c.SetMode(ModeRedis); err == nil {
		t.Fatal("SetMode(ModeRedis) succeeded")
	}
	m, err := New[string](namespace(t), nil, nil, Options{Mode: ModeMemory})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.SetMode(ModeTiered); err == nil {
		t.Fatal("a ModeMemory cache switched to tiered without a Redis client")
	}
}

// A memory-mode write that a SetMode(ModeTiered) overtakes between its
// mode check and its L1 store (forced here through the seam) stores an
// entry that the switch has voided. Before, it read the namespace epoch as
// it stored, after the switch's bump, and L1 served in tiered mode a value
// Redis never had (the outbox's replay deletes it there) until L1TTL.
func TestSetMode_BackVoidsRacingMemoryWrite(t *testing.T) {
	c := newCache[string](t, Options{})
	ctx := ctxT(t)
	var switchBack atomic.Bool
	c.mu.Lock()
	c.beforeMemoryStore = func(string) {
		if switchBack.Swap(false) {
			if err := c.SetMode(ModeTiered); err != nil {
				t.Error(err)
			}
		}
	}
	c.mu.Unlock()
	writes := map[string]func(k string) error{
		"Set":     func(k string) error { return c.Set(ctx, k, "memory-mode write", 0) },
		"SetMany": func(k string) error { return c.SetMany(ctx, map[string]string{k: "memory-mode write"}, 0) },
	}
	for name, write := range writes {
		k := "k-" + name
		if err := c.SetMode(ModeMemory); err != nil {
			t.Fatal(err)
		}
		switchBack.Store(true)
		if err := write(k); err != nil {
			t.Fatalf("%s in memory mode: %v", name, err)
		}
		if c.CurrentMode() != ModeTiered {
			t.Fatalf("%s: the seam did not switch back to tiered mode", name)
		}
		if e, ok := c.peekL1(k); ok {
			t.Errorf("after SetMode(ModeTiered) overtook a memory-mode %s, L1 holds %q for it; want it voided", name, e.val)
		}
		if v, ok, err := c.Get(ctx, k); err != nil || ok {
			t.Errorf("Get(%s) after the switch back = %q, %v, %v; want a miss (Redis never had the value)", k, v, ok, err)
		}
	}
}

func TestNewRejectsClientWithoutContextTimeouts(t *testing.T) {
	o := srv.Options()
	o.ContextTimeoutEnabled = false
	rdb := redis.NewClient(o)
	defer rdb.Close()
	if _, err := New[string](namespace(t), rdb, nil, Options{Mode: ModeRedis}); !errors.Is(err, ErrContextTimeouts) && err == nil {
		t.Fatalf("New with ContextTimeoutEnabled false: %v", err)
	}
	bus := newBus(t, standalone{srv}, srv.Client(t), invalidate.Options{})
	if _, err := New[string](namespace(t), rdb, bus, Options{}); !errors.Is(err, ErrContextTimeouts) {
		t.Fatalf("New with ContextTimeoutEnabled false: %v, want ErrContextTimeouts", err)
	}
}

// TestNewRejectsRing: a Ring runs a transaction as one per shard, so a
// write and its PUBLISH would not be atomic (guarantee 5). Shown first on a
// real two-shard Ring: the transaction a Set would send lands its SET on
// one server and its PUBLISH on the other.
func TestNewRejectsRing(t *testing.T) {
	a, b := redistest.Start(t), redistest.Start(t)
	ring := redis.NewRing(&redis.RingOptions{
		Addrs:                 map[string]string{"a": a.Addr(), "b": b.Addr()},
		NewClient:             func(o *redis.Options) *redis.Client { return redis.NewClient(shardOptions(a, b, o.Addr)) },
		ContextTimeoutEnabled: true,
	})
	defer ring.Close()
	ctx := ctxT(t)
	const channel = "ring:ch"
	chShard, err := ring.GetShardClientForKey(channel)
	if err != nil {
		t.Fatal(err)
	}
	key := ""
	for i := 0; key == ""; i++ {
		k := fmt.Sprintf("ring:k%d", i)
		if s, err := ring.GetShardClientForKey(k); err == nil && s.Options().Addr != chShard.Options().Addr {
			key = k
		}
	}
	sub := chShard.Subscribe(ctx, channel)
	defer sub.Close()
	if _, err := sub.Receive(ctx); err != nil {
		t.Fatal(err)
	}
	var heard *redis.IntCmd
	if _, err := ring.TxPipelined(ctx, func(p redis.Pipeliner) error {
		p.Set(ctx, key, "v", time.Minute)
		heard = p.Publish(ctx, channel, "k")
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if n, err := chShard.Exists(ctx, key).Result(); err != nil || n != 0 || heard.Val() != 1 {
		t.Fatalf("the SET went with the PUBLISH (exists %d, %v; %d heard): the Ring kept them together", n, err, heard.Val())
	}

	bus := newBus(t, standalone{srv}, srv.Client(t), invalidate.Options{})
	if _, err := New[string](namespace(t), ring, bus, Options{}); !errors.Is(err, ErrUnsupportedClient) {
		t.Fatalf("New with a Ring: %v, want ErrUnsupportedClient", err)
	}
}

// shardOptions returns the options of whichever of a and b listens on addr.
func shardOptions(a, b *redistest.Server, addr string) *redis.Options {
	if a.Addr() == addr {
		return a.Options()
	}
	return b.Options()
}

func TestRedisOptions(t *testing.T) {
	o, err := RedisOptions("rediss://app:s3cret@cache.example:6380/2", 0)
	if err != nil {
		t.Fatal(err)
	}
	if o.Username != "app" || o.Password != "s3cret" || o.DB != 2 || o.TLSConfig == nil || o.Addr != "cache.example:6380" {
		t.Fatalf("parsed %+v", o)
	}
	if !o.ContextTimeoutEnabled || o.DialTimeout != time.Second || o.MaxRetries != -1 || o.PoolTimeout > 200*time.Millisecond {
		t.Fatalf("cache settings not applied: %+v", o)
	}
	_, err = RedisOptions("http://app:s3cret@host", 0)
	if err == nil {
		t.Fatal("an http URL was accepted")
	}
	if strings.Contains(err.Error(), "s3cret") {
		t.Fatalf("the error echoes the password: %v", err)
	}
}

// TestSecretClearVoidsOneNamespace: under a Bus Secret a received flush's
// generation is re-read from Redis (the tag cannot cover it), and only the
// flushed namespace's L1 is voided; another namespace on the same Bus keeps
// serving from L1.
func TestSecretClearVoidsOneNamespace(t *testing.T) {
	s := redistest.Shared(t)
	bo := invalidate.Options{Secret: []byte("0123456789abcdef-shared-secret")}
	opts := Options{KeyPrefix: s.Prefix()}
	ns1, ns2 := namespace(t), namespace(t)
	type pair struct{ one, two *Cache[string] }
	mk := func() pair {
		rdb := s.Client(t)
		bus := newBus(t, standalone{s}, rdb, bo)
		var p pair
		var err error
		if p.one, err = New[string](ns1, rdb, bus, opts); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.one.Close() })
		if p.two, err = New[string](ns2, rdb, bus, opts); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.two.Close() })
		return p
	}
	a, b := mk(), mk()
	ctx := ctxT(t)
	for _, c := range []*Cache[string]{a.one, a.two} {
		if err := c.Set(ctx, "k", "v", 0); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []*Cache[string]{b.one, b.two} {
		mustGet(t, c, "k", "v", "B before the clear")
		mustGet(t, c, "k", "v", "B from L1")
	}
	flushed := applied(b.one)
	if err := a.one.Clear(ctx); err != nil {
		t.Fatal(err)
	}
	await(t, flushed, "B applying the authenticated flush")
	if _, ok, err := b.one.Get(ctx, "k"); err != nil || ok {
		t.Fatalf("B's cleared namespace: ok %v err %v; want a miss", ok, err)
	}
	if b.one.nsGen.Load() != a.one.nsGen.Load() {
		t.Fatalf("B's generation %d, A's %d: the flush did not resync it", b.one.nsGen.Load(), a.one.nsGen.Load())
	}
	hits := b.two.Stats().L1.Hits
	mustGet(t, b.two, "k", "v", "B's other namespace")
	if b.two.Stats().L1.Hits != hits+1 {
		t.Fatal("the other namespace's L1 was voided by the flush")
	}
}

// TestDegradedEntryUsesRealClock: an entry filled while the stream is
// untrusted lives DegradedL1TTL by the real clock, even when the coarse
// clock has stopped advancing (its goroutine starved in a loaded process):
// that TTL is the entry's only staleness bound.
func TestDegradedEntryUsesRealClock(t *testing.T) {
	s := redistest.Start(t)
	a := direct[string](t, s, namespace(t), Options{CommandTimeout: 100 * time.Millisecond, DegradedL1TTL: 100 * time.Millisecond}, faultBus)
	ctx := ctxT(t)
	s.Stop(t)
	eventually(t, 5*time.Second, "the Bus to notice Redis is gone", func() bool { return !a.bus.Live() })
	src := &versioned{}
	if _, err := a.c.Remember(ctx, "k", src.load); err != nil {
		t.Fatal(err)
	}
	if _, err := a.c.Remember(ctx, "k", src.load); err != nil || src.calls.Load() != 1 {
		t.Fatalf("the degraded entry was not kept: %d loads, %v", src.calls.Load(), err)
	}
	// The coarse clock stops here, as if its goroutine were starved.
	a.c.clk.stopClock()
	time.Sleep(150 * time.Millisecond) // real time passing is the point
	if _, err := a.c.Remember(ctx, "k", src.load); err != nil {
		t.Fatal(err)
	}
	if n := src.calls.Load(); n != 2 {
		t.Fatalf("%d loads: the degraded entry outlived DegradedL1TTL by the real clock", n)
	}
}

// splitInstance is an instance whose cache reaches Redis through a fault
// proxy while its Bus does not: a cut fails the cache's writes but leaves
// the stream live, so nothing but the cache itself replays its outbox.
func splitInstance(t *testing.T, s *redistest.Server, ns string, opts Options, bo invalidate.Options) (*instance[string], *faultproxy.Proxy) {
	t.Helper()
	p, err := faultproxy.Start(s.Addr())
	if err != nil {
		t.Fatalf("faultproxy: %v", err)
	}
	t.Cleanup(func() { p.Close() })
	o := s.Options()
	o.Addr = p.Addr()
	o.DialTimeout = 200 * time.Millisecond
	rdb := redis.NewClient(o)
	t.Cleanup(func() { rdb.Close() })
	if opts.KeyPrefix == "" {
		opts.KeyPrefix = s.Prefix()
		if opts.PlainJSON {
			opts.KeyPrefix += "plain:" // a prefix of its own (see Options.PlainJSON)
		}
	}
	bus := newBus(t, standalone{s}, s.Client(t), bo)
	c, err := New[string](ns, rdb, bus, opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return &instance[string]{rdb: rdb, bus: bus, c: c}, p
}

// A process that stops while its failed writes' invalidations wait in the
// outbox replays them as its cache shuts down: another instance stops
// serving what they replaced. Its circuit is open with an hour's cooldown
// and its stream never broke, so nothing else would replay them.
func TestShutdown_ReplaysOutbox(t *testing.T) {
	s := redistest.Start(t)
	ns := namespace(t)
	opts := Options{CommandTimeout: 100 * time.Millisecond}
	bo := faultBus
	bo.BreakerThreshold, bo.BreakerCooldown = 1, time.Hour
	a, p := splitInstance(t, s, ns, opts, bo)
	b := direct[string](t, s, ns, opts, faultBus)
	ctx := ctxT(t)
	if err := b.c.Set(ctx, "k", "old", 0); err != nil {
		t.Fatal(err)
	}
	mustGet(t, b.c, "k", "old", "B")
	mustGet(t, b.c, "k", "old", "B from L1")
	p.Refuse(true)
	p.Cut()
	if err := a.c.Set(ctx, "k", "new", 0); err == nil {
		t.Fatal("Set through a cut proxy returned nil")
	}
	if !a.bus.Pending(ns, "k") || !a.bus.CircuitOpen() {
		t.Fatalf("after the failed Set: pending %v, circuit open %v; want both", a.bus.Pending(ns, "k"), a.bus.CircuitOpen())
	}
	p.Refuse(false)
	mustGet(t, b.c, "k", "old", "B before A shuts down")
	bApplied := applied(b.c)
	if err := a.c.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown with Redis reachable again: %v", err)
	}
	await(t, bApplied, "B applying the invalidation A replayed as it shut down")
	if v, ok, err := b.c.Get(ctx, "k"); err != nil || ok {
		t.Fatalf("B after A's shutdown: %q, %v, %v; want a miss (A's replay left a tombstone)", v, ok, err)
	}
	if st := a.bus.Stats(); st.OutboxDepth != 0 || st.Replayed != 1 || st.OutboxDropped != 0 {
		t.Fatalf("A's Bus after the shutdown: depth %d replayed %d dropped %d; want 0, 1, 0", st.OutboxDepth, st.Replayed, st.OutboxDropped)
	}
	if _, _, err := a.c.Get(ctx, "k"); !errors.Is(err, ErrClosed) {
		t.Fatalf("Get after Shutdown: %v; want ErrClosed", err)
	}
}

// When Redis is still unreachable, Close gives up after twice
// CommandTimeout: it drops the entries, says so in the log and in the Bus's
// counters, and returns ErrOutboxDropped, once.
func TestClose_ReportsDroppedOutbox(t *testing.T) {
	s := redistest.Start(t)
	ns := namespace(t)
	opts := Options{CommandTimeout: 100 * time.Millisecond}
	bo := faultBus
	bo.BreakerThreshold, bo.BreakerCooldown = 1, time.Hour
	logs := &lockedBuffer{}
	bo.Logger = slog.New(slog.NewTextHandler(logs, nil))
	a, p := splitInstance(t, s, ns, opts, bo)
	ctx := ctxT(t)
	p.Refuse(true)
	p.Cut()
	if err := a.c.Delete(ctx, "k1"); err == nil {
		t.Fatal("Delete through a cut proxy returned nil")
	}
	if err := a.c.Set(ctx, "k2", "v", 0); err == nil {
		t.Fatal("Set through a cut proxy returned nil")
	}
	start := time.Now()
	err := a.c.Close()
	if !errors.Is(err, invalidate.ErrOutboxDropped) {
		t.Fatalf("Close with 2 invalidations unreplayable: %v; want ErrOutboxDropped", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("Close took %v; its replay is bounded by 2 x CommandTimeout", d)
	}
	if !strings.Contains(err.Error(), "2 invalidations") {
		t.Fatalf("Close's error does not say how many were dropped: %v", err)
	}
	if st := a.bus.Stats(); st.OutboxDropped != 2 || st.OutboxDepth != 0 || st.Replayed != 0 {
		t.Fatalf("A's Bus after Close: dropped %d depth %d replayed %d; want 2, 0, 0", st.OutboxDropped, st.OutboxDepth, st.Replayed)
	}
	if !strings.Contains(logs.String(), "outbox entries dropped unreplayed") {
		t.Fatalf("the drop was not logged:\n%s", logs.String())
	}
	if err := a.c.Close(); err != nil {
		t.Fatalf("second Close: %v; want nil", err)
	}
}

// Close's replay is bounded even while the Bus's outbox goroutine is busy
// replaying another namespace (held here in that cache's Replay): Close
// waits for it only as long as its own bound, then drops and reports.
func TestClose_BoundedWhileAnotherReplayRuns(t *testing.T) {
	s := redistest.Start(t)
	ns := namespace(t)
	opts := Options{CommandTimeout: 100 * time.Millisecond}
	bo := faultBus
	bo.BreakerThreshold = -1
	a := direct[string](t, s, ns+"-a", opts, bo)
	b, err := New[string](ns+"-b", a.rdb, a.bus, Options{CommandTimeout: opts.CommandTimeout, KeyPrefix: s.Prefix()})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { b.Close() })
	reached, release := make(chan struct{}), make(chan struct{})
	var once, releaseOnce sync.Once
	b.mu.Lock()
	b.beforeReplay = func() {
		once.Do(func() { close(reached) })
		<-release
	}
	b.mu.Unlock()
	t.Cleanup(func() { releaseOnce.Do(func() { close(release) }) })
	a.bus.Defer(b.name, "held")
	await(t, reached, "the outbox goroutine replaying the other namespace")
	a.bus.Defer(a.c.name, "k") // a's failed write, while that replay holds the outbox
	// Without the bound Close would wait for the held replay for ever:
	// release it after 3 s so that such a Close fails instead of hanging.
	valve := time.AfterFunc(3*time.Second, func() { releaseOnce.Do(func() { close(release) }) })
	t.Cleanup(func() { valve.Stop() })
	start := time.Now()
	err = a.c.Close()
	if d := time.Since(start); d > 2*opts.CommandTimeout+300*time.Millisecond {
		t.Fatalf("Close took %v while another namespace's replay ran; its bound is %v", d, 2*opts.CommandTimeout)
	}
	if !errors.Is(err, invalidate.ErrOutboxDropped) {
		t.Fatalf("Close that could not replay in time: %v; want ErrOutboxDropped", err)
	}
}

// An outbox holding more keys than one invalidation message can carry
// (300 of 4,000 bytes: over invalidate.MaxMessageSize) replays them in
// parts. Before, the replay failed for ever, and since the Bus replays the
// outbox before it trusts a new subscription, a Bus whose subscription
// dropped never went live again: every Get failed with ErrCircuitOpen
// while Redis was healthy.
func TestOutbox_ReplaySplitsByMessageSize(t *testing.T) {
	s := redistest.Start(t)
	a, _, fail := failingInstance(t, s, namespace(t), Options{MaxKeyLen: 4096})
	ctx := ctxT(t)
	items := map[string]string{}
	for i := range 300 {
		items[strconv.Itoa(1000+i)+strings.Repeat("k", 3996)] = "v"
	}
	fail.Store(true)
	if err := a.c.SetMany(ctx, items, 0); err == nil {
		t.Fatal("SetMany while Redis fails: no error")
	}
	fail.Store(false)
	if n := a.bus.OutboxDepth(); n != 300 {
		t.Fatalf("outbox depth after the failed SetMany = %d, want 300", n)
	}
	epoch := a.bus.Epoch()
	t.Logf("killed %d", s.KillPubSub(t))
	eventually(t, 2*time.Second, "the Bus to notice the killed subscription", func() bool { return a.bus.Epoch() != epoch })
	waitLiveT(t, a.bus, 5*time.Second)
	if st := a.bus.Stats(); st.OutboxDepth != 0 || st.Replayed != 300 {
		t.Fatalf("after the Bus went live: outbox depth %d, replayed %d; want 0, 300", st.OutboxDepth, st.Replayed)
	}
	key := "1000" + strings.Repeat("k", 3996)
	if v, ok, err := a.c.Get(ctx, key); err != nil || ok {
		t.Fatalf("Get(replayed key) = %q, %v, %v; want a miss (the replay left a tombstone)", v, ok, err)
	}
}

// A batch call that makes no round trip (DeleteMany of no keys, SetMany of
// an empty map, GetMany whose every key is pending in the outbox) reports
// nothing to the circuit breaker. Before, it reported a success, which
// reset the count of failures in a row: interleaved with Gets that time
// out against a slow Redis, such calls kept the circuit from ever opening.
func TestBreaker_NoopBatchesReportNothing(t *testing.T) {
	noops := []struct {
		name string
		call func(ctx context.Context, c *Cache[string]) error
	}{
		{"DeleteMany of no keys", func(ctx context.Context, c *Cache[string]) error { return c.DeleteMany(ctx) }},
		{"SetMany of no items", func(ctx context.Context, c *Cache[string]) error { return c.SetMany(ctx, nil, 0) }},
		{"GetMany of pending keys", func(ctx context.Context, c *Cache[string]) error {
			_, err := c.GetMany(ctx, []string{"p1", "p2"})
			return err
		}},
	}
	for _, noop := range noops {
		t.Run(noop.name, func(t *testing.T) {
			s := redistest.Start(t)
			ns := namespace(t)
			opts := Options{CommandTimeout: 100 * time.Millisecond}
			bo := faultBus
			bo.HeartbeatInterval, bo.HeartbeatTimeout = time.Second, 5*time.Second
			a, p := proxied[string](t, s, ns, opts, bo)
			ctx := ctxT(t)
			// p1 and p2 stay pending: the outbox's replay of them is held
			// (and reports nothing to the breaker meanwhile).
			reached, release := make(chan struct{}), make(chan struct{})
			var once sync.Once
			a.c.mu.Lock()
			a.c.beforeReplay = func() {
				once.Do(func() { close(reached) })
				<-release
			}
			a.c.mu.Unlock()
			t.Cleanup(func() { close(release) })
			a.bus.Defer(ns, "p1", "p2")
			await(t, reached, "the outbox's replay of p1 and p2")
			p.SetLatency(150 * time.Millisecond)
			fails := 0
			for i := range 9 {
				if _, _, err := a.c.Get(ctx, "miss"+strconv.Itoa(i)); err != nil {
					fails++
				}
				if i%2 == 1 {
					if err := noop.call(ctx, a.c); err != nil {
						t.Fatalf("%s: %v", noop.name, err)
					}
				}
			}
			if !a.bus.CircuitOpen() {
				t.Fatalf("circuit closed after %d of 9 Gets timed out against a slow Redis (threshold 3), with a %s in between", fails, noop.name)
			}
		})
	}
}

// failHook fails every command of a client while on is set, as a Redis
// that stopped answering would, without touching the Bus's connection.
type failHook struct{ on *atomic.Bool }

func (failHook) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h failHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if h.on.Load() {
			err := &net.OpError{Op: "read", Err: errors.New("test: Redis does not answer")}
			cmd.SetErr(err)
			return err
		}
		return next(ctx, cmd)
	}
}

func (h failHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if h.on.Load() {
			err := &net.OpError{Op: "read", Err: errors.New("test: Redis does not answer")}
			for _, c := range cmds {
				c.SetErr(err)
			}
			return err
		}
		return next(ctx, cmds)
	}
}

// failingInstance is an instance whose Bus goes through a fault proxy (cut
// it and the stream dies) and whose cache's commands fail while fail is
// set. Its breaker stays closed.
func failingInstance(t *testing.T, s *redistest.Server, ns string, opts Options) (*instance[string], *faultproxy.Proxy, *atomic.Bool) {
	t.Helper()
	busRdb, p := proxyClient(t, s)
	bo := faultBus
	bo.BreakerThreshold = 1000
	bus := newBus(t, standalone{s}, busRdb, bo)
	rdb := s.Client(t)
	fail := new(atomic.Bool)
	rdb.AddHook(failHook{fail})
	if opts.KeyPrefix == "" {
		opts.KeyPrefix = s.Prefix()
		if opts.PlainJSON {
			opts.KeyPrefix += "plain:" // a prefix of its own (see Options.PlainJSON)
		}
	}
	c, err := New[string](ns, rdb, bus, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &instance[string]{rdb: rdb, bus: bus, c: c}, p, fail
}

// stripeMate returns a key other than key in key's L1 stripe.
func stripeMate(key string) string {
	for i := 0; ; i++ {
		if k := "mate" + strconv.Itoa(i); k != key && hashKey(k)&stripeMask == hashKey(key)&stripeMask {
			return k
		}
	}
}

// TestDegraded_LocalValues: what L1 keeps while Redis cannot answer (under
// an untrusted stream) keeps its DegradedL1TTL bound and nothing else:
//   - it gets no fresh period of its own, whose refresh would take what
//     Redis holds, older than what the source gave (a review found this in
//     the first version of ModeMemory's fresh period);
//   - a refresh of it in plain-JSON mode does not read a write ID out of a
//     short plain value (that version panicked on one);
//   - a RememberMany of an absent key does not void its stripe (that
//     version did, losing the values kept there);
//   - a RememberMany whose read of the namespace generation fails goes to
//     the loader, as Remember does (before, it returned the error).
func TestDegraded_LocalValues(t *testing.T) {
	t.Run("no going back after FreshFor", func(t *testing.T) {
		s := redistest.Start(t)
		ns := namespace(t)
		opts := Options{FreshFor: 50 * time.Millisecond, TTL: time.Hour, DegradedL1TTL: 10 * time.Second, CommandTimeout: 200 * time.Millisecond}
		a, p, fail := failingInstance(t, s, ns, opts)
		peer := direct[string](t, s, ns, Options{TTL: time.Hour}, faultBus)
		ctx := ctxT(t)
		if err := peer.c.Set(ctx, "k", "old", 0); err != nil {
			t.Fatal(err)
		}
		src := newSource()
		src.put("k", "new") // the source moved on; Redis still holds "old" (a writer's failed Set waits in its outbox)
		p.Refuse(true)
		p.Cut()
		eventually(t, 5*time.Second, "A's stream to die", func() bool { return !a.bus.Live() })
		fail.Store(true)
		if v, err := a.c.Remember(ctx, "k", src.load); err != nil || v != "new" {
			t.Fatalf("Remember with Redis down = %q, %v; want the source's value", v, err)
		}
		fail.Store(false)
		for end := time.Now().Add(300 * time.Millisecond); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
			if v, err := a.c.Remember(ctx, "k", src.load); err != nil || v != "new" {
				t.Fatalf("Remember within DegradedL1TTL = %q, %v; went back from the source's value", v, err)
			}
		}
	})
	t.Run("plain JSON refresh", func(t *testing.T) {
		s := redistest.Start(t)
		ns := namespace(t)
		opts := Options{PlainJSON: true, FreshFor: 50 * time.Millisecond, TTL: time.Hour, CommandTimeout: 200 * time.Millisecond}
		a := direct[string](t, s, ns, opts, faultBus)
		ctx := ctxT(t)
		if err := a.c.Set(ctx, "k", "a", 0); err != nil { // `"a"`: 3 bytes in Redis
			t.Fatal(err)
		}
		load := func(context.Context, string) (string, error) { return "loaded", nil }
		for _, replace := range []uint64{writeID(), 0} { // a refresh of a value L1 kept alone; a load
			h := hashKey("k")
			r, err := a.c.readThrough(ctx, "k", a.c.snap(h), load, replace)
			if err != nil || !r.found || r.val != "a" {
				t.Fatalf("readThrough(replace %x) = %+v, %v; want Redis's value", replace, r, err)
			}
			many, err := a.c.readThroughMany(ctx, []string{"k"}, map[string]snapshot{"k": a.c.snap(h)},
				func(context.Context, []string) (map[string]string, error) {
					return map[string]string{"k": "loaded"}, nil
				},
				map[string]uint64{"k": replace})
			if got := many[rememberKey("k")]; err != nil || !got.found || got.val != "a" {
				t.Fatalf("readThroughMany(replace %x) = %+v, %v; want Redis's value", replace, got, err)
			}
		}
	})
	t.Run("a memory-mode Set lives DegradedL1TTL", func(t *testing.T) {
		// SetMode(ModeMemory) while the stream is dead: no invalidation
		// can reach what Set keeps (before, it lived L1TTL).
		s := redistest.Start(t)
		a, p := proxied[string](t, s, namespace(t), Options{TTL: time.Hour, DegradedL1TTL: 200 * time.Millisecond, CommandTimeout: 200 * time.Millisecond}, faultBus)
		ctx := ctxT(t)
		if err := a.c.SetMode(ModeMemory); err != nil {
			t.Fatal(err)
		}
		p.Refuse(true)
		p.Cut()
		eventually(t, 5*time.Second, "A's stream to die", func() bool { return !a.bus.Live() })
		if err := a.c.Set(ctx, "k", "written", 0); err != nil {
			t.Fatal(err)
		}
		if v, ok, err := a.c.Get(ctx, "k"); !ok || err != nil || v != "written" {
			t.Fatalf("Get after the Set = %q, %v, %v", v, ok, err)
		}
		eventually(t, 5*time.Second, "the value to end with DegradedL1TTL", func() bool {
			_, ok, _ := a.c.Get(ctx, "k")
			return !ok
		})
	})
	t.Run("absent key keeps its stripe", func(t *testing.T) {
		s := redistest.Start(t)
		ns := namespace(t)
		opts := Options{CommandTimeout: 200 * time.Millisecond, DegradedL1TTL: 10 * time.Second}
		a, p, fail := failingInstance(t, s, ns, opts)
		ctx := ctxT(t)
		p.Refuse(true)
		p.Cut()
		eventually(t, 5*time.Second, "A's stream to die", func() bool { return !a.bus.Live() })
		fail.Store(true)
		src := newSource()
		src.put("kept", "v")
		if v, err := a.c.Remember(ctx, "kept", src.load); err != nil || v != "v" {
			t.Fatalf("Remember = %q, %v", v, err)
		}
		if _, ok := a.c.peekL1("kept"); !ok {
			t.Fatal("the load was not kept for DegradedL1TTL")
		}
		mate := stripeMate("kept")
		if got, err := a.c.RememberMany(ctx, []string{mate}, src.batch(new([][]string), new(sync.Mutex))); err != nil || len(got) != 0 {
			t.Fatalf("RememberMany(%s) = %v, %v; want nothing", mate, got, err)
		}
		if _, err := a.c.Remember(ctx, mate, src.load); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Remember(%s) = %v; want ErrNotFound", mate, err)
		}
		if _, ok := a.c.peekL1("kept"); !ok {
			t.Error("loads of an absent key in the same stripe voided the kept value")
		}
	})
}

// TestClose_ReplaysWriteInFlight: a write still inside the cache when Close
// begins leaves its invalidation in the outbox (here through ModeMemory,
// whose every Set goes there), and Close's last replay must see it: Close
// waits for the calls inside before replaying. Before, it replayed first,
// then dropped the write's invalidation with Redis up, and B kept serving
// the value A had replaced.
func TestClose_ReplaysWriteInFlight(t *testing.T) {
	ns := namespace(t)
	a := direct[string](t, srv, ns, Options{}, faultBus)
	b := direct[string](t, srv, ns, Options{}, faultBus)
	ctx := ctxT(t)
	if err := a.c.Set(ctx, "k", "v1", 0); err != nil {
		t.Fatal(err)
	}
	mustGet(t, b.c, "k", "v1", "B")
	mustGet(t, b.c, "k", "v1", "B from L1")
	if err := a.c.SetMode(ModeMemory); err != nil { // the CACHE_TYPE rollback, live
		t.Fatal(err)
	}
	inside, release := make(chan struct{}), make(chan struct{})
	a.c.mu.Lock()
	a.c.beforeMemoryStore = func(string) { close(inside); <-release }
	a.c.mu.Unlock()
	setDone := make(chan error, 1)
	go func() { setDone <- a.c.Set(ctx, "k", "v2", 0) }()
	await(t, inside, "A's Set inside the cache")
	closeDone := make(chan error, 1)
	go func() { closeDone <- a.c.Close() }()
	eventually(t, 5*time.Second, "Close to have begun", a.c.closing.Load)
	close(release)
	if err := <-setDone; err != nil {
		t.Fatalf("Set: %v", err)
	}
	if err := <-closeDone; err != nil {
		t.Fatalf("Close with Redis up = %v; want its last replay to have sent the invalidation of the write in flight", err)
	}
	eventually(t, 5*time.Second, "B to drop v1", func() bool {
		v, ok, err := b.c.Get(ctx, "k")
		return err == nil && (!ok || v != "v1")
	})
}

// TestSetMode_GetInFlightKeepsNoRedisValueOverMemoryWrite: a Get (or
// GetMany) that missed L1 finds the cache tiered; then (forced through the
// seams) SetMode(ModeMemory) switches it and a memory-mode Set of the key
// voids it; the read looks in L1 (nothing yet) and reads Redis; the Set
// stores its value and returns; only then does the read fill. The read may
// answer what Redis held (it was concurrent with both), but its fill must
// not replace the completed Set's value in L1: later reads, in memory mode,
// must not see Redis's older value. Before, the read's fence snapshot was
// taken after its mode check, after both the switch's and the Set's bumps,
// so its fill passed the fence and L1 served the old value until L1TTL.
func TestSetMode_GetInFlightKeepsNoRedisValueOverMemoryWrite(t *testing.T) {
	// GetMany asks whether its keys are pending after the seam (readL2's
	// skipPending), and the memory-mode Set defers its key before it
	// stores, so GetMany skips Redis and misses: nothing stale either way.
	// Get asks only before the seam; its snapshot is what voids its fill.
	reads := map[string]struct {
		read    func(ctx context.Context, c *Cache[string], key string) (string, bool, error)
		mayMiss bool
	}{
		"Get": {read: func(ctx context.Context, c *Cache[string], key string) (string, bool, error) {
			return c.Get(ctx, key)
		}},
		"GetMany": {read: func(ctx context.Context, c *Cache[string], key string) (string, bool, error) {
			m, err := c.GetMany(ctx, []string{key})
			v, ok := m[key]
			return v, ok, err
		}, mayMiss: true},
	}
	for name, r := range reads {
		t.Run(name, func(t *testing.T) {
			testGetInFlightKeepsNoRedisValueOverMemoryWrite(t, r.read, r.mayMiss)
		})
	}
}

func testGetInFlightKeepsNoRedisValueOverMemoryWrite(t *testing.T, get func(ctx context.Context, c *Cache[string], key string) (string, bool, error), mayMiss bool) {
	c := newCache[string](t, Options{TTL: time.Hour, L1TTL: time.Hour})
	ctx := ctxT(t)
	const key = "k"
	if err := c.Set(ctx, key, "redis", 0); err != nil {
		t.Fatal(err)
	}
	inStore, store := make(chan struct{}), make(chan struct{})
	setDone := make(chan error, 1)
	var switched, read atomic.Bool
	var release sync.Once
	finishSet := func() {
		release.Do(func() {
			close(store)
			if err := <-setDone; err != nil {
				t.Errorf("Set in memory mode: %v", err)
			}
		})
	}
	c.mu.Lock()
	c.beforeMemoryStore = func(string) { close(inStore); <-store }
	c.afterModeCheck = func(string) {
		if switched.Swap(true) {
			return
		}
		if err := c.SetMode(ModeMemory); err != nil {
			t.Error(err)
		}
		go func() { setDone <- c.Set(ctx, key, "memory", 0) }()
		await(t, inStore, "the memory-mode Set past its invalidation")
	}
	c.afterL2Read = func(string) {
		if !read.Swap(true) {
			finishSet()
		}
	}
	// The outbox replays the Set's deferred key (a tombstone in Redis) as
	// soon as it can; held until the read is done, so that the read finds
	// Redis's old value, not the tombstone.
	firstRead := make(chan struct{})
	c.beforeReplay = func() { <-firstRead }
	c.mu.Unlock()
	v, ok, err := get(ctx, c, key)
	close(firstRead)
	if !switched.Load() || c.CurrentMode() != ModeMemory {
		t.Fatal("the seams did not run: the read did not cross the switch and the write")
	}
	finishSet() // if the read skipped Redis (the key pending), the Set is still held
	switch {
	case err != nil:
		t.Fatalf("read concurrent with the switch and the write: %v", err)
	case !read.Load() && !mayMiss:
		t.Fatal("the read did not read Redis across the switch and the write")
	case ok && v != "redis", !ok && !mayMiss:
		t.Fatalf("read concurrent with the switch and the write = %q, %v; want %q", v, ok, "redis")
	}
	for range 3 {
		if v, ok, err := get(ctx, c, key); err != nil || (ok && v != "memory") {
			t.Fatalf("read after the memory-mode Set returned = %q, %v, %v; want %q (or a miss)", v, ok, err, "memory")
		}
	}
}
