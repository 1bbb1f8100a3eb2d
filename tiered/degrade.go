package tiered

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tiercache/tiercache/invalidate"
)

// ErrCircuitOpen is wrapped by the error of a call that needed Redis while
// the Bus's circuit breaker was open (Redis failing or unreachable): the
// call failed fast without a round trip. Remember does not return it when
// its loader can answer.
var ErrCircuitOpen = invalidate.ErrCircuitOpen

// admit lets a Redis round trip go ahead unless the circuit is open.
func (c *Cache[V]) admit() error {
	if c.bus == nil {
		return nil
	}
	if err := c.bus.Allow(); err != nil {
		c.st.refused.Add(1)
		return fmt.Errorf("tiered: %w", err)
	}
	return nil
}

// report tells the circuit breaker how a round trip admitted at start went.
// A deadline counts as Redis's failure only if the round trip had its full
// CommandTimeout: a caller's own short deadline says nothing about Redis.
func (c *Cache[V]) report(start time.Time, err error) {
	if c.bus == nil {
		return
	}
	if err == nil || errors.Is(err, redis.Nil) {
		c.bus.Report(nil)
		return
	}
	if !invalidate.Unavailable(err) {
		return
	}
	if errors.Is(err, context.DeadlineExceeded) && c.opts.CommandTimeout > 0 && time.Since(start) < c.opts.CommandTimeout*9/10 {
		return
	}
	c.reloadCluster()
	c.bus.Report(err)
}

// reloadCluster asks a ClusterClient to reload its slot map, at most every
// 100 ms. go-redis reloads it only on MOVED/ASK or once a minute, not on
// connection errors, so after a master dies and its replica takes over it
// would keep sending that master's slots to the dead address.
func (c *Cache[V]) reloadCluster() {
	cc, ok := c.rdb.(*redis.ClusterClient)
	if !ok {
		return
	}
	now := time.Now().UnixNano()
	last := c.lastReload.Load()
	if now-last < int64(100*time.Millisecond) || !c.lastReload.CompareAndSwap(last, now) {
		return
	}
	cc.ReloadState(context.Background())
}

// memoryOnly reports whether the cache runs on L1 alone: ModeMemory, or
// SetMode(ModeMemory) on a tiered cache.
func (c *Cache[V]) memoryOnly() bool {
	return c.rdb == nil || c.forced.Load()
}

// pending reports whether this process failed to write key to Redis and has
// not replayed its invalidation yet: Redis may hold an older value than the
// one this process wrote, so reads skip it.
func (c *Cache[V]) pending(key string) bool {
	if c.bus == nil || !c.bus.Pending(c.name, key) {
		return false
	}
	c.st.pendingSkips.Add(1)
	return true
}

// degraded reports whether a snapshot was taken while the invalidation
// stream was not trusted.
func degraded(s snapshot) bool { return s.epoch&1 == 1 }

// SetMode switches a running cache between ModeTiered and ModeMemory: the
// live form of CACHE_TYPE, for rollback without a restart. In ModeMemory the
// cache neither reads nor writes Redis; its writes go to L1 and their keys to
// the Bus's outbox, whose replay deletes them from Redis and invalidates
// them in every instance, so no instance later reads what they replaced.
// Every switch voids L1, since what it held was not kept coherent the same
// way. A cache created in ModeMemory or ModeRedis cannot switch.
//
// The Bus's circuit breaker gives the same degraded service automatically
// while Redis is unhealthy, and ends it by itself; SetMode is the manual
// override.
func (c *Cache[V]) SetMode(m Mode) error {
	if c.opts.Mode != ModeTiered || c.l1 == nil {
		return fmt.Errorf("tiered: a cache created in %v mode cannot switch modes", c.opts.Mode)
	}
	switch m {
	case ModeMemory, ModeTiered:
	default:
		return fmt.Errorf("tiered: cannot switch to %v mode (only tiered and memory)", m)
	}
	if err := c.enter(); err != nil {
		return err
	}
	defer c.leave()
	if c.forced.Swap(m == ModeMemory) != (m == ModeMemory) {
		c.invalidateAll()
	}
	return nil
}

// CurrentMode is the mode the cache runs in now: its Options.Mode, unless
// SetMode changed it.
func (c *Cache[V]) CurrentMode() Mode {
	if c.forced.Load() {
		return ModeMemory
	}
	return c.opts.Mode
}

// deferKeys puts keys whose write did not (surely) reach Redis in the
// outbox; see invalidate.Bus.Defer.
func (c *Cache[V]) deferKeys(keys []string) {
	if c.beforeDefer != nil {
		c.beforeDefer(keys)
	}
	if c.bus != nil {
		c.bus.Defer(c.name, keys...)
	}
}

// Replay redoes, from the Bus's outbox, invalidations that could not reach
// Redis: delete the keys (leaving tombstones) and publish their invalidation,
// or with flush clear the namespace. It bypasses the circuit breaker, which
// it is probing for.
func (h handler[V]) Replay(ctx context.Context, keys []string, flush bool) error {
	c := h.c
	if err := c.enter(); err != nil {
		// Closing: admitted only during Shutdown's final replay, which
		// holds off teardown while this read lock is held; afterwards
		// Shutdown drops what is left.
		c.mu.RLock()
		if !c.finalReplay.Load() {
			c.mu.RUnlock()
			return invalidate.ErrNotReplayed
		}
	}
	defer c.leave()
	if c.beforeReplay != nil {
		c.beforeReplay()
	}
	var err error
	if flush {
		err = c.clearRedis(ctx)
	} else {
		_, err = c.writeRedis(ctx, keys, writeItems{}, false)
	}
	if invalidate.Unavailable(err) {
		c.reloadCluster()
	}
	return err
}

var _ invalidate.Replayer = handler[int]{}
