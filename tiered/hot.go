package tiered

import (
	"math/bits"
	"sync/atomic"
)

// The hot index is a lock-free, direct-mapped table of pointers to entries
// that ristretto holds, indexed by the key's hash. An L1 hit looks there
// first: the slot's key tag, pointer and miss count and the entry's gone flag
// and promotion count (loads only, no writes), then the same fence as any
// hit. ristretto's own Get
// takes a read lock on a shard (an atomic add on a shared line, twice) and
// pushes the access into a sync.Pool-backed ring; the index does neither, so
// a hit served from it is several times cheaper than ristretto's Get, and
// cores reading the same keys write nothing shared.
//
// ristretto stays the L1: it decides what is admitted and evicted and it
// bounds the memory. The index holds no entry of its own:
//
//   - An entry gets a slot only after a hit through ristretto (promote), and
//     ristretto's OnExit, which runs for every way an entry leaves (eviction,
//     rejection, replacement, Del, Clear), clears the slot. An entry that
//     leaves while a reader promotes it is caught by the gone flag: the reader
//     stores then checks gone, OnExit sets gone then clears the slot, and with
//     sequentially consistent atomics at least one of them sees the other's
//     write. Once both are done, no slot holds an entry ristretto dropped.
//   - A slot serves an entry only if it is not gone, no L1 miss has happened
//     in the slot since the read that promoted it began, and it passes the
//     same fence as a ristretto hit (valid). This keeps reads monotonic:
//     once a read has returned a newer value, no entry ristretto held before
//     it is served from the index again, however late a racing reader
//     promotes it. ristretto makes a newer value visible in two ways:
//     replacing a present key (its ShouldUpdate hook marks the old entry
//     gone under the shard's write lock, before the new one is visible), or
//     storing a key it no longer holds, on its policy goroutine, which has
//     already run OnExit for the evicted entry. A read that returns a newer
//     value without any store (a miss in Redis too, an Exists) started with
//     an L1 miss, and a miss bumps the slot's count, retiring
//     every promotion made from a ristretto read before it, including one
//     of an entry whose eviction has not reached OnExit yet
//     (TestHotIndex_NeverServesAReplacedEntry forces each case). A value
//     returned without being stored after an L1 hit (a stale Remember hit
//     that waited for its refresh) voids the key through the fence instead
//     (storeLoaded), and one whose store ristretto dropped (its set buffer
//     full) counts as a miss in the slot (store;
//     TestMonotonic_DroppedRefreshFillThroughIndex). The index adds no gap
//     of its own to monotonic reads; how the read paths keep them is
//     described at fill. A miss of another
//     key in the slot costs the slot's
//     entry its place until its next promotion: a stream of reads of
//     absent keys, which are never cached, keeps knocking entries out of
//     the slots they land in.
//   - ristretto's TinyLFU admission counts accesses. Hits served by the index
//     would not reach it, and a hot key would look cold, so every
//     eighth hit or so on a P (sampled) also calls ristretto's Get to record one.
//     Promotion is sampled alike, so a new entry is read through ristretto,
//     every access counted, about that many times before it gets a slot.
//     Counts of keys served from the index are scaled down alike; ristretto's
//     own access ring is lossy by design too (TestHotIndex_KeepsHotKeysAdmitted).
//
// Two hot keys whose hashes share a slot take turns in it: each promotion
// replaces the other, and the key not in the slot is served through
// ristretto.
type hotIndex[V any] struct {
	slots []hotSlot[V]
	mask  uint64
	// between, when a test sets it, runs between the two steps of promote
	// and of exit, to force each interleaving of the two.
	between func(op string)
}

// hotSlot is one entry pointer, the count of L1 misses in the slot and the
// hash of the key promoted last. An entry is served from it only if the
// count it was promoted under (its pseq) is still the slot's.
type hotSlot[V any] struct {
	e      atomic.Pointer[entry[V]]
	misses atomic.Uint64
	// tag is the hash of the key last promoted here. A lookup compares it
	// before it follows e, so a slot that holds another key (with more
	// keys than slots, most lookups) costs the slot's cache line only, not
	// the entry's and its key's too. It is only a filter, stored apart from
	// e: a match is still checked in full, and a mismatch sends the read to
	// ristretto. Two promotions racing into one slot can leave one key's
	// entry under the other's tag; the next promotion of either key stores
	// both again (promote skips only when the entry, its count and the tag
	// all match), so that lasts until the next sampled hit.
	tag atomic.Uint64
}

// sampled picks about one in eight of a P's hits, from its hit count n:
// which hits are recorded in ristretto (if served by the index) or promoted
// (if served by ristretto). The count is scrambled (Fibonacci hashing) so that
// a fixed access pattern cannot keep a key off every sample point, as n%8
// could.
func sampled(n uint64) bool { return (n*0x9E3779B97F4A7C15)>>61 == 0 }

// Index sizes: one slot (24 bytes) per hotBytesPerSlot of L1MaxCost, within
// [hotMinSlots, hotMaxSlots]. The default 64 MiB L1 gets 8,192 slots
// (192 KiB).
const (
	hotBytesPerSlot = 8 << 10
	hotMinSlots     = 1 << 10
	hotMaxSlots     = 1 << 16
)

func newHotIndex[V any](l1MaxCost int64) hotIndex[V] {
	n := uint64(min(max(l1MaxCost/hotBytesPerSlot, hotMinSlots), hotMaxSlots))
	n = 1 << (64 - bits.LeadingZeros64(n-1)) // the next power of two
	return hotIndex[V]{slots: make([]hotSlot[V], n), mask: n - 1}
}

func (x hotIndex[V]) slot(h uint64) *hotSlot[V] {
	return &x.slots[h&x.mask]
}

// lookup returns the entry in h's slot if ristretto still holds it and no
// L1 miss has happened in the slot since its promotion, or nil. The caller
// still checks the key and the fence.
func (x hotIndex[V]) lookup(h uint64) *entry[V] {
	s := &x.slots[h&x.mask]
	e := s.e.Load()
	if s.tag.Load() != h || e == nil || e.gone.Load() || e.pseq.Load() != s.misses.Load() {
		return nil
	}
	return e
}

// seq is h's slot's miss count, read before a ristretto lookup whose entry
// may be promoted.
func (x hotIndex[V]) seq(h uint64) uint64 { return x.slot(h).misses.Load() }

// missed records an L1 miss of a key in h's slot, before the read goes on to
// Redis or the loader: every entry promoted from a ristretto read made
// before it stops being served from the slot.
func (x hotIndex[V]) missed(h uint64) { x.slot(h).misses.Add(1) }

// promote gives e, found in ristretto after seq returned pseq and accepted
// by the fence, the slot of its hash.
func (x hotIndex[V]) promote(h uint64, e *entry[V], pseq uint64) {
	s := x.slot(h)
	if s.e.Load() == e && e.pseq.Load() == pseq && s.tag.Load() == h {
		return
	}
	e.pseq.Store(pseq)
	s.tag.Store(h)
	s.e.Store(e)
	if x.between != nil {
		x.between("promote")
	}
	if e.gone.Load() {
		s.e.CompareAndSwap(e, nil)
	}
}

// exit is ristretto's OnExit: e is no longer in ristretto.
func (x hotIndex[V]) exit(e *entry[V]) {
	e.gone.Store(true)
	if x.between != nil {
		x.between("exit")
	}
	x.slot(e.hash).e.CompareAndSwap(e, nil)
}

// clear empties every slot (Close).
func (x hotIndex[V]) clear() {
	for i := range x.slots {
		x.slots[i].e.Store(nil)
	}
}
