package tiered

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/cespare/xxhash/v2"
	"github.com/dgraph-io/ristretto/v2"
	"github.com/redis/go-redis/v9"

	"github.com/tiercache/tiercache/internal/flight"
	"github.com/tiercache/tiercache/internal/pcount"
	"github.com/tiercache/tiercache/internal/wire"
	"github.com/tiercache/tiercache/invalidate"
	"github.com/tiercache/tiercache/metrics"
)

// stripeCount is the number of invalidation counters per cache. A key's
// stripe is the low bits of its hash; an invalidation bumps the stripe and
// so voids every L1 entry of that stripe filled before it. 65,536 counters
// (512 KiB) keep false invalidations rare.
const (
	stripeCount = 1 << 16
	stripeMask  = stripeCount - 1
	entryCost   = 64 // bytes charged per L1 entry beyond key and payload
)

// entry is what L1 holds: the decoded value plus the fence snapshot taken
// before the read that produced it. It is immutable once stored, but for
// gone and pseq, the hot index's (see hot.go).
type entry[V any] struct {
	// The fields a hit reads come first (the fence's, then the value), so
	// that a hit touches as few cache lines of the entry as its V allows.
	key      string
	expires  int64 // coarse-clock unix ns
	stripe   uint32
	gone     atomic.Bool // ristretto let go of it (see hotIndex)
	negative bool        // the loader said the key is absent at the source
	ns       uint64
	epoch    uint64
	pseq     atomic.Uint64 // its hot-index slot's miss count when it was promoted
	val      V

	raw  []byte // the encoded payload, kept only with CopyOnRead
	cost int64
	// fresh is when the value goes stale (unix ns; 0: never, before its
	// expiry), and wid its write ID in Redis: what a refresh must replace.
	fresh int64
	wid   uint64
	eager int64  // when a Remember hit starts a background refresh (EagerRefresh); 0: never
	hash  uint64 // xxhash of key: the entry's hot-index slot (set by store)
}

// snapshot is the fence state read before an L2 read or a load.
type snapshot struct {
	stripe    uint32
	ns, epoch uint64
}

// Cache is a two-tier cache of values of type V for one namespace: an L1 in
// process memory in front of Redis, kept coherent across instances by an
// invalidate.Bus. See the package documentation for its guarantees.
//
// All methods are safe for concurrent use. Values returned by reads are
// shared with the cache and other callers: treat them as read-only, or set
// Options.CopyOnRead.
type Cache[V any] struct {
	name string
	opts Options
	rdb  redis.UniversalClient // nil in ModeMemory
	bus  *invalidate.Bus       // nil in ModeMemory
	l1   *ristretto.Cache[uint64, *entry[V]]
	hot  hotIndex[V]  // lock-free index of ristretto's entries; see hot.go
	clk  *coarseClock // nil without L1; it advances now
	// now is the coarse clock's reading, kept in the cache itself so that a
	// hit reads it without following a pointer.
	now atomic.Int64
	// hits counts L1 hits: one cell per P, so a hit writes no shared line.
	hits pcount.Counter
	// throttle holds, per key, when a failed refresh may be retried
	// (Options.RetryThrottle); entries go when a refresh succeeds, or are
	// swept once expired (holdOff).
	throttle sync.Map
	swept    atomic.Int64 // when throttle was last swept of expired entries (unix ns)

	stripes []atomic.Uint32 // 32 bits: half the cache footprint; a wrap within an entry's life is out of reach
	nsEpoch atomic.Uint64   // bumped by Clear and received flushes
	nsGen   atomic.Uint64   // the namespace's L2 generation (part of every key); written under genMu
	genMu   sync.Mutex      // orders the writes of nsGen (see resync)
	// genKnown: nsGen has been read from Redis (flushes and Clears only
	// advance a known one). Until then (New could not read it, or a Clear
	// failed: forgetGen) each call reads it (generation).
	genKnown atomic.Bool
	base     string // <prefix><name>:<schema>:
	genKey   string
	tags     []string // the Bus's shard tags; nil with classic pub/sub

	flights    *flight.Group[readResult[V]]
	unregister func() (dropped int)

	// forced is set by SetMode(ModeMemory): run on L1 alone.
	forced atomic.Bool
	// lastReload is when a ClusterClient's slot map was last reloaded
	// after a failure (unix ns; see reloadCluster).
	lastReload atomic.Int64

	// closing is set first by Close so new calls fail fast; mu's write lock
	// then waits for the slow-path calls already inside.
	closing   atomic.Bool
	mu        sync.RWMutex
	closeOnce sync.Once
	// finalReplay is set by Shutdown, under mu's write lock, once the calls
	// inside have drained, while it replays what they left in the outbox:
	// the handler's Replay is admitted then, although closing is set.
	finalReplay atomic.Bool
	start       time.Time

	st  counters
	tel *metrics.Cache

	// afterL2Read, when set by a test, runs between an L2 read and the L1
	// store of its result: the seam for forcing fill races.
	afterL2Read func(key string)
	// beforeDefer, when set by a test, runs as a write (failed, or in
	// memory mode) is about to put its keys in the outbox (nil keys: a
	// namespace flush).
	beforeDefer func(keys []string)
	// beforeReplay, when set by a test, runs as an outbox replay of this
	// cache starts (after it is admitted).
	beforeReplay func()
	// afterApply, when set by a test, runs after a received message has
	// been applied: the signal tests await instead of sleeping.
	afterApply func()
	// beforeL1Store, when set by a test, runs after a fill has passed its
	// pre-check and right before the ristretto Set: the seam for proving that
	// validation on read catches what slips past the pre-check.
	beforeL1Store func(key string)
	// beforeMemoryStore, when set by a test, runs as a memory-mode write
	// (Set, SetMany) of key, after its mode check and its invalidation of
	// key, is about to store it in L1: the seam for racing SetMode and
	// reads.
	beforeMemoryStore func(key string)
	// beforeHotExit, when set by a test, runs in ristretto's OnExit before
	// the hot index hears of the exit.
	beforeHotExit atomic.Pointer[func(*entry[V])]
	// flightStart runs when a read flight's goroutine starts, and
	// beforeApply before a received invalidation is applied: seams for
	// forcing a flight to start late and an invalidation to arrive late.
	flightStart func(key string)
	beforeApply func()
	// beforeFlush, when set by a test, runs as a received namespace flush
	// is about to be applied.
	beforeFlush func()
	// beforeJoinRefresh, when set by a test, runs in a stale Remember hit
	// that waits for its refresh (SoftTimeout), between starting the
	// refresh and joining it.
	beforeJoinRefresh func(key string)
	// beforeRefreshPeek, when set by a test, runs in a stale Remember hit
	// that found no refresh to join, before it looks in L1 for what a
	// refresh that finished first stored there.
	beforeRefreshPeek func(key string)
	// beforeRefreshGo, when set by a test, runs in a refresh of key that
	// found it not held off (RetryThrottle), before it starts its flight.
	beforeRefreshGo func(key string)
	// afterModeCheck, when set by a test, runs in a Get or GetMany that
	// missed L1 for key once it has found the cache not memory-only (and the
	// key not pending), before its flight: the seam for racing SetMode.
	afterModeCheck func(key string)
}

type readResult[V any] struct {
	val      V
	found    bool
	negative bool   // Remember: the source said the key is absent
	stale    bool   // Remember: past its fresh period; the caller refreshes it
	wid      uint64 // with stale: the write a refresh replaces
	// err is this key's own failure in a run of several keys whose others
	// were answered (RememberMany's loader failed; the keys Redis had are
	// not its to fail): the run itself returns no error.
	err error
}

// New returns a Cache for namespace name (1-255 bytes, no ':', '{' or '}').
// rdb and bus are required in ModeTiered and ModeRedis and may be nil in
// ModeMemory. rdb is a *redis.Client or a *redis.ClusterClient (a Ring is
// refused: ErrUnsupportedClient) that honours context deadlines
// (ErrContextTimeouts). Many caches may share one client and one Bus; the
// Cache does not close either. Call Close when done.
//
// New does not need Redis to answer: when it cannot read the namespace's
// generation (Redis down at start), the cache starts anyway, reads the
// generation on each call until it has one, and meanwhile serves what the
// Bus's state allows (Remember goes to its loader while Redis is down).
func New[V any](name string, rdb redis.UniversalClient, bus *invalidate.Bus, opts Options) (*Cache[V], error) {
	if name == "" || len(name) > 255 {
		return nil, fmt.Errorf("tiered: namespace length %d out of range 1..255", len(name))
	}
	if !utf8.ValidString(name) || strings.ContainsAny(name, ":{}") {
		return nil, fmt.Errorf("tiered: namespace %q must be UTF-8 without ':', '{' or '}'", name)
	}
	if opts.Mode == ModeRedis && bus == nil {
		return nil, errors.New("tiered: ModeRedis needs a Bus so writes reach other instances")
	}
	opts, err := opts.withDefaults(bus)
	if err != nil {
		return nil, err
	}
	c := &Cache[V]{
		hits:    pcount.New(),
		name:    name,
		opts:    opts,
		stripes: make([]atomic.Uint32, stripeCount),
		base:    opts.KeyPrefix + name + ":" + opts.Schema + ":",
		flights: flight.New[readResult[V]](),
		start:   time.Now(),
	}
	c.genKey = c.base + "nsgen"
	if opts.Mode == ModeTiered && opts.L1TTL > 0 {
		// Two reads of one key must not race to fill L1 (see fill); without
		// L1 there is nothing to fill, and nothing to wait for.
		c.flights = flight.NewRivals[readResult[V]](rivalFlight)
	}
	// A run whose callers all gave up may still fill: like Forget's,
	// detaching it bumps the key's stripe, so its fill is voided.
	// Background refreshes (the only runs started by Go and GoMany) of a
	// key held off after a failure start none: checked when the run would
	// start, so a stale hit that read the throttle before another's refresh
	// failed and finished does not load again (TestRemember_RefreshAfterFailureHeldOff).
	c.flights.Hold(func(fk string) bool { return fk[0] == 'r' && c.heldOff(fk[1:]) })
	c.flights.OnDetach(func(fkeys []string) {
		for _, fk := range fkeys {
			c.stripes[hashKey(fk[1:])&stripeMask].Add(1)
		}
	})
	if opts.Mode != ModeMemory {
		if rdb == nil {
			return nil, fmt.Errorf("tiered: %v mode needs a Redis client", opts.Mode)
		}
		if err := checkClient(rdb); err != nil {
			return nil, err
		}
		c.rdb, c.bus = rdb, bus
		if n := bus.Shards(); n > 0 {
			if opts.PlainJSON {
				return nil, errors.New("tiered: PlainJSON keys carry no shard hash tag: use a Bus with classic pub/sub (ShardChannels 0)")
			}
			if strings.ContainsAny(opts.KeyPrefix, "{}") {
				// Redis hashes the first {...} of a key: the prefix's would
				// put every key in one slot, apart from its shard channel's,
				// and each write's transaction would fail with CROSSSLOT.
				return nil, fmt.Errorf("tiered: KeyPrefix %q holds a brace, which would take over the hash tag of every key on a sharded Bus", opts.KeyPrefix)
			}
			for i := range n {
				c.tags = append(c.tags, bus.ShardTag(i))
			}
			c.genKey = c.base + "{" + c.tags[0] + "}nsgen"
		}
	}
	if opts.Mode != ModeRedis && opts.L1TTL > 0 {
		// No ristretto Metrics: its hit counter is one more contended atomic
		// on every hit. We count hits ourselves and keys and bytes through
		// the callbacks, off the hot path.
		c.hot = newHotIndex[V](opts.L1MaxCost)
		c.l1, err = ristretto.NewCache(&ristretto.Config[uint64, *entry[V]]{
			NumCounters: max(1000, opts.L1MaxCost/100),
			MaxCost:     opts.L1MaxCost,
			BufferItems: 64,
			OnEvict:     func(*ristretto.Item[*entry[V]]) { c.st.l1Evicted.Add(1) },
			OnReject:    func(*ristretto.Item[*entry[V]]) { c.st.l1Rejected.Add(1) },
			// Runs under the shard's write lock, before the new entry is
			// visible: once a read can see the replacement, the hot index
			// no longer serves the entry it replaces (see hot.go).
			ShouldUpdate: func(_, prev *entry[V]) bool {
				if prev != nil {
					prev.gone.Store(true)
				}
				return true
			},
			OnExit: func(e *entry[V]) {
				if e != nil {
					if hook := c.beforeHotExit.Load(); hook != nil {
						(*hook)(e)
					}
					c.hot.exit(e)
					c.st.l1Exits.Add(1)
					c.st.l1ExitCost.Add(uint64(e.cost))
				}
			},
		})
		if err != nil {
			return nil, fmt.Errorf("tiered: L1: %w", err)
		}
		c.clk = startClock(&c.now)
	}
	c.tel, err = metrics.NewCache(metrics.Providers{Meter: opts.MeterProvider, Tracer: opts.TracerProvider}, name, c.telemetry)
	if err != nil {
		c.teardown()
		return nil, fmt.Errorf("tiered: telemetry: %w", err)
	}
	if c.bus != nil {
		// Register before reading the generation, so a flush published
		// in between is not missed.
		c.unregister, err = c.bus.Register(name, handler[V]{c})
		if err != nil {
			c.teardown()
			return nil, err
		}
		if !opts.PlainJSON {
			// If Redis does not answer, the generation stays unknown and
			// generation() reads it on each call until it is known: an
			// instance that starts while Redis is down still serves from
			// its loader. A Redis that answers with a refusal (a wrong
			// password, a certificate not trusted) is a configuration
			// error, reported now.
			ctx, cancel := context.WithTimeout(context.Background(), max(opts.CommandTimeout, time.Second))
			err = c.resync(ctx)
			cancel()
			if err != nil && !redisDown(err) {
				c.teardown()
				return nil, fmt.Errorf("tiered: read namespace generation: %w", err)
			}
		}
	}
	return c, nil
}

// Name is the cache's namespace.
func (c *Cache[V]) Name() string { return c.name }

// Mode is the cache's mode.
func (c *Cache[V]) Mode() Mode { return c.opts.Mode }

// Get returns the value stored under key. A miss is not an error: ok is
// false and err nil. err reports that the cache could not answer (Redis
// unreachable or too slow for ctx or Options.CommandTimeout); corrupt bytes in
// Redis count as a miss and are deleted.
//
// An L1 hit takes no lock of the cache's own (most are served by the hot
// index in front of ristretto and take none at all; the rest take a
// ristretto shard's read lock), allocates nothing and does not look at
// ctx. On
// an L1 miss, concurrent Gets of one key share one Redis round trip; a ctx
// that is already done fails the call at once, and a ctx deadline is always
// honoured. The caller that performs the shared read does so on its own
// goroutine (no hand-off: it is the fast path), so a cancellation of its ctx
// without a deadline is noticed when the read returns, at most
// Options.CommandTimeout later; the callers that joined it can leave at any
// time. If a Remember in this process is reading or loading the same key,
// Get waits for it to finish (as long as ctx allows) and then takes what
// it stored in L1, or reads Redis itself if it stored nothing: the two
// never read one key at once, which keeps reads monotonic. Such a Get
// counts as the L1 miss it first was.
// Such a wait can last as long as the load.
func (c *Cache[V]) Get(ctx context.Context, key string) (v V, ok bool, err error) {
	if c.l1 != nil && !c.closing.Load() {
		h := xxhash.Sum64String(key)
		if e, hit := c.l1Hit(h, key); hit {
			if e.negative {
				return v, false, nil
			}
			if c.opts.CopyOnRead {
				return c.decodeCopy(e)
			}
			return e.val, true, nil
		}
	}
	return c.getSlow(ctx, key)
}

// valid is the fence: an L1 entry counts only if it has not expired and
// nothing that could have changed its key happened since the read that
// produced it.
//
// An entry filled while the stream was untrusted (an odd epoch) is checked
// against the real clock too: the coarse clock is a goroutine, and under a
// CPU-starved process it can fall behind by more than such an entry's whole
// life (DegradedL1TTL), which is its only staleness bound.
func (c *Cache[V]) valid(e *entry[V], h uint64, key string) bool {
	return e.key == key &&
		e.expires > c.now.Load() &&
		e.stripe == c.stripes[h&stripeMask].Load() &&
		e.ns == c.nsEpoch.Load() &&
		e.epoch == c.busEpoch() &&
		(e.epoch&1 == 0 || e.expires > time.Now().UnixNano())
}

// l1Hit returns key's L1 entry if the fence accepts it, counting the hit:
// from the hot index when its slot holds the entry, else from ristretto,
// promoting the entry into the index.
func (c *Cache[V]) l1Hit(h uint64, key string) (*entry[V], bool) {
	if e := c.hot.lookup(h); e != nil && c.valid(e, h, key) {
		if sampled(c.hits.Inc()) {
			c.l1.Get(h) // an access for ristretto's admission policy
		}
		return e, true
	}
	seq := c.hot.seq(h)
	e, hit := c.l1.Get(h)
	if !hit || !c.valid(e, h, key) {
		// This read may now return something newer than an entry another
		// reader found in ristretto before: retire such promotions.
		c.hot.missed(h)
		return nil, false
	}
	if sampled(c.hits.Inc()) {
		c.hot.promote(h, e, seq)
	}
	return e, true
}

// peekL1 is l1Hit without counting or promoting, for a read that already
// counted its miss.
func (c *Cache[V]) peekL1(key string) (*entry[V], bool) {
	if c.l1 == nil {
		return nil, false
	}
	h := xxhash.Sum64String(key)
	if e := c.hot.lookup(h); e != nil && c.valid(e, h, key) {
		return e, true
	}
	if e, hit := c.l1.Get(h); hit && c.valid(e, h, key) {
		return e, true
	}
	c.hot.missed(h) // as in l1Hit: what this read returns may be newer
	return nil, false
}

func (c *Cache[V]) busEpoch() uint64 {
	if c.bus == nil {
		return 0
	}
	return c.bus.Epoch()
}

func (c *Cache[V]) snap(h uint64) snapshot {
	return snapshot{stripe: c.stripes[h&stripeMask].Load(), ns: c.nsEpoch.Load(), epoch: c.busEpoch()}
}

func (c *Cache[V]) getSlow(ctx context.Context, key string) (v V, ok bool, err error) {
	if err := c.checkKey(key); err != nil {
		return v, false, err
	}
	if err := c.enter(); err != nil {
		return v, false, err
	}
	defer c.leave()
	if c.l1 != nil {
		c.st.l1Misses.Add(1)
	}
	// The snapshot is taken before the flight exists (see readL2), and
	// before the mode check and the pending check. A SetMode(ModeMemory)
	// after the mode check bumps the namespace epoch, which then voids this
	// read's fill; taken after it, the snapshot could follow the switch and
	// a memory-mode write of key, and the fill of what Redis held would
	// replace that write in L1. A failed write defers its key, then voids
	// it (see write), so a read either finds the key pending or has its
	// fill refused.
	snap := c.snap(hashKey(key))
	if c.memoryOnly() || c.pending(key) {
		return v, false, nil
	}
	if c.afterModeCheck != nil {
		c.afterModeCheck(key)
	}
	if err := ctx.Err(); err != nil {
		return v, false, err
	}
	start := time.Now()
	defer func() { c.tel.Op(ctx, metrics.OpGet, start, err) }()
	// An L2 read is one short round trip: run it on this goroutine unless
	// ctx's deadline is sooner than CommandTimeout (see DoInline).
	r, err, _ := c.flights.DoInline(ctx, flightKey(key), c.opts.CommandTimeout, func(ctx context.Context) (readResult[V], error) {
		if c.flightStart != nil {
			c.flightStart(key)
		}
		// A Get that had to wait for a Remember of its key (the two never
		// read at once) finds what that load stored: take it rather than
		// read Redis again. It stays counted as the L1 miss it first was.
		if e, ok := c.peekL1(key); ok {
			return readResult[V]{val: e.val, found: !e.negative}, nil
		}
		return c.readOne(ctx, key, snap)
	})
	if err != nil {
		if c.closing.Load() {
			return v, false, ErrClosed // the flight was cancelled by Close
		}
		c.st.errors.Add(1)
		return v, false, err
	}
	if r.found && c.opts.CopyOnRead {
		// The shared decoded value went to L1; give this caller its own.
		return c.copyValue(r.val)
	}
	return r.val, r.found, nil
}

// readL2 reads keys from Redis in one pipeline (GET and PTTL of each) and,
// for each key no invalidation has touched since its snapshot, stores the
// decoded value in L1. The result is keyed by flight key.
//
// It runs inside a flight, and snaps must have been read before that flight
// was created, not when it starts running. An invalidation bumps the stripe
// and then forgets the key's flight; a flight whose snapshot were read late,
// after the bump, could carry the same snapshot as the flight created after
// the Forget while having read an older value, and both fills would pass the
// fence (TestFleet_Stress caught exactly this). Read early, any two flights
// of a key that overlap are separated by a bump that voids the older one.
func (c *Cache[V]) readL2(ctx context.Context, keys []string, snaps []snapshot) (out map[string]readResult[V], err error) {
	// Only a round trip goes past the breaker and reports to it: a success
	// reported for a read of nothing would reset its count of failures in
	// a row.
	keys, snaps = c.skipPending(keys, snaps)
	if len(keys) == 0 {
		return nil, nil
	}
	defer func() {
		if err != nil {
			c.st.l2Errors.Add(uint64(len(keys)))
		}
	}()
	if err := c.admit(); err != nil {
		return nil, err
	}
	defer func(start time.Time) { c.report(start, err) }(time.Now())
	ctx, span := c.tel.Span(ctx, "tiercache.l2.get_many", "PIPELINE", len(keys))
	defer func() { metrics.End(span, err) }()
	gen, err := c.generation(ctx, snaps[0])
	if err != nil {
		return nil, err
	}
	// PTTL only matters for the L1 entry's lifetime: without L1 a key is
	// one GET.
	gets := make([]*redis.StringCmd, len(keys))
	ttls := make([]*redis.DurationCmd, len(keys))
	pipe := c.rdb.Pipeline()
	for i, k := range keys {
		dk := c.dataKey(gen, k)
		gets[i] = pipe.Get(ctx, dk)
		if c.l1 != nil {
			ttls[i] = pipe.PTTL(ctx, dk)
		}
	}
	cmds, err := pipe.Exec(ctx)
	if err = pipeErr(cmds, err); err != nil {
		return nil, fmt.Errorf("tiered: get %d keys: %w", len(keys), err)
	}
	out = make(map[string]readResult[V], len(keys))
	for i, k := range keys {
		r, err := c.absorb(ctx, k, snaps[i], gen, gets[i], ttls[i])
		if err != nil {
			return nil, fmt.Errorf("tiered: get %d keys: %w", len(keys), err)
		}
		if r.found {
			out[flightKey(k)] = r
		}
	}
	return out, nil
}

// pipeErr is the error of a pipeline whose Exec returned cmds and err: the
// first command error that is not redis.Nil. Exec returns the first
// command's error, a miss included, so a miss ahead of a real failure (a
// WRONGTYPE, say) hid it: the failed key was reported as a miss.
func pipeErr(cmds []redis.Cmder, err error) error {
	if !errors.Is(err, redis.Nil) {
		return err
	}
	for _, cmd := range cmds {
		if err := cmd.Err(); err != nil && !errors.Is(err, redis.Nil) {
			return err
		}
	}
	return nil
}

// readOne is readL2 for a single key, without the batch's slices and map:
// the path of every Get that misses L1.
func (c *Cache[V]) readOne(ctx context.Context, key string, s snapshot) (_ readResult[V], err error) {
	defer func() {
		if err != nil {
			c.st.l2Errors.Add(1)
		}
	}()
	if err := c.admit(); err != nil {
		return readResult[V]{}, err
	}
	defer func(start time.Time) { c.report(start, err) }(time.Now())
	ctx, span := c.tel.Span(ctx, "tiercache.l2.get", "PIPELINE", 1)
	defer func() { metrics.End(span, err) }()
	gen, err := c.generation(ctx, s)
	if err != nil {
		return readResult[V]{}, err
	}
	dk := c.dataKey(gen, key)
	var get *redis.StringCmd
	var ttl *redis.DurationCmd
	if c.l1 == nil {
		get = c.rdb.Get(ctx, dk)
		err = pipeErr(nil, get.Err())
	} else {
		pipe := c.rdb.Pipeline()
		get, ttl = pipe.Get(ctx, dk), pipe.PTTL(ctx, dk)
		cmds, perr := pipe.Exec(ctx)
		err = pipeErr(cmds, perr)
	}
	if err == nil {
		var r readResult[V]
		if r, err = c.absorb(ctx, key, s, gen, get, ttl); err == nil {
			return r, nil
		}
	}
	return readResult[V]{}, fmt.Errorf("tiered: get %q: %w", key, err)
}

// absorb decodes one key's GET reply, counts it, drops corrupt bytes, and
// fills L1 (ttl is nil without L1). Only redis.Nil is a miss: any other
// error of the GET is returned.
func (c *Cache[V]) absorb(ctx context.Context, key string, s snapshot, gen uint64, get *redis.StringCmd, ttl *redis.DurationCmd) (readResult[V], error) {
	raw, err := get.Bytes()
	if errors.Is(err, redis.Nil) {
		c.st.l2Misses.Add(1)
		return readResult[V]{}, nil
	}
	if err != nil {
		return readResult[V]{}, err
	}
	val, payload, found, err := c.decode(raw)
	if err != nil {
		c.dropCorrupt(ctx, c.dataKey(gen, key), raw, err)
	}
	if err != nil || !found { // corrupt, or a tombstone or negative entry
		c.st.l2Misses.Add(1)
		return readResult[V]{}, nil
	}
	c.st.l2Hits.Add(1)
	if c.afterL2Read != nil {
		c.afterL2Read(key)
	}
	if ttl != nil { // without L1 there is nothing to fill or to go back to
		c.fill(key, hashKey(key), s, val, payload, raw, ttl.Val())
	}
	return readResult[V]{val: val, found: true}, nil
}

// rivalFlight pairs a key's Get flight with its Remember flight: the flight
// group never runs the two at once, so two reads of one key never race to
// fill L1 under one fence snapshot (see fill).
func rivalFlight(fk string) string {
	switch fk[0] {
	case 'g':
		return "r" + fk[1:]
	case 'r':
		return "g" + fk[1:]
	}
	return ""
}

// flightKey is a key's name in the flight group; the prefix leaves room for
// other kinds of flights (loads) over the same keys.
func flightKey(key string) string { return "g" + key }

// generation returns the namespace generation to build keys with. While the
// Bus is live, flush messages keep the cached one current; otherwise a
// flush may have been missed, so it is read from Redis.
func (c *Cache[V]) generation(ctx context.Context, s snapshot) (uint64, error) {
	if c.opts.PlainJSON || (s.epoch&1 == 0 && c.genKnown.Load()) {
		return c.nsGen.Load(), nil
	}
	if !c.genKnown.Load() {
		// New could not read it (Redis was down): read it now and keep it,
		// under the lock that orders it with the Bus's resyncs and flushes.
		if err := c.resync(ctx); err != nil {
			return 0, fmt.Errorf("tiered: read namespace generation: %w", err)
		}
		return c.nsGen.Load(), nil
	}
	// For this call only: stored, a reply read before a Clear could land
	// after the Bus's resync had stored the Clear's generation.
	g, err := c.rdb.Get(ctx, c.genKey).Uint64()
	if err != nil && !errors.Is(err, redis.Nil) {
		return 0, fmt.Errorf("tiered: read namespace generation: %w", err)
	}
	return g, nil
}

// redisDown reports whether err says Redis did not answer, or answered
// "not now" (see invalidate.Unavailable), rather than refused this client:
// an error reply (WRONGPASS, NOPERM) or a TLS handshake that failed is a
// refusal.
func redisDown(err error) bool {
	var cert *tls.CertificateVerificationError
	var alert tls.AlertError
	var unknown x509.UnknownAuthorityError
	var hostname x509.HostnameError
	var invalid x509.CertificateInvalidError
	if errors.As(err, &cert) || errors.As(err, &alert) || errors.As(err, &unknown) ||
		errors.As(err, &hostname) || errors.As(err, &invalid) {
		return false
	}
	return invalidate.Unavailable(err)
}

// resync reads the namespace generation from Redis and makes it the
// cached one, even if it is lower (a Redis restart without persistence
// starts generations again from 0). The lock is held across the read: the
// Bus calls resync from each channel's goroutine when that channel
// resubscribes, and a flush may arrive meanwhile on another one; without
// it, a read from before a Clear could be stored after that Clear's flush
// had moved the generation on, leaving a live instance on the retired
// generation.
func (c *Cache[V]) resync(ctx context.Context) error {
	c.genMu.Lock()
	defer c.genMu.Unlock()
	g, err := c.rdb.Get(ctx, c.genKey).Uint64()
	if err != nil && !errors.Is(err, redis.Nil) {
		return err
	}
	c.nsGen.Store(g)
	c.genKnown.Store(true)
	return nil
}

// advanceGen moves the cached generation to g unless it is already there
// or past it. Generations only grow (INCR), and a flush can carry an old
// one: DeletePattern's reads the generation at its start, and a Clear can
// run before it publishes.
//
// An unknown generation stays unknown, and the next call reads it from
// Redis (generation): g may be retired already, and with nothing to
// compare it to, adopting it left a live instance on it, serving what a
// Clear it never heard of had removed (TestGeneration_UnknownIgnoresStaleFlush).
func (c *Cache[V]) advanceGen(g uint64) {
	c.genMu.Lock()
	if c.genKnown.Load() && g > c.nsGen.Load() {
		c.nsGen.Store(g)
	}
	c.genMu.Unlock()
}

// forgetGen makes the cached generation unknown, for the next call to read
// it from Redis: a Clear whose outcome is unknown may have moved it.
func (c *Cache[V]) forgetGen() {
	c.genMu.Lock()
	c.genKnown.Store(false)
	c.genMu.Unlock()
}

// fill stores a value read under snapshot s in L1, unless the snapshot is
// already stale, in which case it voids the key (see below). A stale fill
// that slips past this check is still harmless: valid rejects it on every
// read. The Wait makes the entry visible before the fill returns, so a later
// read cannot start a second fill whose queued Set ristretto would drop in
// favour of this one (pitfalls R1, R3).
//
// Together with snapshots taken before a flight exists and invalidations
// that bump and forget in one step, this keeps reads on one instance
// monotonic: once a read has returned a value, no later read on the
// instance returns an older one (TestFleet_Stress checks it per reader).
// A value returned without being stored voids the key, and a Get's flight
// and a Remember's (which do not join: one loads, the other must not) are
// never in flight at once for one key (rivalFlight): otherwise they could
// read it under one snapshot on either side of a peer's write whose
// invalidation is on its way, and the older one's fill could land after
// the newer value was returned (TestMonotonic_*).
func (c *Cache[V]) fill(key string, h uint64, s snapshot, val V, payload, raw []byte, l2TTL time.Duration) {
	if c.l1 == nil { // ModeRedis: nothing to fill, nothing to void
		return
	}
	if s != c.snap(h) {
		// Something voided this key while we read it, so L1 may now hold a
		// valid entry from a flight that started after that and yet read
		// Redis before us: older than the value we are about to return.
		// Void it too, so no read on this instance goes back from ours.
		c.invalidateLocal(key)
		return
	}
	ttl := c.jitter(c.opts.L1TTL)
	switch {
	case l2TTL == -2: // the key vanished between GET and PTTL
		c.invalidateLocal(key) // returned, not kept: see storeLoaded
		return
	case l2TTL >= 0 && l2TTL < ttl:
		ttl = l2TTL
	}
	if ttl = c.degradedTTL(s, ttl); ttl <= clockTick {
		c.invalidateLocal(key)
		return
	}
	e := &entry[V]{key: key, val: val, stripe: s.stripe, ns: s.ns, epoch: s.epoch,
		expires: expiry(ttl), cost: int64(len(raw) + len(key) + entryCost)}
	if raw != nil {
		e.fresh, e.wid = freshness(raw, c.opts.PlainJSON)
	} else if !degraded(s) {
		e.fresh, e.wid = c.localFreshness() // loaded, and kept in L1 alone
	}
	c.setEager(e)
	if c.opts.CopyOnRead {
		e.raw = payload
	}
	if c.beforeL1Store != nil {
		c.beforeL1Store(key)
	}
	c.store(h, e)
}

// setEager sets, with EagerRefresh, when a hit on e starts a background
// refresh, from when e goes stale.
func (c *Cache[V]) setEager(e *entry[V]) {
	if e.fresh != 0 && c.opts.EagerRefresh > 0 {
		e.eager = e.fresh - int64((1-c.opts.EagerRefresh)*float64(c.opts.FreshFor))
	}
}

// localFreshness is freshness for a value that L1 keeps without Redis (in
// ModeMemory, or a load of a key whose write waits in the outbox): fresh for
// FreshFor from now, under a write ID of its own, which no value in Redis
// has. Not for what L1 keeps under an untrusted stream (Redis down): that
// lives DegradedL1TTL at most, and a refresh before then would take what
// Redis holds, which may be older than what the source gave.
func (c *Cache[V]) localFreshness() (fresh int64, wid uint64) {
	if c.opts.FreshFor <= 0 {
		return 0, 0
	}
	return time.Now().Add(c.opts.FreshFor).UnixNano(), writeID()
}

// degradedTTL caps an L1 entry's life when it is filled while the stream is
// not trusted: no invalidation would reach it, so it lives at most
// DegradedL1TTL, and only while the stream stays in this epoch. It returns 0
// when nothing may be kept.
func (c *Cache[V]) degradedTTL(s snapshot, ttl time.Duration) time.Duration {
	if !degraded(s) {
		return ttl
	}
	if c.opts.DegradedL1TTL <= 0 {
		return 0
	}
	c.st.degradedFills.Add(1)
	return min(ttl, c.opts.DegradedL1TTL)
}

// skipPending drops the keys whose write is in the outbox (see pending).
func (c *Cache[V]) skipPending(keys []string, snaps []snapshot) ([]string, []snapshot) {
	if c.bus == nil || c.bus.OutboxDepth() == 0 {
		return keys, snaps
	}
	ks, ss := keys[:0:0], snaps[:0:0]
	for i, k := range keys {
		if !c.pending(k) {
			ks, ss = append(ks, k), append(ss, snaps[i])
		}
	}
	return ks, ss
}

// store hands e to ristretto (no TTL: e carries its own expiry) and waits
// until it is visible. Its callers have an L1 (they return early in
// ModeRedis).
//
// A Set that ristretto drops (its set buffer full) is of a key it did not
// hold: a present key is replaced in place, never dropped. The entry it
// held last may still sit in the hot index, though, if its eviction has not
// reached OnExit yet, and pass the fence: the caller may be about to return
// a newer value (a stale Remember hit that waited for its refresh), so the
// drop retires the slot's promotions as a miss does (see hot.go).
// A Set that admission refuses needs nothing: the refusal comes from the
// policy goroutine, after any eviction's OnExit, and the Wait waits for it.
func (c *Cache[V]) store(h uint64, e *entry[V]) {
	e.hash = h
	if c.l1.Set(h, e, e.cost) {
		c.st.l1Sets.Add(1)
		c.st.l1SetCost.Add(uint64(e.cost))
		c.l1.Wait()
	} else {
		c.hot.missed(h)
		c.st.l1Dropped.Add(1)
	}
}

// Set stores v under key in Redis for ttl (0 means Options.TTL) and
// invalidates it in every instance's L1, the writer's included: the next
// read anywhere fetches v. The write and its invalidation reach Redis in one
// MULTI/EXEC, so neither happens without the other.
//
// If Set returns an error the write may or may not have been applied (for
// example when ctx expired after the command was sent); the local L1 is
// invalidated either way. In ModeMemory Set stores v in L1 only, best
// effort: L1 admission may drop it.
func (c *Cache[V]) Set(ctx context.Context, key string, v V, ttl time.Duration) error {
	return c.set(ctx, []string{key}, []V{v}, ttl)
}

// Delete removes key from Redis and from every instance's L1. It leaves a
// short-lived tombstone (Options.TombstoneTTL) so that a load that read the
// old value before the delete cannot store it afterwards.
func (c *Cache[V]) Delete(ctx context.Context, key string) error {
	return c.DeleteMany(ctx, key)
}

// Exists reports whether key holds a value, without decoding it: after L1,
// it reads the value's envelope header alone from Redis (one GETRANGE).
// What Get reads as a miss for its header (a tombstone, another codec's
// value, a newer envelope version's, a corrupt header) does not exist; a
// payload that turns out corrupt or over MaxValueSize when Get decodes it
// does. In plain-JSON mode any bytes under the key exist.
func (c *Cache[V]) Exists(ctx context.Context, key string) (_ bool, err error) {
	if err := c.checkKey(key); err != nil {
		return false, err
	}
	if err := c.enter(); err != nil {
		return false, err
	}
	defer c.leave()
	if c.l1 != nil {
		h := xxhash.Sum64String(key)
		if e, hit := c.l1.Get(h); hit && c.valid(e, h, key) {
			return !e.negative, nil
		}
		c.hot.missed(h) // it may now report newer than the index holds (see hot.go)
	}
	if c.memoryOnly() || c.pending(key) {
		return false, nil
	}
	if err := c.admit(); err != nil {
		c.st.errors.Add(1)
		return false, err
	}
	defer func(start time.Time) {
		if err != nil {
			c.st.errors.Add(1) // as a failed Get is
		}
		c.report(start, err)
		c.tel.Op(ctx, metrics.OpExists, start, err)
	}(time.Now())
	ctx, cancel := c.opCtx(ctx)
	defer cancel()
	gen, err := c.generation(ctx, c.snap(0))
	if err != nil {
		return false, err
	}
	head, err := c.rdb.GetRange(ctx, c.dataKey(gen, key), 0, wire.HeaderSize-1).Bytes()
	if err != nil {
		return false, fmt.Errorf("tiered: exists %q: %w", key, err)
	}
	if c.opts.PlainJSON {
		return len(head) > 0, nil
	}
	// What Get reads as a value: a header the envelope's reader accepts
	// (checked without the payload, which is not here to decompress), of
	// this codec, neither tombstone nor negative entry.
	if len(head) != wire.HeaderSize {
		return false, nil
	}
	h := [wire.HeaderSize]byte(head)
	h[3] &^= byte(wire.FlagCompressed)
	env, derr := wire.DecodeEnvelope(h[:], 0)
	return derr == nil && env.Flags == 0 && env.Codec == c.opts.Codec.ID(), nil
}

// invalidateLocal voids key in this process: bump its stripe (every entry
// filled before now is rejected) and detach any in-flight read so a later
// caller does not join a read that started before.
//
// The bump and the detach are one step as far as flights are concerned.
// Done apart, a reader could snapshot the bumped stripe, start a flight,
// and have that flight detached by the late Forget: the next flight would
// share its snapshot, and the one that read Redis first could land in L1
// last with a valid snapshot (TestFleet_Stress caught this).
//
// The entry itself is left in ristretto: the bump already hides it, and a
// key that stays present is refilled through ristretto's synchronous update
// path (visible at once, never dropped or refused by admission) instead of
// its asynchronous new-key path (pitfalls R1-R3, section 4.5). ristretto's
// Del would also block on its set buffer. In ModeMemory, where L1 is the
// only copy, the entry is deleted to free it.
func (c *Cache[V]) invalidateLocal(key string) {
	h := xxhash.Sum64String(key)
	c.flights.Forget(func() { c.stripes[h&stripeMask].Add(1) }, flightKey(key), rememberKey(key))
	if c.l1 != nil && c.memoryOnly() {
		c.l1.Del(h)
	}
}

// invalidateAll voids the whole namespace in this process: a new namespace
// epoch, and every in-flight read detached, in one step (see
// invalidateLocal).
func (c *Cache[V]) invalidateAll() {
	c.flights.ForgetAll(func() { c.nsEpoch.Add(1) })
	c.st.l1Flushes.Add(1)
}

// checkKeys is checkKey for a batch: one bad key fails it all, before
// anything is read or written.
func (c *Cache[V]) checkKeys(keys []string) error {
	for _, k := range keys {
		if err := c.checkKey(k); err != nil {
			return err
		}
	}
	return nil
}

func (c *Cache[V]) checkKey(key string) error {
	switch {
	case key == "":
		return fmt.Errorf("%w: empty key", ErrInvalidKey)
	case len(key) > c.opts.MaxKeyLen:
		return fmt.Errorf("%w: length %d exceeds %d", ErrInvalidKey, len(key), c.opts.MaxKeyLen)
	}
	return nil
}

// dataKey is where key lives in Redis. The braces make the key's hash tag,
// so a key and anything derived from it share a cluster slot.
//
// On a sharded Bus the hash tag is instead the tag of the key's shard
// channel, so that the key and its invalidation share a slot:
// <base><gen>:{<shard tag>}<key> (docs/wire.md).
func (c *Cache[V]) dataKey(gen uint64, key string) string {
	if c.opts.PlainJSON {
		return c.opts.KeyPrefix + key
	}
	if c.tags != nil {
		return c.base + strconv.FormatUint(gen, 10) + ":{" + c.tags[c.shard(key)] + "}" + key
	}
	return c.base + strconv.FormatUint(gen, 10) + ":{" + key + "}"
}

// leaseKey is where a load of key holds its lease (Options.Lease): the data
// key with "lease:" after the generation, <base><gen>:lease:{<key>} (or
// with the shard tag on a sharded Bus). It keeps the data key's hash tag, so
// both share a slot, and no data key can have its shape, nor a DeletePattern
// match one: those have '{' right after the generation. (It was <data
// key>:lease, which on a sharded Bus is the data key of the user key
// "<key>:lease" when both fall in one shard: a value stored there blocked
// every Remember of key.)
func (c *Cache[V]) leaseKey(gen uint64, key string) string {
	dk := c.dataKey(gen, key)
	at := len(c.base) + len(strconv.FormatUint(gen, 10)) + 1 // past "<base><gen>:"
	return dk[:at] + "lease:" + dk[at:]
}

// shard is the shard channel of key on a sharded Bus.
func (c *Cache[V]) shard(key string) int { return int(hashKey(key) % uint64(len(c.tags))) }

// enter admits a slow-path call unless the cache is closing; when it
// returns nil, leave must be called once the call is done. (It returns no
// leave func: a method value returned would be allocated on every call.)
func (c *Cache[V]) enter() error {
	c.mu.RLock()
	if c.closing.Load() {
		c.mu.RUnlock()
		return ErrClosed
	}
	return nil
}

// leave ends a call that enter admitted.
func (c *Cache[V]) leave() { c.mu.RUnlock() }

// opCtx bounds one Redis round trip by Options.CommandTimeout. A ctx whose
// own deadline comes first already bounds it, and is used as it is: a timer
// per call is most of what the bound costs.
func (c *Cache[V]) opCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	if c.opts.CommandTimeout > 0 {
		if d, ok := ctx.Deadline(); !ok || time.Until(d) > c.opts.CommandTimeout {
			return context.WithTimeout(ctx, c.opts.CommandTimeout)
		}
	}
	return ctx, noCancel
}

func noCancel() {}

// jitter shortens d by a random fraction up to Options.TTLJitter.
func (c *Cache[V]) jitter(d time.Duration) time.Duration {
	if c.opts.TTLJitter <= 0 || d <= 0 {
		return d
	}
	return d - time.Duration(rand.Float64()*c.opts.TTLJitter*float64(d))
}

// Close stops the cache: later calls return ErrClosed, in-flight reads are
// cancelled and waited for, the cache leaves the Bus, and L1 is released. It
// does not close the Redis client or the Bus. It is idempotent and safe to
// call concurrently.
//
// Invalidations of this cache's failed writes that the Bus still keeps in
// its outbox are replayed first, as Shutdown does, within twice
// CommandTimeout (1 s by default; this includes waiting for a replay of
// other caches the Bus is running). What cannot be replayed is dropped,
// and Close returns an error wrapping invalidate.ErrOutboxDropped: other
// instances may then serve what those writes meant to replace until it
// expires. Only the first call returns it. Close may also wait for a
// replay of this cache that the Bus had already started: one round trip
// (CommandTimeout, or the client's ReadTimeout without one), or for a
// PlainJSON namespace flush a SCAN and UNLINK pass, bounded by the larger
// of the Bus's HeartbeatTimeout and 5 s.
//
// An L1 hit takes no lock, so Close cannot wait for Gets that are already
// past their first check; finish serving requests (http.Server.Shutdown)
// before closing the cache, as ristretto's Close is not safe against a
// concurrent Get.
func (c *Cache[V]) Close() error {
	d := 2 * c.opts.CommandTimeout
	if d <= 0 {
		d = 2 * DefaultCommandTimeout
	}
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	return c.Shutdown(ctx)
}

// Shutdown is Close with the last replay of the outbox bounded by ctx
// instead: a process that is stopping while Redis is unreachable can give
// Redis as long as it can spare to come back. It replays this cache's
// pending invalidations (past the circuit breaker), then closes; the error
// wraps invalidate.ErrOutboxDropped if some could not be replayed.
func (c *Cache[V]) Shutdown(ctx context.Context) error {
	var err error
	c.closeOnce.Do(func() {
		c.closing.Store(true)
		c.flights.Close()
		// The write lock waits for the slow-path calls already inside, so
		// the replay below sees what their writes left in the outbox
		// (before, it ran first, and a write in flight as Close began was
		// dropped with Redis up).
		c.mu.Lock()
		c.finalReplay.Store(true)
		c.mu.Unlock()
		var replayErr error
		if c.bus != nil {
			replayErr = c.bus.ReplayNow(ctx, c.name)
		}
		// teardown runs under the write lock, so no handler call can start
		// meanwhile.
		c.mu.Lock()
		c.finalReplay.Store(false)
		dropped := c.teardown()
		c.mu.Unlock()
		if dropped > 0 {
			err = fmt.Errorf("tiered: close %q: %d invalidations dropped unreplayed: %w",
				c.name, dropped, invalidate.ErrOutboxDropped)
			if replayErr != nil {
				err = fmt.Errorf("%w (last replay: %w)", err, replayErr)
			}
		}
	})
	return err
}

// teardown releases what the cache holds. It returns how many of its
// invalidations the Bus's outbox still held, dropped as it unregistered.
func (c *Cache[V]) teardown() (dropped int) {
	if c.unregister != nil {
		dropped = c.unregister()
	}
	c.tel.Close()
	c.flights.Close()
	if c.l1 != nil {
		c.l1.Close()
		c.hot.clear()
		c.clk.stopClock()
	}
	return dropped
}

// handler receives this cache's messages from the Bus.
type handler[V any] struct{ c *Cache[V] }

func (h handler[V]) Invalidate(keys []string) {
	if err := h.c.enter(); err != nil {
		return
	}
	defer h.c.leave()
	if h.c.beforeApply != nil {
		h.c.beforeApply()
	}
	for _, k := range keys {
		h.c.invalidateLocal(k)
	}
	if h.c.afterApply != nil {
		h.c.afterApply()
	}
}

func (h handler[V]) Flush(gen uint64) {
	if err := h.c.enter(); err != nil {
		return
	}
	defer h.c.leave()
	if h.c.beforeFlush != nil {
		h.c.beforeFlush()
	}
	h.c.advanceGen(gen)
	h.c.invalidateAll()
	if h.c.afterApply != nil {
		h.c.afterApply()
	}
}

// FlushResync applies a flush received under a Bus Secret: the generation
// is read from Redis (the message's is not authenticated), then the
// namespace's L1 is voided.
func (h handler[V]) FlushResync(ctx context.Context) error {
	if err := h.c.enter(); err != nil {
		return nil
	}
	defer h.c.leave()
	if h.c.beforeFlush != nil {
		h.c.beforeFlush()
	}
	if !h.c.opts.PlainJSON {
		if err := h.c.resync(ctx); err != nil {
			return err
		}
	}
	h.c.invalidateAll()
	if h.c.afterApply != nil {
		h.c.afterApply()
	}
	return nil
}

var _ invalidate.FlushResyncer = handler[int]{}

func (h handler[V]) Resync(ctx context.Context) error {
	if err := h.c.enter(); err != nil {
		return nil
	}
	defer h.c.leave()
	// The Bus moves to a new epoch after this, which voids every entry;
	// reads in flight from before the gap must not be joined either.
	h.c.flights.ForgetAll(nil)
	if h.c.opts.PlainJSON {
		return nil
	}
	return h.c.resync(ctx)
}

// hashKey is the L1 key and stripe source for a cache key.
func hashKey(key string) uint64 { return xxhash.Sum64String(key) }
