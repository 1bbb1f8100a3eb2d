package tiered

import (
	"context"
	"errors"
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
	if x.lookup(second.hash) != second {
		t.Fatal("the second promotion did not take the slot")
	}
	if x.lookup(h) != nil {
		t.Fatal("a lookup of the displaced key's hash passed the slot's tag")
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

// TestHotIndex_MissRetiresPromotions: an L1 miss in a slot stops the
// slot's entry being served until it is promoted again, and a promotion
// whose reader asked ristretto before the miss does not bring it back. An
// entry marked gone is never served.
func TestHotIndex_MissRetiresPromotions(t *testing.T) {
	x := newHotIndex[string](0)
	const h = 9
	e := hotEntry("a", h)
	before := x.seq(h)
	x.promote(h, e, before)
	x.missed(h)
	if x.lookup(h) != nil {
		t.Fatal("the slot still serves an entry promoted before a miss")
	}
	x.promote(h, e, before) // a reader that asked ristretto before the miss
	if x.lookup(h) != nil {
		t.Fatal("a promotion from before the miss was served")
	}
	x.promote(h, e, x.seq(h))
	if x.lookup(h) != e {
		t.Fatal("a promotion after the miss was not served")
	}
	e.gone.Store(true) // ristretto's ShouldUpdate: a replacement is on its way
	if x.lookup(h) != nil {
		t.Fatal("the slot serves an entry marked gone")
	}
}

// TestHotIndex_PromoteAndExitInterleavings runs promote and exit of one
// entry in each of the six orders of their two steps each (promote: store,
// then look at gone; exit: mark gone, then clear the slot), pausing each
// between its steps. In every order the slot must end empty. Reordering
// either function's steps pins the entry in one of these orders.
func TestHotIndex_PromoteAndExitInterleavings(t *testing.T) {
	// Each order is the sequence of half-steps: "p" and "x" are the first
	// and second halves of promote and exit, in the order they run.
	orders := []string{"ppxx", "xxpp", "pxxp", "xppx", "pxpx", "xpxp"}
	for _, order := range orders {
		t.Run(order, func(t *testing.T) {
			x := newHotIndex[string](0)
			const h = 5
			e := hotEntry("a", h)
			seq := x.seq(h)
			paused := map[string]chan struct{}{"promote": make(chan struct{}), "exit": make(chan struct{})}
			resume := map[string]chan struct{}{"promote": make(chan struct{}), "exit": make(chan struct{})}
			x.between = func(op string) {
				paused[op] <- struct{}{}
				<-resume[op]
			}
			done := map[string]chan struct{}{"promote": make(chan struct{}), "exit": make(chan struct{})}
			started := map[string]bool{}
			name := map[byte]string{'p': "promote", 'x': "exit"}
			for i := range order {
				op := name[order[i]]
				if !started[op] {
					started[op] = true
					go func() {
						defer close(done[op])
						if op == "promote" {
							x.promote(h, e, seq)
						} else {
							x.exit(e)
						}
					}()
					await(t, paused[op], op+" reaching its midpoint")
					continue
				}
				resume[op] <- struct{}{}
				await(t, done[op], op+" finishing")
			}
			if got := x.slot(h).e.Load(); got != nil {
				t.Fatalf("order %s: the exited entry stayed in its slot", order)
			}
		})
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
	for _, mode := range []Mode{ModeMemory, ModeTiered} {
		t.Run(mode.String(), func(t *testing.T) {
			var c *Cache[string]
			opts := Options{L1MaxCost: 64 << 10, TTL: time.Hour, L1TTL: time.Hour}
			if mode == ModeMemory {
				opts.Mode = ModeMemory
				var err error
				if c, err = New[string]("hotevict", nil, nil, opts); err != nil {
					t.Fatal(err)
				}
				defer c.Close()
			} else {
				// Writes invalidate, and the reads after them refill
				// through ristretto's in-place replacement.
				c = newCache[string](t, opts)
			}
			ctx := context.Background()
			val := strings.Repeat("x", 500)
			var wg sync.WaitGroup
			for g := range 4 {
				wg.Go(func() {
					for i := range 1500 {
						k := fmt.Sprintf("k%d", (i*7+g*13)%1500)
						if i%3 == 0 {
							if err := c.Set(ctx, k, val, 0); err != nil {
								t.Error(err)
								return
							}
						}
						for range 12 {
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
		})
	}
}

// holdExit stops ristretto's OnExit of e, before the hot index hears of it,
// until release is called; inExit is closed once it has stopped there.
func holdExit[V any](c *Cache[V], e *entry[V]) (inExit <-chan struct{}, release func()) {
	in, out := make(chan struct{}), make(chan struct{})
	hook := func(x *entry[V]) {
		if x == e {
			close(in)
			<-out
		}
	}
	c.beforeHotExit.Store(&hook)
	return in, func() { close(out) }
}

// TestHotIndex_NeverServesAReplacedEntry forces the moments an entry
// ristretto no longer holds sits in a slot: a reader R0 found it in
// ristretto, then ristretto dropped it (replaced it by a refill, or evicted
// it) and is still short of its OnExit, and R0's promote has stored it but
// not yet looked at gone. Meanwhile L2 moved on without an invalidation
// reaching this instance yet (a write still in flight), so the old entry
// still passes the fence, and a read R1 has already returned what L2 holds
// now. A later read R2 must not go back to the older value.
func TestHotIndex_NeverServesAReplacedEntry(t *testing.T) {
	type step struct {
		name string
		// drop makes ristretto let go of old (its OnExit is held).
		drop func(t *testing.T, c *Cache[string], old *entry[string])
		// l2 is what L2 holds after the drop: "" for nothing.
		l2 string
	}
	for _, tc := range []step{
		{
			// Remember's refresh does this: a new entry under the same
			// snapshot, through ristretto's in-place update. Only the
			// ShouldUpdate hook marks old gone before R1 can see the new one.
			name: "replaced in place",
			drop: func(t *testing.T, c *Cache[string], old *entry[string]) {
				c.store(old.hash, &entry[string]{key: old.key, val: "new", stripe: old.stripe, ns: old.ns,
					epoch: old.epoch, expires: old.expires, cost: old.cost})
			},
			l2: "new",
		},
		{
			// R1 misses and finds nothing in Redis (another instance's
			// Delete): nothing is stored, and only R1's miss retires R0's
			// promotion. (Had R1 refilled, its store would wait for
			// ristretto's policy goroutine, which is the one that runs an
			// eviction's OnExit: R1 could not return inside the window.
			// ristretto's Del stands in for the eviction here.)
			name: "evicted, then absent",
			drop: func(t *testing.T, c *Cache[string], old *entry[string]) { c.l1.Del(old.hash) },
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newCache[string](t, Options{TTL: time.Hour, L1TTL: time.Hour})
			ctx := ctxT(t)
			const key = "replaced"
			h := hashKey(key)
			dk := c.dataKey(c.nsGen.Load(), key)
			if err := c.Set(ctx, key, "new", 0); err != nil {
				t.Fatal(err)
			}
			newer, err := c.rdb.Get(ctx, dk).Bytes() // replayed below without an invalidation
			if err != nil {
				t.Fatal(err)
			}
			if err := c.Set(ctx, key, "old", 0); err != nil {
				t.Fatal(err)
			}
			mustGet(t, c, key, "old", "fill")
			c.hot.slot(h).e.Store(nil) // whatever the fill's reads promoted

			seq := c.hot.seq(h) // R0 reads the slot's count, then asks ristretto
			old, in := c.l1.Get(h)
			if !in || old.val != "old" {
				t.Fatal("L1 does not hold the fill")
			}
			inExit, release := holdExit(c, old)
			dropped := make(chan struct{})
			go func() { defer close(dropped); tc.drop(t, c, old) }()
			await(t, inExit, "ristretto's OnExit of the old entry")
			defer func() { release(); await(t, dropped, "the drop") }()

			if tc.l2 == "" {
				err = c.rdb.Del(ctx, dk).Err()
			} else {
				err = c.rdb.Set(ctx, dk, newer, time.Hour).Err()
			}
			if err != nil {
				t.Fatal(err)
			}
			if v, ok, err := c.Get(ctx, key); err != nil || ok != (tc.l2 != "") || v != tc.l2 {
				t.Fatalf("R1: Get = %q, %v, %v; want %q", v, ok, err, tc.l2)
			}

			old.pseq.Store(seq) // R0's promote, before its look at gone
			c.hot.slot(h).e.Store(old)
			if !c.valid(old, h, key) {
				t.Fatal("the old entry fails the fence: this test would not exercise the index")
			}
			if v, ok, err := c.Get(ctx, key); err != nil || ok != (tc.l2 != "") || v != tc.l2 {
				t.Fatalf("R2, after R1 returned %q: Get = %q, %v, %v", tc.l2, v, ok, err)
			}
		})
	}
}

// intoIndex reads key until the hot index serves it (promotion is sampled),
// and returns the entry.
func intoIndex[V any](t *testing.T, c *Cache[V], key string, read func() error) *entry[V] {
	t.Helper()
	h := hashKey(key)
	for range 1000 {
		if err := read(); err != nil {
			t.Fatal(err)
		}
		if e := c.hot.lookup(h); e != nil {
			return e
		}
	}
	t.Fatalf("%q never reached the hot index", key)
	return nil
}

// TestHotIndex_FenceAppliesToIndexHits puts a key in the hot index, then
// changes it in each way the fence must see, and checks that the next read
// does not return what the index holds.
func TestHotIndex_FenceAppliesToIndexHits(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(ctx context.Context, self, peer *Cache[string]) error
		want   string // "" for a miss
	}{
		{"local Set", func(ctx context.Context, self, _ *Cache[string]) error { return self.Set(ctx, "k", "new", 0) }, "new"},
		{"local Delete", func(ctx context.Context, self, _ *Cache[string]) error { return self.Delete(ctx, "k") }, ""},
		{"local Clear", func(ctx context.Context, self, _ *Cache[string]) error { return self.Clear(ctx) }, ""},
		{"peer Set", func(ctx context.Context, _, peer *Cache[string]) error { return peer.Set(ctx, "k", "new", 0) }, "new"},
		{"peer Delete", func(ctx context.Context, _, peer *Cache[string]) error { return peer.Delete(ctx, "k") }, ""},
		{"peer Clear", func(ctx context.Context, _, peer *Cache[string]) error { return peer.Clear(ctx) }, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFleet[string](t, shared, 2, Options{TTL: time.Hour, L1TTL: time.Hour})
			self, peer := f[0].c, f[1].c
			ctx := ctxT(t)
			got := applied(self)
			if err := peer.Set(ctx, "k", "old", 0); err != nil {
				t.Fatal(err)
			}
			await(t, got, "the first write's invalidation")
			intoIndex(t, self, "k", func() error {
				v, ok, err := self.Get(ctx, "k")
				if err == nil && (!ok || v != "old") {
					err = fmt.Errorf("Get = %q, %v", v, ok)
				}
				return err
			})
			if err := tc.change(ctx, self, peer); err != nil {
				t.Fatal(err)
			}
			if strings.HasPrefix(tc.name, "peer") {
				await(t, got, "the change's invalidation")
			}
			if v, ok, err := self.Get(ctx, "k"); err != nil || ok != (tc.want != "") || v != tc.want {
				t.Fatalf("Get after %s = %q, %v, %v; want %q", tc.name, v, ok, err, tc.want)
			}
		})
	}
}

// TestHotIndex_NegativeAndCopyOnRead: a negative entry served from the
// index still answers ErrNotFound until a write replaces it, and with
// CopyOnRead an index hit still returns a private copy.
func TestHotIndex_NegativeAndCopyOnRead(t *testing.T) {
	t.Run("negative", func(t *testing.T) {
		c := newCache[string](t, Options{TTL: time.Hour, L1TTL: time.Hour, NegativeTTL: time.Hour})
		ctx := ctxT(t)
		loads := 0
		absent := func(context.Context, string) (string, error) { loads++; return "", ErrNotFound }
		intoIndex(t, c, "ghost", func() error {
			if _, err := c.Remember(ctx, "ghost", absent); !errors.Is(err, ErrNotFound) {
				return fmt.Errorf("Remember = %v, want ErrNotFound", err)
			}
			return nil
		})
		if loads != 1 {
			t.Fatalf("the loader ran %d times; the negative entry should answer after the first", loads)
		}
		if err := c.Set(ctx, "ghost", "here", 0); err != nil {
			t.Fatal(err)
		}
		if v, err := c.Remember(ctx, "ghost", absent); err != nil || v != "here" {
			t.Fatalf("Remember after Set = %q, %v", v, err)
		}
	})
	t.Run("CopyOnRead", func(t *testing.T) {
		c := newCache[[]string](t, Options{TTL: time.Hour, L1TTL: time.Hour, CopyOnRead: true})
		ctx := ctxT(t)
		if err := c.Set(ctx, "list", []string{"a", "b"}, 0); err != nil {
			t.Fatal(err)
		}
		intoIndex(t, c, "list", func() error {
			v, ok, err := c.Get(ctx, "list")
			if err == nil && ok {
				v[0] = "mutated" // the caller's copy only
			}
			return err
		})
		if v, ok, err := c.Get(ctx, "list"); err != nil || !ok || v[0] != "a" {
			t.Fatalf("Get after the caller mutated its copies = %q, %v, %v", v, ok, err)
		}
	})
}

// TestHotIndex_TagRacesHeal: promote stores the tag and the entry apart, so
// two promotions into one slot can interleave and leave key 1's entry under
// key 2's tag (forced here). Key 1 must not be shut out for good: its next
// promotion stores both again, and the index serves it.
func TestHotIndex_TagRacesHeal(t *testing.T) {
	x := newHotIndex[string](0)
	h1 := uint64(7)
	h2 := h1 + x.mask + 1 // the same slot
	e1 := hotEntry("k1", h1)
	s := x.slot(h1)
	// The interleaving P1: tag=h1; P2: tag=h2, e=e2; P1: e=e1.
	s.tag.Store(h2)
	e1.pseq.Store(x.seq(h1))
	s.e.Store(e1)
	if x.lookup(h1) != nil {
		t.Fatal("a lookup passed a slot whose tag is another key's")
	}
	x.promote(h1, e1, x.seq(h1)) // what the next sampled hit of key 1 does
	if x.lookup(h1) != e1 {
		t.Fatalf("after its next promotion key 1 is still not served (tag %d)", s.tag.Load())
	}
}
