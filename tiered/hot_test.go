package tiered

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

func hotEntry(key string, h uint64) *entry[string] {
	return &entry[string]{key: key, val: "v", hash: h}
}

func TestHotIndex_Size(t *testing.T) {
	for _, tc := range []struct {
		maxCost int64
		want    int
	}{
		{0, hotMinSlots},
		{1 << 20, hotMinSlots},
		{DefaultL1MaxCost, 8192},
		{5000 * hotBytesPerSlot, 8192}, // rounded up to a power of two
		{1 << 40, hotMaxSlots},
	} {
		x := newHotIndex[string](tc.maxCost)
		if len(x.slots) != tc.want || x.mask != uint64(tc.want-1) {
			t.Errorf("L1MaxCost %d: %d slots, mask %#x; want %d", tc.maxCost, len(x.slots), x.mask, tc.want)
		}
	}
}

// TestHotIndex_ExitAndPromoteInEitherOrder runs the two halves of the
// protocol one after the other, both ways round, and with a second entry
// sharing the slot: a slot never keeps an entry that has exited, and an
// exit never clears another entry's slot.
func TestHotIndex_ExitAndPromoteInEitherOrder(t *testing.T) {
	x := newHotIndex[string](0)
	const h = 42

	e := hotEntry("a", h)
	x.promote(h, e, x.seq(h))
	if x.slot(h).e.Load() != e || x.lookup(h) != e {
		t.Fatal("promote did not fill the slot")
	}
	x.exit(e)
	if x.slot(h).e.Load() != nil {
		t.Fatal("exit after promote left the entry in its slot")
	}

	late := hotEntry("a", h)
	x.exit(late) // ristretto dropped it before the reader promoted it
	x.promote(h, late, x.seq(h))
	if x.slot(h).e.Load() != nil {
		t.Fatal("promote after exit left the entry in its slot")
	}

	first, second := hotEntry("a", h), hotEntry("b", h+x.mask+1) // same slot
	x.promote(h, first, x.seq(h))
	x.promote(second.hash, second, x.seq(h))
	if x.lookup(h) != second {
		t.Fatal("the second promotion did not take the slot")
	}
	x.exit(first)
	if x.slot(h).e.Load() != second {
		t.Fatal("exit of a displaced entry cleared the slot its successor holds")
	}
	x.clear()
	if x.slot(h).e.Load() != nil {
		t.Fatal("clear left a slot filled")
	}
}

// TestHotIndex_FillRetiresPromotions: a fill landing in a slot stops the
// slot's entry being served until it is promoted again, and a promotion
// whose reader looked before the fill does not bring it back.
func TestHotIndex_FillRetiresPromotions(t *testing.T) {
	x := newHotIndex[string](0)
	const h = 9
	e := hotEntry("a", h)
	before := x.seq(h)
	x.promote(h, e, before)
	x.filled(h)
	if x.lookup(h) != nil {
		t.Fatal("the slot still serves an entry promoted before a fill")
	}
	x.promote(h, e, before) // a reader that asked ristretto before the fill
	if x.lookup(h) != nil {
		t.Fatal("a promotion from before the fill was served")
	}
	x.promote(h, e, x.seq(h))
	if x.lookup(h) != e {
		t.Fatal("a promotion after the fill was not served")
	}
}

// TestHotIndex_ConcurrentPromoteAndExit races a promote against an exit of
// the same entry, many times, released together. Whatever the interleaving,
// once both have returned the slot must not hold the exited entry: without
// promote's second look at gone, an exit whose CompareAndSwap runs before
// the promote's Store leaves the entry pinned.
func TestHotIndex_ConcurrentPromoteAndExit(t *testing.T) {
	x := newHotIndex[string](0)
	const h = 7
	pinned := 0
	for i := range 20000 {
		e := hotEntry(fmt.Sprint("k", i), h)
		start := make(chan struct{})
		var wg sync.WaitGroup
		wg.Go(func() { <-start; x.promote(h, e, x.seq(h)) })
		wg.Go(func() { <-start; x.exit(e) })
		close(start)
		wg.Wait()
		if x.slot(h).e.Load() == e {
			pinned++
			x.slot(h).e.Store(nil)
		}
	}
	if pinned > 0 {
		t.Fatalf("%d of 20000 exited entries stayed in their slot", pinned)
	}
}

// TestHotIndex_HoldsOnlyWhatRistrettoHolds drives a small L1 through heavy
// eviction from several goroutines, reading every key often enough to be
// promoted, and then checks, with ristretto quiet, that every filled slot
// holds an entry that ristretto still stores: the index keeps nothing alive
// that L1's cost bound has let go.
func TestHotIndex_HoldsOnlyWhatRistrettoHolds(t *testing.T) {
	c, err := New[string]("hotevict", nil, nil, Options{Mode: ModeMemory, L1MaxCost: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	val := strings.Repeat("x", 500)
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 3000 {
				k := fmt.Sprintf("k%d", (i*7+g*13)%1500)
				if err := c.Set(ctx, k, val, 0); err != nil {
					t.Error(err)
					return
				}
				for range 3 {
					if _, _, err := c.Get(ctx, k); err != nil {
						t.Error(err)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	c.l1.Wait()

	if c.Stats().Evictions == 0 {
		t.Fatal("ristretto evicted nothing: the test did not exercise eviction")
	}
	filled := 0
	for i := range c.hot.slots {
		e := c.hot.slots[i].e.Load()
		if e == nil {
			continue
		}
		filled++
		if e.gone.Load() {
			t.Errorf("slot %d holds %q, which ristretto has let go", i, e.key)
			continue
		}
		if in, ok := c.l1.Get(e.hash); !ok || in != e {
			t.Errorf("slot %d holds %q, which ristretto does not store (it has %v, %v)", i, e.key, in != nil, ok)
		}
	}
	if filled == 0 {
		t.Fatal("no slot filled: reads never went through the index")
	}
}

// TestHotIndex_NeverServesAReplacedEntry forces the moments an entry
// ristretto no longer holds sits in a slot: a reader found it in ristretto,
// then ristretto dropped it (evicted, or replaced by a refill), and the
// reader's promote has stored it but not yet looked at gone. Meanwhile L2 moved on without
// an invalidation reaching this instance yet (a write still in flight), so
// the old entry still passes the fence, and a read already returned the
// newer value from the refill. A later read must not go back to the older
// value.
func TestHotIndex_NeverServesAReplacedEntry(t *testing.T) {
	c := newCache[string](t, Options{TTL: time.Hour, L1TTL: time.Hour})
	ctx := ctxT(t)
	const key = "replaced"
	h := hashKey(key)
	dk := c.dataKey(c.nsGen.Load(), key)
	envelope := func(v string) []byte {
		t.Helper()
		if err := c.Set(ctx, key, v, 0); err != nil {
			t.Fatal(err)
		}
		raw, err := c.rdb.Get(ctx, dk).Bytes()
		if err != nil {
			t.Fatal(err)
		}
		return raw
	}
	writeL2 := func(raw []byte) { // a write whose invalidation is still on its way
		t.Helper()
		if err := c.rdb.Set(ctx, dk, raw, time.Hour).Err(); err != nil {
			t.Fatal(err)
		}
	}
	inL1 := func(want string) *entry[string] {
		t.Helper()
		e, in := c.l1.Get(h)
		if !in || e.val != want {
			t.Fatalf("L1 does not hold %q", want)
		}
		return e
	}
	// latePromote leaves e where a racing reader's promote puts it before
	// its second look at gone (which clears the slot once it looks).
	latePromote := func(e *entry[string], seq uint64) {
		t.Helper()
		e.pseq.Store(seq)
		c.hot.slot(h).e.Store(e)
		if !e.gone.Load() {
			t.Fatal("ristretto still holds the old entry")
		}
		if !c.valid(e, h, key) {
			t.Fatal("the old entry fails the fence: this test would not exercise the index")
		}
	}
	newest, newer := envelope("newest"), envelope("newer")
	if err := c.Set(ctx, key, "old", 0); err != nil {
		t.Fatal(err)
	}

	// Evicted, then refilled.
	mustGet(t, c, key, "old", "fill")
	old, seq := inL1("old"), c.hot.seq(h)
	c.l1.Del(h)
	writeL2(newer)
	mustGet(t, c, key, "newer", "refill after the eviction")
	latePromote(old, seq)
	mustGet(t, c, key, "newer", "read after a late promotion of the evicted entry")

	// Replaced in place by a second fill under the same snapshot.
	prev, seq := inL1("newer"), c.hot.seq(h)
	writeL2(newest)
	c.store(h, &entry[string]{key: key, val: "newest", stripe: prev.stripe, ns: prev.ns, epoch: prev.epoch,
		expires: prev.expires, cost: prev.cost})
	mustGet(t, c, key, "newest", "read after the replacing fill")
	latePromote(prev, seq)
	mustGet(t, c, key, "newest", "read after a late promotion of the replaced entry")
}
