// Package tiered is a two-tier cache for Go services that run as several
// instances: an L1 in each process (ristretto, decoded values) in front of a
// shared L2 (Redis), kept coherent by invalidations that every write
// publishes over Redis pub/sub (package invalidate).
//
// A Cache[V] holds the values of one namespace. Many caches share one Redis
// client and one invalidate.Bus per process:
//
//	bus, _ := invalidate.New(rdb, invalidate.Options{})
//	defer bus.Close()
//	users, _ := tiered.New[User]("users", rdb, bus, tiered.Options{})
//	defer users.Close()
//
// # Consistency
//
// Once Set or Delete has returned on any instance, every instance whose
// invalidation stream is live returns that value or a newer one as soon as
// the invalidation has crossed one pub/sub hop (well under a millisecond on
// a LAN). An instance that has not heard its stream for the Bus's
// HeartbeatTimeout (1 s by default) stops serving L1 and reads Redis until it
// has subscribed again, and then drops everything L1 held: pub/sub loses
// messages during a disconnect, so every gap is assumed to have lost some.
// Staleness is therefore bounded by HeartbeatTimeout even through
// partitions, Redis restarts and killed connections.
//
// Every L1 entry carries a snapshot of the fence (the key's stripe counter,
// the namespace epoch, the Bus epoch) taken before the L2 read that produced
// it, and a hit counts only if the snapshot is still current. So a read that
// started before a write or an invalidation never lands in L1 after it,
// whatever order ristretto applies its asynchronous Sets in; reads on one
// instance are monotonic. The write path never stores into L1: it mutates
// Redis and publishes in one MULTI/EXEC, then invalidates locally; the next read
// refills.
//
// An L1 entry never outlives the Redis key it was read from: its TTL is the
// smaller of Options.L1TTL and the key's remaining TTL, read in the same
// round trip. Every TTL is jittered downwards.
//
// What the cache does not promise: it does not see writes made to Redis by
// anything but this package (or a peer speaking docs/wire.md); in
// plain-JSON mode a Node.js writer must publish invalidations itself.
//
// # Read-through
//
// Remember and RememberMany turn the cache into a read-through: L1, then
// Redis, then the loader, once per key per process (once per fleet with
// Options.Lease). The load runs detached from its callers, bounded by
// Options.LoadTimeout; each caller leaves when its own ctx says so, and the
// load is cancelled only when all of them have. Its store into Redis is a
// compare-and-set against the write it replaces, so a load that read the
// source before a write never overwrites that write; writers update the
// source first, then call Set or Delete. ErrNotFound from a loader is
// remembered as a negative entry. With Options.FreshFor, values past their
// fresh period are served while refreshed in the background, and kept while
// the loader fails (fail-safe).
//
// # Concurrency
//
// All methods are safe for concurrent use. An L1 hit takes no lock of ours
// and allocates nothing. Values returned by reads are shared with L1 and
// with other callers: treat them as read-only, or set Options.CopyOnRead.
// Concurrent misses of one key share one Redis round trip; each caller waits
// only as long as its own ctx allows.
//
// # Lifecycle
//
// New registers the cache with the Bus; Close replays the invalidations of
// this cache's failed writes still in the Bus's outbox (bounded by twice
// CommandTimeout; Shutdown takes a ctx instead), unregisters it, cancels and
// waits for its in-flight reads and releases L1. What could not be replayed
// is dropped and reported as invalidate.ErrOutboxDropped. Neither the Redis
// client nor the Bus is closed by the cache: close the caches, then the
// Bus, then the client. Finish serving requests before Close (an L1 hit
// cannot be waited for without a lock on the hot path).
//
// # Storage
//
// Keys live at <prefix><namespace>:<schema>:<generation>:{<key>}; values are
// a versioned envelope (codec, flags, write ID, optional compression) before
// the payload. docs/wire.md specifies both, and the invalidation message,
// with test vectors. Clear bumps the namespace generation, so it is O(1)
// however many keys the namespace holds.
package tiered
