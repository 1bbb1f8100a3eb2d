package tiered

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// peerWrite prepares key so that Redis holds "old" (what L1 will be filled
// with) and returns the bytes of a later write of "new": replayed into Redis
// with rdb.Set, they are a peer's write whose invalidation has not reached
// this instance yet.
func peerWrite(t *testing.T, c *Cache[string], key string) (dk string, newer []byte) {
	t.Helper()
	ctx := ctxT(t)
	dk = c.dataKey(c.nsGen.Load(), key)
	if err := c.Set(ctx, key, "new", 0); err != nil {
		t.Fatal(err)
	}
	newer, err := c.rdb.Get(ctx, dk).Bytes()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Set(ctx, key, "old", 0); err != nil {
		t.Fatal(err)
	}
	return dk, newer
}

// A: a stale Remember hit waits (SoftTimeout) for its refresh and returns the
// loaded value, which the fenced fill did not store; no L1 miss, no store, no
// void. The next Get goes back to the old entry (index or ristretto alike).
func TestMonotonic_StaleRefreshNotStored(t *testing.T) {
	c := newCache[string](t, Options{TTL: time.Hour, L1TTL: time.Hour,
		FreshFor: 30 * time.Millisecond, SoftTimeout: 2 * time.Second})
	ctx := ctxT(t)
	const key = "swr"
	dk, newer := peerWrite(t, c, key)
	load := func(ctx context.Context, _ string) (string, error) {
		// A peer updated the source and then Redis; its PUBLISH is in flight.
		if err := c.rdb.Set(ctx, dk, newer, time.Hour).Err(); err != nil {
			return "", err
		}
		return "new", nil
	}
	if v, err := c.Remember(ctx, key, load); err != nil || v != "old" {
		t.Fatalf("fill: %q %v", v, err)
	}
	agePast(t, 60*time.Millisecond, c) // past FreshFor
	if v, err := c.Remember(ctx, key, load); err != nil || v != "new" {
		t.Fatalf("R1: Remember = %q, %v; want the refreshed \"new\"", v, err)
	}
	if c.st.fencedFills.Load() == 0 {
		t.Fatal("the refresh's fill was not fenced: this test would not exercise the unstored value")
	}
	if v, _, _ := c.Get(ctx, key); v != "new" {
		t.Fatalf("R2 after R1 returned \"new\": Get = %q (monotonic reads broken)", v)
	}
}

// The same through the hot index: the entry is promoted, ristretto drops it
// (OnExit held, as when the policy goroutine is descheduled between its Del
// and OnExit), R1's stale hit is served from the index and returns the
// refreshed value. ristretto alone would now miss and read "new" from Redis;
// the index must not serve "old".
func TestMonotonic_StaleRefreshThroughIndex(t *testing.T) {
	c := newCache[string](t, Options{TTL: time.Hour, L1TTL: time.Hour,
		FreshFor: 30 * time.Millisecond, SoftTimeout: 2 * time.Second})
	ctx := ctxT(t)
	const key = "swr2"
	h := hashKey(key)
	dk, newer := peerWrite(t, c, key)
	load := func(ctx context.Context, _ string) (string, error) {
		if err := c.rdb.Set(ctx, dk, newer, time.Hour).Err(); err != nil {
			return "", err
		}
		return "new", nil
	}
	old := intoIndex(t, c, key, func() error { _, _, err := c.Get(ctx, key); return err })
	time.Sleep(60 * time.Millisecond)
	inExit, release := holdExit(c, old)
	dropped := make(chan struct{})
	go func() { defer close(dropped); c.l1.Del(h) }()
	await(t, inExit, "OnExit of the old entry")
	defer func() { release(); await(t, dropped, "the drop") }()
	if _, in := c.l1.Get(h); in {
		t.Fatal("ristretto still holds the entry")
	}
	if v, err := c.Remember(ctx, key, load); err != nil || v != "new" {
		t.Fatalf("R1: Remember = %q, %v", v, err)
	}
	if v, _, _ := c.Get(ctx, key); v != "new" {
		t.Fatalf("R2 after R1 returned \"new\": Get = %q from the index; ristretto holds nothing, Redis holds \"new\"", v)
	}
}

// A Get flight and a Remember flight of one key do not join (one loads, the
// other must not). The Get flight reads Redis before a peer's write and is
// held there; a Remember then misses L1. Had it read Redis meanwhile, it
// would return the new value and the held Get's fill would then put the
// old one back in L1. The flight group makes it wait for the Get's flight
// instead (rivalFlight), so the next read still returns the new value.
func TestMonotonic_GetFlightVsRememberFlight(t *testing.T) {
	c := newCache[string](t, Options{TTL: time.Hour, L1TTL: time.Hour})
	ctx := ctxT(t)
	const key = "gr"
	dk, newer := peerWrite(t, c, key)
	reached, resume := make(chan struct{}), make(chan struct{})
	var once sync.Once
	c.setReadHook(func(k string) {
		if k == key {
			once.Do(func() { close(reached); <-resume })
		}
	})
	getDone := make(chan string, 1)
	go func() { v, _, _ := c.Get(ctx, key); getDone <- v }()
	await(t, reached, "the Get flight's L2 read")
	if err := c.rdb.Set(ctx, dk, newer, time.Hour).Err(); err != nil {
		t.Fatal(err)
	}
	waits := c.flights.RivalWaits()
	type result struct {
		v   string
		err error
	}
	remembered := make(chan result, 1)
	go func() {
		v, err := c.Remember(ctx, key, func(context.Context, string) (string, error) {
			return "", errors.New("loader called: Redis holds the key")
		})
		remembered <- result{v, err}
	}()
	// The Remember either waits for the held Get flight (as it must) or,
	// without that, finishes on its own; either way, then let the Get go.
	var r result
	eventually(t, 5*time.Second, "the Remember to wait for the Get flight or finish", func() bool {
		select {
		case r = <-remembered:
			return true
		default:
			return c.flights.RivalWaits() > waits
		}
	})
	close(resume)
	if r == (result{}) {
		r = <-remembered
	}
	if v := <-getDone; v != "old" {
		t.Fatalf("the held Get returned %q, want the old value it read", v)
	}
	if r.err != nil || r.v != "new" {
		t.Fatalf("R1: Remember = %q, %v; want \"new\"", r.v, r.err)
	}
	if v, _, _ := c.Get(ctx, key); v != "new" {
		t.Fatalf("R2 after R1 returned \"new\": Get = %q (monotonic reads broken)", v)
	}
}

// A Get whose caller gives up (its ctx deadline is sooner than
// CommandTimeout, so it does not run inline) leaves its flight running
// without anyone waiting: the flight is detached, and the next Get of the
// key starts another. If the abandoned one read the old value before a
// peer's write and fills after the new flight returned the new value, the
// fill must not count: detaching bumps the key's stripe (OnDetach).
func TestMonotonic_AbandonedFlightFillsLate(t *testing.T) {
	c := newCache[string](t, Options{TTL: time.Hour, L1TTL: time.Hour, CommandTimeout: 5 * time.Second})
	ctx := ctxT(t)
	const key = "abandoned"
	dk, newer := peerWrite(t, c, key)
	reached, resume := make(chan struct{}), make(chan struct{})
	var held atomic.Bool // only the first flight is held; sync.Once would hold the rest too
	c.setReadHook(func(k string) {
		if k == key && held.CompareAndSwap(false, true) {
			close(reached)
			<-resume
		}
	})
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	gaveUp := make(chan error, 1)
	go func() { _, _, err := c.Get(short, key); gaveUp <- err }()
	await(t, reached, "the first Get flight's L2 read")
	if err := <-gaveUp; !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("the abandoned Get returned %v, want its deadline", err)
	}
	if err := c.rdb.Set(ctx, dk, newer, time.Hour).Err(); err != nil {
		t.Fatal(err)
	}
	mustGet(t, c, key, "new", "R1, a new flight")
	// The abandoned flight now fills "old": it either stores it (an L1
	// set) or finds its snapshot stale and voids the key (a stripe bump).
	stripe := &c.stripes[hashKey(key)&stripeMask]
	bumps, sets := stripe.Load(), c.st.l1Sets.Load()
	close(resume)
	eventually(t, 5*time.Second, "the abandoned flight's fill", func() bool {
		return stripe.Load() != bumps || c.st.l1Sets.Load() != sets
	})
	for range 3 {
		mustGet(t, c, key, "new", "R2, after the abandoned flight's fill")
	}
}

// Exists looks in ristretto, not the index. With the entry dropped by
// ristretto (OnExit pending) and a peer's Delete in Redis, it reads Redis and
// says absent; its miss must retire the index's entry, or the next Get says
// present.
func TestMonotonic_ExistsThenGet(t *testing.T) {
	c := newCache[string](t, Options{TTL: time.Hour, L1TTL: time.Hour})
	ctx := ctxT(t)
	const key = "ex"
	h := hashKey(key)
	if err := c.Set(ctx, key, "old", 0); err != nil {
		t.Fatal(err)
	}
	dk := c.dataKey(c.nsGen.Load(), key)
	old := intoIndex(t, c, key, func() error { _, _, err := c.Get(ctx, key); return err })
	inExit, release := holdExit(c, old)
	dropped := make(chan struct{})
	go func() { defer close(dropped); c.l1.Del(h) }()
	await(t, inExit, "OnExit")
	defer func() { release(); await(t, dropped, "the drop") }()
	if err := c.rdb.Set(ctx, dk, tombstone(), time.Hour).Err(); err != nil { // a peer's Delete, in flight
		t.Fatal(err)
	}
	if ok, err := c.Exists(ctx, key); err != nil || ok {
		t.Fatalf("Exists = %v, %v", ok, err)
	}
	if v, ok, _ := c.Get(ctx, key); ok {
		t.Fatalf("after Exists said absent, Get = %q from the index", v)
	}
}

// TestMonotonic_RefreshesLandInL1 guards the other side of the voids: a
// refresh that replaces the stale entry it refreshed, or finds that another
// instance refreshed first, must land in L1 and not void the key, or every
// refresh would cost each instance a miss and a second Redis read.
func TestMonotonic_RefreshesLandInL1(t *testing.T) {
	check := func(t *testing.T, c *Cache[string], want string) {
		t.Helper()
		misses := c.st.l1Misses.Load()
		v, err := c.Remember(ctxT(t), "k", func(context.Context, string) (string, error) {
			return "", errors.New("the loader ran: the refreshed value is not in L1")
		})
		if err != nil || v != want {
			t.Fatalf("Remember after the refresh = %q, %v; want %q from L1", v, err, want)
		}
		if d := c.st.l1Misses.Load() - misses; d != 0 {
			t.Fatalf("%d L1 misses after the refresh: it did not land", d)
		}
	}
	t.Run("stale, waited for", func(t *testing.T) {
		c := newCache[string](t, Options{TTL: time.Hour, L1TTL: time.Hour, FreshFor: 30 * time.Millisecond, SoftTimeout: 2 * time.Second})
		ctx := ctxT(t)
		version := "v1"
		load := func(context.Context, string) (string, error) { return version, nil }
		if v, err := c.Remember(ctx, "k", load); err != nil || v != "v1" {
			t.Fatalf("first Remember = %q, %v", v, err)
		}
		version = "v2"
		agePast(t, 60*time.Millisecond, c) // past FreshFor
		if v, err := c.Remember(ctx, "k", load); err != nil || v != "v2" {
			t.Fatalf("stale Remember = %q, %v; want the refreshed v2", v, err)
		}
		check(t, c, "v2")
	})
	t.Run("a peer refreshed first", func(t *testing.T) {
		f := newFleet[string](t, shared, 2, Options{TTL: time.Hour, L1TTL: time.Hour, FreshFor: 30 * time.Millisecond, SoftTimeout: 2 * time.Second})
		self, peer := f[0].c, f[1].c
		ctx := ctxT(t)
		version := "v1"
		load := func(context.Context, string) (string, error) { return version, nil }
		for _, c := range []*Cache[string]{self, peer} {
			if v, err := c.Remember(ctx, "k", load); err != nil || v != "v1" {
				t.Fatalf("first Remember = %q, %v", v, err)
			}
		}
		version = "v2"
		agePast(t, 60*time.Millisecond, self, peer) // past FreshFor
		if v, err := peer.Remember(ctx, "k", load); err != nil || v != "v2" {
			t.Fatalf("peer's stale Remember = %q, %v", v, err)
		}
		version = "v3" // self must take the peer's v2 from Redis, not load
		if v, err := self.Remember(ctx, "k", load); err != nil || v != "v2" {
			t.Fatalf("stale Remember after the peer's refresh = %q, %v; want v2", v, err)
		}
		check(t, self, "v2")
	})
}

// A Get that waits for a Remember of its key (rival flights never run at
// once) takes what the load stored in L1 instead of reading Redis again.
func TestGetAfterRivalLoadReadsL1(t *testing.T) {
	c := newCache[string](t, Options{TTL: time.Hour, L1TTL: time.Hour})
	ctx := ctxT(t)
	const key = "rival-l1"
	// Installed first (setting a seam waits for calls in progress), and
	// counting only once the loader runs: the Remember's own read before
	// it does not count.
	var counting atomic.Bool
	var l2Reads atomic.Int64
	c.setReadHook(func(k string) {
		if k == key && counting.Load() {
			l2Reads.Add(1)
		}
	})
	started, release := make(chan struct{}), make(chan struct{})
	var releaseOnce sync.Once
	t.Cleanup(func() { releaseOnce.Do(func() { close(release) }) })
	remembered := make(chan error, 1)
	go func() {
		_, err := c.Remember(ctx, key, func(context.Context, string) (string, error) {
			close(started)
			<-release
			return "loaded", nil
		})
		remembered <- err
	}()
	await(t, started, "the loader")
	counting.Store(true)
	waits := c.flights.RivalWaits()
	got := make(chan string, 1)
	go func() { v, _, _ := c.Get(ctx, key); got <- v }()
	eventually(t, 5*time.Second, "the Get to wait for the Remember", func() bool { return c.flights.RivalWaits() > waits })
	releaseOnce.Do(func() { close(release) })
	if err := <-remembered; err != nil {
		t.Fatalf("Remember: %v", err)
	}
	if v := <-got; v != "loaded" {
		t.Fatalf("Get after the load = %q, want \"loaded\"", v)
	}
	if n := l2Reads.Load(); n != 0 {
		t.Fatalf("the Get read the key from Redis %d times after the load had filled L1", n)
	}
}

// A stale Remember hit waits for its refresh, whose fill ristretto drops
// (its set buffer full, as in a storm of fills) while the old entry is
// between ristretto's eviction and its OnExit: ristretto's policy goroutine
// evicted it to admit another entry and is held there (descheduled, in
// life). R1 returns the refreshed value, which no tier of this instance
// forgets: Redis holds it, ristretto holds nothing. The old entry still sits
// in the hot index, not yet marked gone, and passes the fence (nothing
// invalidated the key). R2 must not get it from there.
func TestMonotonic_DroppedRefreshFillThroughIndex(t *testing.T) {
	const maxCost = 1 << 20
	c := newCache[string](t, Options{TTL: time.Hour, L1TTL: time.Hour, L1MaxCost: maxCost,
		FreshFor: 30 * time.Millisecond, SoftTimeout: 2 * time.Second})
	ctx := ctxT(t)
	const key = "dropped"
	h := hashKey(key)
	if err := c.Set(ctx, key, "old", 0); err != nil {
		t.Fatal(err)
	}
	old := intoIndex(t, c, key, func() error { _, _, err := c.Get(ctx, key); return err })
	agePast(t, 60*time.Millisecond, c) // past FreshFor

	// Another entry, as large as L1, evicts old: ristretto's policy
	// goroutine stops in old's OnExit. Admission compares access counts,
	// so the newcomer is read until it wins.
	inExit, release := holdExit(c, old)
	held := true
	defer func() {
		if held {
			release()
		}
	}()
	big := h ^ 1
	for evicted := false; !evicted; {
		for range 4096 {
			c.l1.Get(big)
		}
		rejected := c.st.l1Rejected.Load()
		if !c.l1.Set(big, &entry[string]{key: "big", hash: big}, maxCost-64) {
			continue
		}
		eventually(t, 5*time.Second, "the newcomer's admission or rejection", func() bool {
			select {
			case <-inExit:
				evicted = true
				return true
			default:
				return c.st.l1Rejected.Load() != rejected
			}
		})
	}
	if _, in := c.l1.Get(h); in {
		t.Fatal("ristretto still holds the old entry")
	}
	// The fill storm: the set buffer fills up behind the held goroutine.
	for i := uint64(0); c.l1.Set(big+2+i, &entry[string]{key: "storm"}, 1); i++ {
	}

	// The loader answers once R1 has joined its refresh (SoftTimeout): a
	// refresh done before R1 joins leaves R1 the stale value.
	joined := c.flights.Joined()
	load := func(context.Context, string) (string, error) {
		eventually(t, 5*time.Second, "R1 to join the refresh", func() bool { return c.flights.Joined() > joined })
		return "new", nil
	}
	if v, err := c.Remember(ctx, key, load); err != nil || v != "new" {
		t.Fatalf("R1: Remember = %q, %v; want the refreshed \"new\"", v, err)
	}
	if c.st.l1Dropped.Load() == 0 {
		t.Fatal("the refresh's fill was not dropped: this test would not exercise a value returned unstored")
	}
	if v, _, err := c.Get(ctx, key); err != nil || v != "new" {
		t.Fatalf("R2 after R1 returned \"new\": Get = %q, %v (monotonic reads broken)", v, err)
	}
	held = false
	release()
}
