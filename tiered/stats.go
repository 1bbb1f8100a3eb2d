package tiered

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/tiercache/tiercache/metrics"
)

// counters are the cache's own figures; each is touched only on slow paths
// (L1 hits are counted in Cache.hits, one cell per P, for the hot path).
type counters struct {
	l1Misses              atomic.Uint64 // reads L1 could not answer (absent, expired or fenced off)
	l1Sets, l1SetCost     atomic.Uint64 // entries handed to ristretto, and their cost
	l1Exits, l1ExitCost   atomic.Uint64 // entries that left it (replaced, deleted, evicted, rejected)
	l1Evicted, l1Rejected atomic.Uint64 // evictions for space; admission rejections
	l1Dropped             atomic.Uint64 // fills ristretto's buffer had no room for
	l2Hits, l2Misses      atomic.Uint64
	l2Errors              atomic.Uint64 // key reads Redis failed or the open circuit refused (Get, GetMany, Remember, RememberMany)
	writes, errors        atomic.Uint64
	corrupt               atomic.Uint64
	loads, fencedFills    atomic.Uint64 // loader calls; loaded values Redis refused (written meanwhile)
	leases, leaseWaits    atomic.Uint64 // leases taken; polls for another instance's load
	staleServed           atomic.Uint64 // values past their fresh period returned by Remember and RememberMany (one per key)
	refreshes, failSafe   atomic.Uint64 // background refreshes; of those, failed ones (stale kept)
	refused               atomic.Uint64 // Redis calls the open circuit refused
	degradedLoads         atomic.Uint64 // Remember answers the loader gave because Redis could not
	degradedFills         atomic.Uint64 // L1 entries stored while the stream was untrusted
	pendingSkips          atomic.Uint64 // reads that skipped Redis for a key in the outbox
	loadOK, loadNotFound  atomic.Uint64 // loader calls by result
	loadErr               atomic.Uint64 // (errors and panics)
	published             atomic.Uint64 // invalidation messages published with writes
	l1Flushes             atomic.Uint64 // whole-namespace L1 voids
}

// telemetry is the cache's figures for its observable instruments.
func (c *Cache[V]) telemetry() metrics.CacheSnapshot {
	st := c.Stats()
	return metrics.CacheSnapshot{
		L1Hits: st.L1.Hits, L1Misses: st.L1.Misses,
		L2Hits: st.L2.Hits, L2Misses: st.L2.Misses, L2Errors: c.st.l2Errors.Load(),
		LoaderHits: c.st.loadOK.Load(), LoaderNotFound: c.st.loadNotFound.Load(), LoaderErrors: c.st.loadErr.Load(),
		StaleServed: st.StaleServed, FailSafe: st.FailSafe, DegradedLoads: st.DegradedLoads, Refused: st.Refused,
		Joined: c.flights.Joined(), Published: c.st.published.Load(),
		L1Keys: st.Keys, L1Cost: st.Memory, L1Evictions: st.Evictions, L1Flushes: c.st.l1Flushes.Load(),
	}
}

// TierStats counts reads answered by one tier.
type TierStats struct {
	Hits     uint64  `json:"hits"`
	Misses   uint64  `json:"misses"`
	HitRatio float64 `json:"hitRatio"`
}

func tier(hits, misses uint64) TierStats {
	t := TierStats{Hits: hits, Misses: misses}
	if n := hits + misses; n > 0 {
		t.HitRatio = float64(hits) / float64(n)
	}
	return t
}

// Stats is a snapshot of a cache's figures. Its JSON shape keeps the fields
// the Node.js service's operators know (type, keys, memory, hitRatio,
// evictions, uptime) and adds per-tier figures.
type Stats struct {
	// Type is the mode: "tiered", "memory" or "redis".
	Type string `json:"type"`
	// Keys and Memory describe L1: entries held and their cost in bytes
	// (approximate: an expired entry stays until it is refilled or evicted
	// for space, and so in ModeTiered does an invalidated or deleted one,
	// which an invalidation voids without removing; in ModeMemory a delete
	// removes its entry. L1MaxCost bounds it all).
	Keys   uint64 `json:"keys"`
	Memory uint64 `json:"memory"`
	// HitRatio is the share of reads answered by either tier: L1 hits plus
	// L2 hits over all reads (capped at 1, since L2 also counts the Redis
	// reads of background refreshes). A Get that waited for a Remember of
	// its key and took what it stored counts as an L1 miss only.
	HitRatio float64 `json:"hitRatio"`
	// Evictions counts L1 entries evicted to make room.
	Evictions uint64 `json:"evictions"`
	// L1SetsDropped and L1SetsRejected count fills L1 refused (buffer full,
	// or admission judged the key too cold): high values mean L1 is too
	// small or the key space too flat.
	L1SetsDropped  uint64 `json:"l1SetsDropped"`
	L1SetsRejected uint64 `json:"l1SetsRejected"`
	// L1 and L2 count reads per tier. A read that misses L1 and hits L2
	// counts once in each.
	L1 TierStats `json:"l1"`
	L2 TierStats `json:"l2"`
	// Writes counts keys written or deleted; Errors, operations that failed
	// against Redis; Corrupt, undecodable values found (and deleted) in L2.
	Writes  uint64        `json:"writes"`
	Errors  uint64        `json:"errors"`
	Corrupt uint64        `json:"corrupt"`
	Uptime  time.Duration `json:"uptime"`
	// Remember's figures: loader calls; loaded values Redis refused
	// because the key was written meanwhile; stale values served
	// (FreshFor); background refreshes, and those that failed so the stale
	// value was kept (fail-safe); fleet leases taken, and polls while
	// another instance held one.
	Loads       uint64 `json:"loads"`
	FencedFills uint64 `json:"fencedFills"`
	StaleServed uint64 `json:"staleServed"`
	Refreshes   uint64 `json:"refreshes"`
	FailSafe    uint64 `json:"failSafe"`
	Leases      uint64 `json:"leases"`
	LeaseWaits  uint64 `json:"leaseWaits"`
	// Degraded operation (Redis unhealthy): Redis calls refused by the open
	// circuit; Remember answers served by the loader because Redis could
	// not answer (fallback use); L1 entries kept for DegradedL1TTL while
	// the stream was untrusted; reads that skipped Redis because this
	// process's write of the key is still in the outbox.
	Refused       uint64 `json:"refused"`
	DegradedLoads uint64 `json:"degradedLoads"`
	DegradedFills uint64 `json:"degradedFills"`
	PendingSkips  uint64 `json:"pendingSkips"`
}

// Stats returns the cache's figures. It is cheap enough to call per scrape,
// not per request.
func (c *Cache[V]) Stats() Stats {
	s := Stats{
		Type:    c.CurrentMode().String(),
		Writes:  c.st.writes.Load(),
		Errors:  c.st.errors.Load(),
		Corrupt: c.st.corrupt.Load(),
		Uptime:  time.Since(c.start),

		Loads:       c.st.loads.Load(),
		FencedFills: c.st.fencedFills.Load(),
		StaleServed: c.st.staleServed.Load(),
		Refreshes:   c.st.refreshes.Load(),
		FailSafe:    c.st.failSafe.Load(),
		Leases:      c.st.leases.Load(),
		LeaseWaits:  c.st.leaseWaits.Load(),

		Refused:       c.st.refused.Load(),
		DegradedLoads: c.st.degradedLoads.Load(),
		DegradedFills: c.st.degradedFills.Load(),
		PendingSkips:  c.st.pendingSkips.Load(),
	}
	if c.l1 != nil {
		s.L1 = tier(c.hits.Load(), c.st.l1Misses.Load())
		exits, sets := c.st.l1Exits.Load(), c.st.l1Sets.Load()
		s.Keys = sets - min(sets, exits)
		exitCost, setCost := c.st.l1ExitCost.Load(), c.st.l1SetCost.Load()
		s.Memory = setCost - min(setCost, exitCost)
		s.Evictions = c.st.l1Evicted.Load()
		s.L1SetsDropped = c.st.l1Dropped.Load()
		s.L1SetsRejected = c.st.l1Rejected.Load()
	}
	s.L2 = tier(c.st.l2Hits.Load(), c.st.l2Misses.Load())
	total := s.L1.Hits + s.L1.Misses
	if c.l1 == nil {
		total = s.L2.Hits + s.L2.Misses
	}
	if total > 0 {
		// L2 counts background refreshes' reads too, which no caller made.
		s.HitRatio = min(1, float64(s.L1.Hits+s.L2.Hits)/float64(total))
	}
	return s
}

// Ping checks that Redis answers. In ModeMemory it returns nil.
func (c *Cache[V]) Ping(ctx context.Context) error {
	if c.closing.Load() {
		return ErrClosed
	}
	if c.rdb == nil {
		return nil
	}
	ctx, cancel := c.opCtx(ctx)
	defer cancel()
	if err := c.rdb.Ping(ctx).Err(); err != nil {
		return fmt.Errorf("tiered: ping: %w", err)
	}
	return nil
}

// Health is what a health endpoint reports about a cache.
type Health struct {
	// Status is "ok", or "degraded" when Redis does not answer, the circuit
	// is open, the invalidation stream is not live (L1 is then bypassed),
	// or the cache was switched to memory-only.
	Status      string    `json:"status"`
	Type        string    `json:"type"`
	Redis       bool      `json:"redis"`
	RedisError  string    `json:"redisError,omitempty"`
	BusLive     bool      `json:"busLive"`
	LastHeard   time.Time `json:"lastHeard,omitzero"`
	CircuitOpen bool      `json:"circuitOpen"`
	OutboxDepth int       `json:"outboxDepth"`
	Keys        uint64    `json:"keys"`
	Memory      uint64    `json:"memory"`
}

// Health pings Redis and reports the Bus's liveness.
func (c *Cache[V]) Health(ctx context.Context) Health {
	st := c.Stats()
	h := Health{Status: "ok", Type: st.Type, Keys: st.Keys, Memory: st.Memory, Redis: true, BusLive: true}
	if c.rdb != nil {
		if err := c.Ping(ctx); err != nil {
			h.Redis, h.RedisError = false, err.Error()
		}
	}
	if c.bus != nil {
		h.BusLive, h.LastHeard = c.bus.Live(), c.bus.LastHeard()
		h.CircuitOpen, h.OutboxDepth = c.bus.CircuitOpen(), c.bus.OutboxDepth()
	}
	if !h.Redis || !h.BusLive || h.CircuitOpen || c.forced.Load() {
		h.Status = "degraded"
	}
	return h
}
