package tiered

import (
	"math/bits"
	"sync/atomic"
)

// The hot index is a lock-free, direct-mapped table of pointers to entries
// that ristretto holds, indexed by the key's hash. An L1 hit looks there
// first: one atomic load, then the same fence as any hit. ristretto's own Get
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
//   - Validity is the fence's alone (valid): a slot's entry is accepted under
//     exactly the conditions a ristretto hit is. A replaced or evicted entry
//     that a racing reader still finds in its slot for an instant passed the
//     same fence, so it is a value the cache could legitimately have served
//     from ristretto a moment earlier.
//   - ristretto's TinyLFU admission counts accesses. Hits served by the index
//     would not reach it, and a hot key would look cold, so every
//     hotSampleEvery-th hit on a P also calls ristretto's Get to record one.
//     Counts of keys served from the index are scaled down alike; ristretto's
//     own access ring is lossy by design too.
//
// Two hot keys whose hashes share a slot take turns in it: each promotion
// replaces the other, and both are still served, through ristretto.
type hotIndex[V any] struct {
	slots []hotSlot[V]
	mask  uint64
}

// hotSlot is one entry pointer and the hash it was promoted under. A read
// compares the hash first, so a slot holding another key costs one cache
// line, not a visit to that key's entry too. The two words are not updated
// as one, and need not be: the hash is only a hint, and whatever pointer a
// reader gets, the fence (valid) checks its key.
type hotSlot[V any] struct {
	hash atomic.Uint64
	e    atomic.Pointer[entry[V]]
}

// hotSampleEvery is how often a hit served by the index is also recorded in
// ristretto (a power of two).
const hotSampleEvery = 8

// Index sizes: one slot (16 bytes) per hotBytesPerSlot of L1MaxCost, within
// [hotMinSlots, hotMaxSlots]. The default 64 MiB L1 gets 8,192 slots
// (128 KiB).
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

// lookup returns the entry promoted under h, or nil.
func (x hotIndex[V]) lookup(h uint64) *entry[V] {
	if s := x.slot(h); s.hash.Load() == h {
		return s.e.Load()
	}
	return nil
}

// promote gives e, just found in ristretto and accepted by the fence, the
// slot of its hash. It writes only when the slot holds something else.
func (x hotIndex[V]) promote(h uint64, e *entry[V]) {
	s := x.slot(h)
	if s.e.Load() == e {
		return
	}
	s.e.Store(e)
	s.hash.Store(h)
	if e.gone.Load() {
		s.e.CompareAndSwap(e, nil)
	}
}

// exit is ristretto's OnExit: e is no longer in ristretto.
func (x hotIndex[V]) exit(e *entry[V]) {
	e.gone.Store(true)
	x.slot(e.hash).e.CompareAndSwap(e, nil)
}

// clear empties every slot (Close).
func (x hotIndex[V]) clear() {
	for i := range x.slots {
		x.slots[i].e.Store(nil)
	}
}
