package tiered

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/cespare/xxhash/v2"
	"github.com/redis/go-redis/v9"

	"github.com/tiercache/tiercache/internal/flight"
	"github.com/tiercache/tiercache/internal/wire"
	"github.com/tiercache/tiercache/metrics"
)

// ErrNotFound is what a Loader returns to say "absent at the source". The
// cache remembers it for Options.NegativeTTL (in L1 and Redis, as a
// negative entry) and returns it from Remember without calling the loader
// again; Get reports such a key as a miss. It is not counted as a failure.
var ErrNotFound = errors.New("tiered: not found")

// Loader loads the value of key from the source of truth, for Remember. It
// runs on a context detached from the callers (their values kept, their
// cancellation not) and bounded by Options.LoadTimeout; it is cancelled
// when every caller waiting for it has given up. It must not call back into
// the same key's Remember, Get or GetMany (a Get waits for the load, which
// waits for the Get, until LoadTimeout), and must not call runtime.Goexit
// (t.FailNow).
// A panic is recovered and returned to every waiter as an error.
type Loader[V any] func(ctx context.Context, key string) (V, error)

// fillScript stores a loaded value only if the key still holds what the
// load saw before it began: nothing (ARGV[1] empty) or the entry whose
// write ID is ARGV[1]. A write or a Delete in between changed the write ID
// (Delete leaves a tombstone for exactly this), so a load that read the
// source before that write cannot overwrite it (pitfalls C-d). It reads 8
// bytes of the old value, never the value itself.
var fillScript = redis.NewScript(`
if ARGV[1] == '' then
  if redis.call('EXISTS', KEYS[1]) == 1 then
    return 0
  end
elseif redis.call('GETRANGE', KEYS[1], 4, 11) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1`)

// rememberKey is a key's name in the flight group for loads.
func rememberKey(key string) string { return "r" + key }

// Remember returns the value of key, loading it with load on a miss: L1,
// then Redis, then the loader, whose result is stored in both tiers. In
// each process concurrent calls for one key run the loader once; each
// caller waits only as long as its own ctx allows, and a caller that gives
// up does not cancel the load for the others.
//
// The store into Redis is fenced: if the key was written or deleted while
// the loader ran, the loaded value (read from the source before that write)
// is returned to the callers but not stored. So writers must update the
// source of truth first and then call Set or Delete.
//
// A loader that returns ErrNotFound makes the key a negative entry for
// Options.NegativeTTL; Remember then returns ErrNotFound. Any other loader
// error is returned to every waiter and nothing is cached. An L1 hit costs
// what Get's does: no lock, no allocation.
func (c *Cache[V]) Remember(ctx context.Context, key string, load Loader[V]) (V, error) {
	if c.l1 != nil && !c.closing.Load() {
		h := xxhash.Sum64String(key)
		if e, hit := c.l1Hit(h, key); hit {
			if e.negative {
				var zero V
				return zero, ErrNotFound
			}
			v := e.val
			if c.opts.CopyOnRead {
				var err error
				if v, _, err = c.decodeCopy(e); err != nil {
					return v, err
				}
			}
			if e.fresh != 0 {
				if now := c.now.Load(); now >= e.fresh {
					return c.rememberStale(ctx, key, v, e.wid, load)
				} else if e.eager != 0 && now >= e.eager {
					c.refreshAsync(ctx, key, e.wid, load)
				}
			}
			return v, nil
		}
	}
	return c.rememberSlow(ctx, key, load)
}

// refreshAsync starts a background refresh of key unless one is in flight.
// A failed refresh keeps the old value (fail-safe) and holds off retries for
// RetryThrottle. With Options.Lease one instance of the fleet refreshes;
// the others find the value still in Redis and keep serving it.
//
// replace is the write ID of the value being refreshed: the refresh loads
// only if Redis still holds that write; if another instance has refreshed
// it already, it takes that value instead. A caller that joins a refresh
// whose load fails gets the value Redis still holds, marked stale, not the
// loader's error: it is served fail-safe like the caller that started the
// refresh. If Redis no longer holds that write (deleted, expired), or the
// cache is closing, the joiner gets the error.
func (c *Cache[V]) refreshAsync(ctx context.Context, key string, replace uint64, load Loader[V]) {
	if c.heldOff(key) { // checked again as the flight starts (see Hold)
		return
	}
	snap := c.snap(hashKey(key)) // before the flight exists (see readL2)
	refresh := func(ctx context.Context) (_ readResult[V], err error) {
		c.st.refreshes.Add(1)
		defer func() {
			if p := recover(); p != nil { // a panicking loader is held off too
				c.st.failSafe.Add(1)
				c.holdOff(key, time.Now().Add(c.opts.RetryThrottle).UnixNano())
				panic(p)
			}
		}()
		r, err := c.readThrough(ctx, key, snap, load, replace)
		switch {
		case err == nil:
			c.throttle.Delete(key)
			return r, nil
		case c.closing.Load():
			return r, err
		}
		c.st.failSafe.Add(1)
		c.holdOff(key, time.Now().Add(c.opts.RetryThrottle).UnixNano())
		if r.found && r.stale {
			return r, nil
		}
		return r, err
	}
	if c.beforeRefreshGo != nil {
		c.beforeRefreshGo(key)
	}
	// Go declines while the key has a Get flight in flight (rivalFlight):
	// the refresh is then skipped, and the next stale hit tries again.
	c.flights.Go(ctx, rememberKey(key), c.opts.LoadTimeout, refresh)
}

// heldOff reports whether key's refreshes are held off (see holdOff).
func (c *Cache[V]) heldOff(key string) bool {
	until, ok := c.throttle.Load(key)
	return ok && time.Now().UnixNano() < until.(int64)
}

// holdOff keeps key's refreshes off until until (unix ns), after a failed
// one. Entries whose time has passed are swept at most once per
// RetryThrottle, by the failing refresh that finds the sweep due: keys
// that never refresh successfully again (deleted, or no longer read) do
// not pile up after an outage.
func (c *Cache[V]) holdOff(key string, until int64) {
	c.throttle.Store(key, until)
	now := time.Now().UnixNano()
	last := c.swept.Load()
	if now-last < int64(c.opts.RetryThrottle) || !c.swept.CompareAndSwap(last, now) {
		return
	}
	c.throttle.Range(func(k, v any) bool {
		if v.(int64) <= now {
			c.throttle.CompareAndDelete(k, v)
		}
		return true
	})
}

// rememberStale serves a stale value (Options.FreshFor) and refreshes it:
// in the background, once per key, at most every RetryThrottle after a
// failure. With a SoftTimeout it first waits that long for the refresh.
// When the refresh fails or is slow the stale value is returned: fail-safe.
func (c *Cache[V]) rememberStale(ctx context.Context, key string, stale V, wid uint64, load Loader[V]) (V, error) {
	c.st.staleServed.Add(1)
	if until, ok := c.throttle.Load(key); ok && time.Now().UnixNano() < until.(int64) {
		return stale, nil
	}
	c.refreshAsync(ctx, key, wid, load)
	if c.opts.SoftTimeout <= 0 {
		return stale, nil
	}
	if c.beforeJoinRefresh != nil {
		c.beforeJoinRefresh(key)
	}
	wctx, cancel := context.WithTimeout(ctx, c.opts.SoftTimeout)
	defer cancel()
	// Join the refresh in flight. If it has finished already, run no other
	// (refreshAsync decides, under the throttle): a second one here, started
	// just after a failure and before its throttle was read, loaded twice.
	// What a refresh that finished first stored in L1, if it is still fresh
	// and another write than the stale one, is its result: the stale value
	// was returned instead when the refresh beat this call to the join
	// (a starved caller, a fast source). That look is no flight: a Remember
	// that missed L1 meanwhile would join it as a load, and get its "stale,
	// nothing found" as the zero value.
	r, err, joined := c.flights.Join(wctx, rememberKey(key))
	if err == nil {
		err = r.err // a RememberMany's run joined: the load of key failed
	}
	if !joined {
		if c.beforeRefreshPeek != nil {
			c.beforeRefreshPeek(key)
		}
		r, err = readResult[V]{stale: true}, nil
		if e, ok := c.peekL1(key); ok && e.wid != wid && (e.fresh == 0 || c.now.Load() < e.fresh) {
			r = readResult[V]{val: e.val, found: !e.negative, negative: e.negative}
		}
	}
	switch {
	case err != nil || r.stale: // slow, or failing: fail-safe
		return stale, nil
	case r.negative:
		var zero V
		return zero, ErrNotFound
	case c.opts.CopyOnRead:
		v, _, err := c.copyValue(r.val)
		return v, err
	}
	return r.val, nil
}

func (c *Cache[V]) rememberSlow(ctx context.Context, key string, load Loader[V]) (v V, err error) {
	if err := c.checkKey(key); err != nil {
		return v, err
	}
	if load == nil {
		return v, errors.New("tiered: nil Loader")
	}
	if err := c.enter(); err != nil {
		return v, err
	}
	defer c.leave()
	if c.l1 != nil {
		c.st.l1Misses.Add(1)
	}
	if err := ctx.Err(); err != nil {
		return v, err
	}
	start := time.Now()
	defer func() {
		if !errors.Is(err, ErrNotFound) {
			c.tel.Op(ctx, metrics.OpRemember, start, err)
		} else {
			c.tel.Op(ctx, metrics.OpRemember, start, nil)
		}
	}()
	snap := c.snap(hashKey(key)) // before the flight exists (see readL2)
	r, err, _ := c.flights.Do(ctx, rememberKey(key), c.opts.LoadTimeout, func(ctx context.Context) (readResult[V], error) {
		if c.flightStart != nil {
			c.flightStart(key)
		}
		return c.readThrough(ctx, key, snap, load, 0)
	})
	if err == nil {
		err = r.err // a RememberMany's run joined: the load of key failed
	}
	// Errors here are the loader's (Redis failures go to the loader
	// instead), counted by callLoader, or the caller's ctx.
	var pe *flight.PanicError
	switch {
	case err != nil && c.closing.Load():
		return v, ErrClosed
	case errors.As(err, &pe):
		return v, &PanicError{Value: pe.Value, Stack: pe.Stack}
	case err != nil:
		return v, err
	case r.negative:
		return v, ErrNotFound
	case r.stale:
		v := r.val
		if c.opts.CopyOnRead {
			if v, _, err = c.copyValue(v); err != nil {
				return v, err
			}
		}
		return c.rememberStale(ctx, key, v, r.wid, load)
	case c.opts.CopyOnRead:
		v, _, err := c.copyValue(r.val)
		return v, err
	}
	return r.val, nil
}

// readThrough is one load of key: Redis, then the loader, then a fenced
// store into Redis and L1. A stale value found in Redis is returned marked
// stale. A refresh (replace: the write ID of the value it replaces) loads
// over that very write, fenced against it, and takes whatever else Redis
// holds instead (another instance refreshed first).
func (c *Cache[V]) readThrough(ctx context.Context, key string, s snapshot, load Loader[V], replace uint64) (readResult[V], error) {
	h := hashKey(key)
	var expect []byte // the write ID the key held before the load; nil: absent
	var gen uint64
	// kept is the value a refresh found Redis still holding (the write it
	// replaces): what it serves, fail-safe, if its load fails before
	// keptUntil, when Redis drops it.
	var kept *V
	var keptUntil time.Time
	noStore := c.memoryOnly()
	if !noStore && c.pending(key) {
		// This process's write of key is in the outbox: Redis may hold
		// what it replaced. Load, serve, and leave Redis to the replay.
		noStore = true
	}
	if !noStore {
		err := c.admit()
		var get *redis.StringCmd
		var pttl *redis.DurationCmd
		var dk string
		if err == nil {
			start := time.Now()
			sctx, span := c.tel.Span(ctx, "tiercache.l2.get", "PIPELINE", 1)
			l2ctx, cancel := c.opCtx(sctx)
			gen, err = c.generation(l2ctx, s)
			if err == nil {
				dk = c.dataKey(gen, key)
				pipe := c.rdb.Pipeline()
				get = pipe.Get(l2ctx, dk)
				pttl = pipe.PTTL(l2ctx, dk)
				_, err = pipe.Exec(l2ctx)
			}
			cancel()
			c.report(start, err)
			if errors.Is(err, redis.Nil) {
				metrics.End(span, nil)
			} else {
				metrics.End(span, err)
			}
		}
		if err != nil && !errors.Is(err, redis.Nil) {
			// Redis cannot answer (or the circuit is open); the source
			// can. Nothing goes to Redis; L1 keeps the value only for the
			// degraded bound if the stream is already untrusted.
			c.st.l2Errors.Add(1)
			return c.loadDegraded(ctx, key, h, s, load, replace != 0)
		}
		if raw, err := get.Bytes(); err == nil {
			val, payload, found, derr := c.decode(raw)
			switch {
			case derr != nil:
				// Corrupt bytes are deleted (if unchanged), so the store
				// expects the key absent; another writer's value (a newer
				// format, say) must not be overwritten, so nothing is stored.
				c.dropCorrupt(ctx, dk, raw, derr)
				c.st.l2Misses.Add(1)
				if foreign(derr) {
					noStore = true
				}
			case found && replace != 0 && c.storedWriteID(raw) == replace:
				c.st.l2Hits.Add(1)
				expect = raw[4:12] // load, and store only over this very write
				kept, keptUntil = &val, time.Now().Add(pttl.Val())
			case found:
				c.st.l2Hits.Add(1)
				c.fill(key, h, s, val, payload, raw, pttl.Val())
				fresh, wid := freshness(raw, c.opts.PlainJSON)
				stale := fresh != 0 && time.Now().UnixNano() >= fresh
				return readResult[V]{val: val, found: true, stale: stale && replace == 0, wid: wid}, nil
			case raw[3]&byte(wire.FlagNegative) != 0:
				c.st.l2Hits.Add(1)
				c.fillNegative(key, h, s, pttl.Val())
				return readResult[V]{negative: true}, nil
			default: // a tombstone: load, and store only over this very tombstone
				c.st.l2Misses.Add(1)
				expect = raw[4:12]
			}
		} else {
			c.st.l2Misses.Add(1)
		}
	}
	if c.afterL2Read != nil {
		c.afterL2Read(key)
	}
	if c.opts.Lease && !noStore {
		start := time.Now()
		lctx, span := c.tel.Span(ctx, "tiercache.lease", "SET", 1)
		r, done, release, err := c.lease(lctx, key, gen, s, &expect)
		metrics.End(span, err)
		if err != nil && ctx.Err() == nil {
			// Redis failed under the lease: the source can still answer.
			c.report(start, err)
			return c.loadDegraded(ctx, key, h, s, load, replace != 0)
		}
		if done || err != nil {
			return r, err
		}
		defer release()
	}
	started := time.Now()
	v, err := c.callLoader(ctx, key, load)
	switch {
	case errors.Is(err, ErrNotFound):
		switch {
		case noStore || c.opts.PlainJSON:
			// Nothing goes to Redis, where plain JSON has no form for
			// absence: a negative entry or a tombstone would be no JSON
			// to the Node.js side. L1 keeps it as fillLoaded keeps a value.
			c.absentUnstored(key, h, s, true, replace != 0)
		case c.opts.NegativeTTL > 0:
			c.storeLoaded(ctx, key, h, s, gen, expect, nil, started)
		case replace != 0:
			c.dropRefreshed(ctx, key, gen, expect)
		}
		return readResult[V]{negative: true}, nil
	case err != nil && kept != nil && time.Now().Before(keptUntil):
		return readResult[V]{val: *kept, found: true, stale: true, wid: replace}, err
	case err != nil:
		return readResult[V]{}, err
	}
	if !noStore {
		c.storeLoaded(ctx, key, h, s, gen, expect, &v, started)
	} else {
		c.fillLoaded(key, h, s, v)
	}
	return readResult[V]{val: v, found: true}, nil
}

// callLoader calls load for key, counted, timed and traced. A panic goes on
// up to the flight, which turns it into a PanicError, after being counted.
func (c *Cache[V]) callLoader(ctx context.Context, key string, load Loader[V]) (v V, err error) {
	ctx, done := c.startLoad(ctx, 1)
	result := "panic"
	defer func() { done(result, 1, err) }()
	v, err = load(ctx, key)
	switch {
	case err == nil:
		result = "ok"
	case errors.Is(err, ErrNotFound):
		result = "not_found"
	default:
		result = "error"
	}
	return v, err
}

// callBatchLoader is callLoader for a BatchLoader: keys it leaves out count
// as not found, and keys it returns that it was not asked for count as
// nothing (the caller ignores them).
func (c *Cache[V]) callBatchLoader(ctx context.Context, keys []string, load BatchLoader[V]) (vals map[string]V, err error) {
	ctx, done := c.startLoad(ctx, len(keys))
	result := "panic"
	found := 0
	defer func() { done(result, found, err) }()
	vals, err = load(ctx, keys)
	result = "ok"
	if err != nil {
		result = "error"
	}
	for _, k := range keys {
		if _, ok := vals[k]; ok {
			found++
		}
	}
	return vals, err
}

// startLoad opens the span of a load of n keys; done records its result
// ("ok", "not_found", "error" or "panic"; found is how many keys an "ok"
// load found) in the counters, the loader histogram and the span.
func (c *Cache[V]) startLoad(ctx context.Context, n int) (context.Context, func(result string, found int, err error)) {
	start := time.Now()
	ctx, span := c.tel.Span(ctx, "tiercache.load", "", n)
	return ctx, func(result string, found int, err error) {
		c.st.loads.Add(1)
		switch result {
		case "ok":
			c.st.loadOK.Add(uint64(found))
			c.st.loadNotFound.Add(uint64(n - min(n, found)))
		case "not_found":
			c.st.loadNotFound.Add(1)
			err = nil // an answer, not a failure
		default:
			c.st.loadErr.Add(uint64(n)) // per key, as the answers are
		}
		if result == "panic" {
			err = errLoaderPanic
		}
		c.tel.Load(ctx, start, result)
		metrics.End(span, err)
	}
}

// errLoaderPanic marks a load span whose loader panicked.
var errLoaderPanic = errors.New("tiered: loader panicked")

// fillLoaded puts a loaded value that does not go to Redis into L1.
func (c *Cache[V]) fillLoaded(key string, h uint64, s snapshot, v V) {
	if c.l1 == nil {
		return
	}
	var payload []byte
	if c.opts.CopyOnRead {
		var err error
		if payload, err = encode(c.opts.Codec, v); err != nil {
			return
		}
	}
	c.fill(key, h, s, v, payload, nil, c.jitter(c.opts.TTL)) // no Redis TTL bounds it: TTL does
}

// loadDegraded answers a read-through from the loader alone, because Redis
// cannot: no error surfaces when the loader can serve. The value goes to L1
// only under a snapshot already taken while the stream was untrusted, so it
// lives at most DegradedL1TTL (see degradedTTL); under a trusted snapshot it
// is not kept, since instances whose writes fail cannot invalidate it.
func (c *Cache[V]) loadDegraded(ctx context.Context, key string, h uint64, s snapshot, load Loader[V], refresh bool) (readResult[V], error) {
	c.st.degradedLoads.Add(1)
	v, err := c.callLoader(ctx, key, load)
	switch {
	case errors.Is(err, ErrNotFound):
		c.absentUnstored(key, h, s, false, refresh)
		return readResult[V]{negative: true}, nil
	case err != nil:
		return readResult[V]{}, err
	}
	if degraded(s) {
		c.fillLoaded(key, h, s, v)
	} else {
		c.invalidateLocal(key) // served, not kept: see storeLoaded
	}
	return readResult[V]{val: v, found: true}, nil
}

// storeLoaded stores a loaded value (or, for nil, a negative entry) into
// Redis through the fence, then into L1 if the fence let it through and no
// invalidation intervened.
func (c *Cache[V]) storeLoaded(ctx context.Context, key string, h uint64, s snapshot, gen uint64, expect []byte, v *V, started time.Time) {
	ttl := c.jitter(c.opts.TTL)
	var raw, payload []byte
	var err error
	if v == nil {
		ttl = c.jitter(c.opts.NegativeTTL)
		raw, err = wire.AppendEnvelope(nil, wire.Envelope{Flags: wire.FlagNegative, WriteID: writeID()}, -1)
	} else {
		raw, payload, err = c.encodeValue(*v)
	}
	// A loaded value that is returned but not stored voids the key: L1 may
	// hold an older value of it under a snapshot that is still current (a
	// stale entry this load refreshes, while a peer's write has reached the
	// source and Redis but not yet this instance), and no later read here
	// may go back to that.
	if err != nil {
		c.invalidateLocal(key)
		return // unencodable or too large: serve it, do not cache it
	}
	if !c.memoryOnly() {
		// A load older than the tombstones that fence it could slip past
		// them; its value is served but not stored.
		if time.Since(started) >= c.opts.TombstoneTTL {
			c.invalidateLocal(key)
			return
		}
		if c.admit() != nil {
			c.invalidateLocal(key)
			return
		}
		start := time.Now()
		sctx, span := c.tel.Span(ctx, "tiercache.l2.fill", "EVALSHA", 1)
		l2ctx, cancel := c.opCtx(sctx)
		stored, err := fillScript.Run(l2ctx, c.rdb, []string{c.dataKey(gen, key)}, expect, raw, max(ttl.Milliseconds(), 1)).Int()
		cancel()
		c.report(start, err)
		metrics.End(span, err)
		if err != nil || stored == 0 {
			if stored == 0 && err == nil {
				c.st.fencedFills.Add(1)
			}
			// Something wrote the key while we loaded, or Redis failed: L1
			// must not hold a value Redis does not.
			c.invalidateLocal(key)
			return
		}
	}
	if v == nil {
		c.fillNegative(key, h, s, ttl)
		return
	}
	c.fill(key, h, s, *v, payload, raw, ttl)
}

// dropRefreshed is what a refresh does when the loader says the key is gone
// and absence is not cached (NegativeTTL < 0): it leaves a tombstone over
// the write it refreshed (expect), as Delete would, and voids L1 here, so
// the stale value is served no more; later reads load, and find nothing.
// Other instances stop when their own copies go stale and their refreshes
// find the tombstone.
func (c *Cache[V]) dropRefreshed(ctx context.Context, key string, gen uint64, expect []byte) {
	defer c.invalidateLocal(key)
	if c.admit() != nil {
		return
	}
	start := time.Now()
	l2ctx, cancel := c.opCtx(ctx)
	err := fillScript.Run(l2ctx, c.rdb, []string{c.dataKey(gen, key)}, expect, tombstone(), max(c.opts.TombstoneTTL.Milliseconds(), 1)).Err()
	cancel()
	c.report(start, err)
}

// absentUnstored is what a load that found key absent at the source does
// when its answer goes to no Redis (ModeMemory, a key whose write waits in
// the outbox, Redis unable to answer, plain-JSON mode): with keep (where a loaded value would
// be kept in L1) and NegativeTTL > 0, the absence is kept in L1, as a value
// would be, but only under a trusted stream (fillNegative would void the
// key's stripe under another); otherwise a refresh voids the stale value it
// was loading for, so
// that the deleted value is served no more (as storeLoaded voids what it
// does not store). A load that is no refresh found nothing valid in L1, and
// voids nothing: absent keys are common, and each void costs a stripe.
func (c *Cache[V]) absentUnstored(key string, h uint64, s snapshot, keep, refresh bool) {
	if keep && c.opts.NegativeTTL > 0 && !degraded(s) {
		c.fillNegative(key, h, s, -1)
		return
	}
	if refresh {
		c.invalidateLocal(key)
	}
}

// fillNegative remembers in L1 that key is absent at the source.
func (c *Cache[V]) fillNegative(key string, h uint64, s snapshot, l2TTL time.Duration) {
	if c.l1 == nil {
		return
	}
	if s != c.snap(h) {
		c.invalidateLocal(key)
		return
	}
	if s.epoch&1 == 1 {
		c.invalidateLocal(key) // returned, not kept: see storeLoaded
		return
	}
	ttl := min(c.jitter(c.opts.NegativeTTL), c.jitter(c.opts.L1TTL))
	if l2TTL >= 0 && l2TTL < ttl {
		ttl = l2TTL
	}
	if ttl <= clockTick {
		c.invalidateLocal(key)
		return
	}
	c.store(h, &entry[V]{key: key, negative: true, stripe: s.stripe, ns: s.ns, epoch: s.epoch,
		expires: expiry(ttl), cost: int64(len(key) + entryCost)})
}

// BatchLoader loads the values of keys from the source of truth, for
// RememberMany. Keys it leaves out of the map are absent at the source and
// become negative entries, as with ErrNotFound. An error, ErrNotFound
// included, is a failure of every key it was asked for (to say some are
// absent, leave them out). Its context is like a Loader's.
type BatchLoader[V any] func(ctx context.Context, keys []string) (map[string]V, error)

// RememberMany is Remember for many keys: L1 hits first, then one Redis
// pipeline for the rest, then one call of load for the keys still missing.
// Keys that a Remember or RememberMany call in this process is already
// loading are joined, not loaded again, and single Remember calls join the
// keys this call loads. Absent keys are left out of the result. On error
// the map holds what was found before it.
//
// With Options.FreshFor, values past their fresh period are returned at once
// and refreshed in the background as with Remember (EagerRefresh too), in
// one call of load for the keys of the call that no other load or refresh
// has in flight; SoftTimeout applies to Remember only.
func (c *Cache[V]) RememberMany(ctx context.Context, keys []string, load BatchLoader[V]) (_ map[string]V, err error) {
	if err := c.checkKeys(keys); err != nil {
		return nil, err
	}
	if load == nil {
		return nil, errors.New("tiered: nil BatchLoader")
	}
	if err := c.enter(); err != nil {
		return nil, err
	}
	defer c.leave()
	var refresh []staleKey
	var hit func(string, *entry[V])
	if c.opts.FreshFor > 0 {
		hit = func(k string, e *entry[V]) {
			switch now := c.now.Load(); {
			case e.fresh == 0:
			case now >= e.fresh:
				refresh = append(refresh, staleKey{key: k, wid: e.wid, stale: true})
			case e.eager != 0 && now >= e.eager:
				refresh = append(refresh, staleKey{key: k, wid: e.wid})
			}
		}
	}
	out, missing, err := c.l1Many(keys, hit)
	defer func() { c.refreshMany(ctx, refresh, load) }()
	if err != nil {
		return out, err
	}
	if len(missing) == 0 {
		return out, nil
	}
	if err := ctx.Err(); err != nil {
		return out, err
	}
	start := time.Now()
	defer func() { c.tel.Op(ctx, metrics.OpRememberMany, start, err) }()
	fkeys := make([]string, len(missing))
	snaps := make(map[string]snapshot, len(missing)) // before the flights exist (see readL2)
	for i, k := range missing {
		fkeys[i] = rememberKey(k)
		snaps[k] = c.snap(hashKey(k))
	}
	results := c.flights.DoMany(ctx, fkeys, c.opts.LoadTimeout, func(ctx context.Context, fkeys []string) (map[string]readResult[V], error) {
		keys := make([]string, len(fkeys))
		for i, fk := range fkeys {
			keys[i] = fk[1:]
		}
		out, err := c.readThroughMany(ctx, keys, snaps, load, nil)
		if err != nil {
			// The loader failed: that fails the keys it was asked for, not
			// those Redis answered, which a Remember of one of them that
			// joined this run gets, as it would have alone.
			for _, k := range keys {
				if _, ok := out[rememberKey(k)]; !ok {
					out[rememberKey(k)] = readResult[V]{err: err}
				}
			}
		}
		return out, nil
	})
	err = c.collect(out, missing, results, false)
	for i, r := range results {
		if r.Err == nil && r.Val.found && r.Val.stale {
			refresh = append(refresh, staleKey{key: missing[i], wid: r.Val.wid, stale: true})
		}
	}
	return out, err
}

// staleKey is a key RememberMany answered with a value due for a refresh:
// stale (past FreshFor), or only past EagerRefresh.
type staleKey struct {
	key   string
	wid   uint64 // the write ID the refresh replaces
	stale bool
}

// refreshMany refreshes in the background what RememberMany served stale
// (or past EagerRefresh): the keys no refresh or load has in flight, not
// held off by RetryThrottle, in one run and one call of load, each stored
// only over the write it replaces. A failed refresh keeps the values
// (fail-safe) and holds off those keys for RetryThrottle.
func (c *Cache[V]) refreshMany(ctx context.Context, keys []staleKey, load BatchLoader[V]) {
	if len(keys) == 0 {
		return
	}
	now := time.Now().UnixNano()
	var fkeys []string
	replace := make(map[string]uint64, len(keys))
	snaps := make(map[string]snapshot, len(keys))
	for _, k := range keys {
		if k.stale {
			c.st.staleServed.Add(1)
		}
		if until, ok := c.throttle.Load(k.key); ok && now < until.(int64) {
			continue
		}
		if _, dup := replace[k.key]; dup {
			continue
		}
		replace[k.key] = k.wid
		snaps[k.key] = c.snap(hashKey(k.key)) // before the flight exists (see readL2)
		fkeys = append(fkeys, rememberKey(k.key))
	}
	c.flights.GoMany(ctx, fkeys, c.opts.LoadTimeout, func(ctx context.Context, fkeys []string) (map[string]readResult[V], error) {
		ks := make([]string, len(fkeys))
		for i, fk := range fkeys {
			ks[i] = fk[1:]
		}
		c.st.refreshes.Add(uint64(len(ks)))
		defer func() {
			if p := recover(); p != nil { // a panicking loader is held off too, as in refreshAsync
				c.st.failSafe.Add(uint64(len(ks)))
				until := time.Now().Add(c.opts.RetryThrottle).UnixNano()
				for _, k := range ks {
					c.holdOff(k, until)
				}
				panic(p) // the flight turns it into its joiners' error
			}
		}()
		out, err := c.readThroughMany(ctx, ks, snaps, load, replace)
		if err != nil {
			if c.closing.Load() {
				return out, err
			}
			c.st.failSafe.Add(uint64(len(ks)))
			until := time.Now().Add(c.opts.RetryThrottle).UnixNano()
			for _, k := range ks {
				c.holdOff(k, until)
			}
			// Fail-safe, for the callers that joined too, if every key
			// has a value to serve: one Redis still held (or took from
			// another instance's refresh). Otherwise they get the error.
			for _, k := range ks {
				if _, ok := out[rememberKey(k)]; !ok {
					return out, err
				}
			}
			return out, nil
		}
		for _, k := range ks {
			c.throttle.Delete(k)
		}
		return out, nil
	})
}

// readThroughMany is readThrough for a batch: one pipeline to Redis, one
// call of load for what Redis does not have, then each loaded value stored
// through the fence. The result is keyed by flight key.
//
// With replace (a refresh), a key whose Redis value is still the write
// replace names is loaded and stored over that very write; one that holds
// another write (another instance refreshed first) takes it instead.
func (c *Cache[V]) readThroughMany(ctx context.Context, keys []string, snaps map[string]snapshot, load BatchLoader[V], replace map[string]uint64) (map[string]readResult[V], error) {
	out := make(map[string]readResult[V], len(keys))
	expect := make(map[string][]byte, len(keys))
	keptUntil := make(map[string]time.Time) // a refresh's stale values: until when Redis holds them
	noStore := make(map[string]bool)
	var gen uint64
	// Keys this process's failed writes left in the outbox: Redis may hold
	// what those writes replaced, so they are loaded, served, and left to
	// the replay (as in readThrough).
	var pendingKeys []string
	if !c.memoryOnly() {
		var rest []string
		for _, k := range keys {
			if c.pending(k) {
				noStore[k] = true
				pendingKeys = append(pendingKeys, k)
			} else {
				rest = append(rest, k)
			}
		}
		keys = rest
	}
	toLoad := keys
	switch {
	case len(keys) == 0: // only pending keys: nothing to read from Redis
	case c.memoryOnly():
		for _, k := range keys {
			noStore[k] = true
		}
	default:
		if err := c.admit(); err != nil {
			c.st.l2Errors.Add(uint64(len(keys)))
			c.st.degradedLoads.Add(uint64(len(keys)))
			for _, k := range keys {
				noStore[k] = true
			}
			break
		}
		start := time.Now()
		l2ctx, cancel := c.opCtx(ctx)
		var err error
		if gen, err = c.generation(l2ctx, snaps[keys[0]]); err != nil {
			// Redis cannot answer: the source can, as below (before, the
			// whole call failed while Remember went to the loader).
			cancel()
			c.report(start, err)
			c.st.l2Errors.Add(uint64(len(keys)))
			c.st.degradedLoads.Add(uint64(len(keys)))
			for _, k := range keys {
				noStore[k] = true
			}
			break
		}
		pipe := c.rdb.Pipeline()
		gets := make([]*redis.StringCmd, len(keys))
		ttls := make([]*redis.DurationCmd, len(keys))
		for i, k := range keys {
			dk := c.dataKey(gen, k)
			gets[i], ttls[i] = pipe.Get(l2ctx, dk), pipe.PTTL(l2ctx, dk)
		}
		cmds, err := pipe.Exec(l2ctx)
		cancel()
		c.report(start, pipeErr(cmds, err))
		if err == nil || errors.Is(err, redis.Nil) {
			toLoad = nil
			for i, k := range keys {
				raw, err := gets[i].Bytes()
				if err != nil {
					if errors.Is(err, redis.Nil) {
						c.st.l2Misses.Add(1)
					} else { // an error reply for this key (WRONGTYPE): load it, store nothing
						c.st.l2Errors.Add(1)
						noStore[k] = true
					}
					toLoad = append(toLoad, k)
					continue
				}
				h := hashKey(k)
				val, payload, found, derr := c.decode(raw)
				switch {
				case derr != nil:
					c.dropCorrupt(ctx, c.dataKey(gen, k), raw, derr)
					c.st.l2Misses.Add(1)
					noStore[k] = foreign(derr)
					toLoad = append(toLoad, k)
				case found && replace[k] != 0 && c.storedWriteID(raw) == replace[k]:
					c.st.l2Hits.Add(1)
					expect[k] = raw[4:12] // load, and store only over this very write
					toLoad = append(toLoad, k)
					// What a failed refresh serves, fail-safe, while Redis
					// still holds it.
					out[rememberKey(k)] = readResult[V]{val: val, found: true, stale: true, wid: replace[k]}
					keptUntil[k] = time.Now().Add(ttls[i].Val())
				case found:
					c.st.l2Hits.Add(1)
					c.fill(k, h, snaps[k], val, payload, raw, ttls[i].Val())
					fresh, wid := freshness(raw, c.opts.PlainJSON)
					stale := fresh != 0 && time.Now().UnixNano() >= fresh && replace[k] == 0
					out[rememberKey(k)] = readResult[V]{val: val, found: true, stale: stale, wid: wid}
				case raw[3]&byte(wire.FlagNegative) != 0:
					c.st.l2Hits.Add(1)
					c.fillNegative(k, h, snaps[k], ttls[i].Val())
					out[rememberKey(k)] = readResult[V]{negative: true}
				default: // a tombstone
					c.st.l2Misses.Add(1)
					expect[k] = raw[4:12]
					toLoad = append(toLoad, k)
				}
			}
		} else {
			c.st.l2Errors.Add(uint64(len(keys)))
			c.st.degradedLoads.Add(uint64(len(keys))) // Redis cannot answer: the source can; nothing is stored
			for _, k := range keys {
				noStore[k] = true
			}
		}
	}
	toLoad = append(toLoad, pendingKeys...)
	if len(toLoad) == 0 {
		return out, nil
	}
	started := time.Now()
	vals, err := c.callBatchLoader(ctx, toLoad, load)
	if err != nil {
		// With a refresh, out holds the stale values it may serve, but
		// not those Redis has dropped since.
		for k, until := range keptUntil {
			if !time.Now().Before(until) {
				delete(out, rememberKey(k))
			}
		}
		return out, err
	}
	for _, k := range toLoad {
		h := hashKey(k)
		v, ok := vals[k]
		switch {
		case ok:
			out[rememberKey(k)] = readResult[V]{val: v, found: true}
			if !noStore[k] {
				c.storeLoaded(ctx, k, h, snaps[k], gen, expect[k], &v, started)
			} else if degraded(snaps[k]) || c.memoryOnly() {
				c.fillLoaded(k, h, snaps[k], v)
			} else {
				c.invalidateLocal(k) // served, not kept: see storeLoaded
			}
		default:
			out[rememberKey(k)] = readResult[V]{negative: true}
			switch {
			case noStore[k] || c.opts.PlainJSON: // as in readThrough
				c.absentUnstored(k, h, snaps[k], !noStore[k] || degraded(snaps[k]) || c.memoryOnly(), replace[k] != 0)
			case c.opts.NegativeTTL > 0:
				c.storeLoaded(ctx, k, h, snaps[k], gen, expect[k], nil, started)
			case replace[k] != 0:
				c.dropRefreshed(ctx, k, gen, expect[k])
			}
		}
	}
	return out, nil
}

// leasePoll is how often an instance waiting for another's load looks in
// Redis for its result.
const leasePoll = 10 * time.Millisecond

// renewScript extends a lease only if this load still holds it.
var renewScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0`)

// leaseTTL is how long a lease lives unless its holder renews it: a third
// of LoadTimeout (at least leasePoll), so that when a holder dies the
// instances waiting for it, whose wait LoadTimeout bounds too, still have
// two thirds of it to load themselves. A live holder renews it every third
// of it until it releases (see lease).
func (c *Cache[V]) leaseTTL() time.Duration { return max(c.opts.LoadTimeout/3, leasePoll) }

// releaseScript deletes a lease only if this load still holds it.
var releaseScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0`)

// lease makes one instance of the fleet load key (Options.Lease): it takes
// a lease in Redis (SET NX PX, next to the key so they share a cluster
// slot) and, if another instance holds it, polls Redis every leasePoll for
// that instance's result, taking the lease over if it expires first (the
// holder died). done reports that the result was found in Redis; otherwise
// this load holds the lease and must call release when it has stored its
// value. expect is the write ID Redis held when the caller read the key
// (nil: absent), updated to what Redis held when the lease was taken.
//
// Each attempt sends the SET NX and a read of the key in one pipeline, the
// read second: a holder stores its result before it releases, so an attempt
// that finds the lease free also finds whatever the last holder stored, and
// does not load it again. (The read was a separate poll after a failed SET:
// a holder that stored and released between the poll and the next SET left
// the next SET to take the lease over a result it never saw, and load again.)
func (c *Cache[V]) lease(ctx context.Context, key string, gen uint64, s snapshot, expect *[]byte) (r readResult[V], done bool, release func(), err error) {
	dk := c.dataKey(gen, key)
	lk := c.leaseKey(gen, key)
	token := strconv.FormatUint(writeID(), 36)
	h := hashKey(key)
	ttl := c.leaseTTL()
	for {
		l2ctx, cancel := c.opCtx(ctx)
		pipe := c.rdb.Pipeline()
		took := pipe.SetNX(l2ctx, lk, token, ttl)
		get, pttl := pipe.Get(l2ctx, dk), pipe.PTTL(l2ctx, dk)
		_, err := pipe.Exec(l2ctx)
		cancel()
		if err != nil && !errors.Is(err, redis.Nil) {
			// The SET may have taken the lease all the same (its reply
			// lost): it expires in ttl, as a dead holder's does.
			return r, false, nil, fmt.Errorf("tiered: lease %q: %w", key, err)
		}
		r, done = c.leaseResult(key, h, s, get, pttl, expect)
		switch {
		case done && took.Val():
			// Another load stored its result and released the lease
			// since this one read the key: the result is here, and the
			// lease goes back at once.
			c.releaseLease(context.WithoutCancel(ctx), lk, token, ttl)
			return r, true, nil, nil
		case done:
			return r, true, nil, nil
		case took.Val():
			c.st.leases.Add(1)
			return r, false, c.renewLease(ctx, lk, token, ttl), nil
		}
		// Another instance is loading: wait for its result.
		c.st.leaseWaits.Add(1)
		t := time.NewTimer(leasePoll)
		select {
		case <-ctx.Done():
			t.Stop()
			return r, false, nil, ctx.Err()
		case <-t.C:
		}
	}
}

// leaseResult looks at what a lease attempt read of the key: a value or a
// negative entry other than the write expect names is another load's
// result, filled into L1; a tombstone, or the key's absence, becomes
// what this load must store over.
func (c *Cache[V]) leaseResult(key string, h uint64, s snapshot, get *redis.StringCmd, pttl *redis.DurationCmd, expect *[]byte) (readResult[V], bool) {
	raw, err := get.Bytes()
	if err != nil {
		*expect = nil
		return readResult[V]{}, false
	}
	if *expect != nil && len(raw) >= 12 && bytes.Equal(raw[4:12], *expect) {
		return readResult[V]{}, false // the very write this load replaces
	}
	val, payload, found, derr := c.decode(raw)
	switch {
	case derr != nil:
		// Left as it is: the caller's read dealt with corrupt bytes.
	case found:
		c.fill(key, h, s, val, payload, raw, pttl.Val())
		return readResult[V]{val: val, found: true}, true
	case raw[3]&byte(wire.FlagNegative) != 0:
		c.fillNegative(key, h, s, pttl.Val())
		return readResult[V]{negative: true}, true
	default: // a tombstone: what our own store must replace
		*expect = raw[4:12]
	}
	return readResult[V]{}, false
}

// renewLease keeps a lease this load took alive while the load runs, so
// that only a dead holder's lease expires, and returns the release that
// stops the renewing and gives the lease back. The renewing goroutine
// belongs to the load: release stops it and waits for it.
func (c *Cache[V]) renewLease(ctx context.Context, lk, token string, ttl time.Duration) (release func()) {
	bg := context.WithoutCancel(ctx)
	stop, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		tick := time.NewTicker(ttl / 3)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				rctx, cancel := context.WithTimeout(bg, ttl/3)
				_ = renewScript.Run(rctx, c.rdb, []string{lk}, token, ttl.Milliseconds()).Err()
				cancel()
			}
		}
	}()
	return func() {
		close(stop)
		<-stopped
		c.releaseLease(bg, lk, token, ttl)
	}
}

// releaseLease deletes the lease lk if token still holds it. Best effort:
// a lease left behind expires in ttl.
func (c *Cache[V]) releaseLease(ctx context.Context, lk, token string, ttl time.Duration) {
	d := c.opts.CommandTimeout
	if d <= 0 {
		d = ttl // CommandTimeout < 0: no bound of its own; the lease's life is one
	}
	ctx, cancel := context.WithTimeout(ctx, d)
	_ = releaseScript.Run(ctx, c.rdb, []string{lk}, token).Err()
	cancel()
}
