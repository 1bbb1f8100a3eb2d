package tiered

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tiercache/tiercache/internal/redistest"
)

// await fails the test if ch does not deliver within a generous bound; it
// is a guard against hangs, not a sleep.
func await(t testing.TB, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
	}
}

// eventually polls cond (there is no event for it) with a hard deadline.
func eventually(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// clocked is a cache whose coarse clock a test can read (see agePast).
type clocked interface{ clockNow() int64 }

func (c *Cache[V]) clockNow() int64 {
	if c.l1 == nil { // no L1, no coarse clock: freshness is read from Redis, by the wall clock
		return time.Now().UnixNano()
	}
	return c.now.Load()
}

// agePast lets d go by (there is no event for time passing), then waits
// until each cache's coarse clock has seen it go by: the goroutine that
// advances the clock lags real time when the scheduler starves it (the race
// detector, other packages' tests on the same 2 cores), and an L1 entry
// past FreshFor by the wall clock is then still fresh by the cache's.
func agePast(t testing.TB, d time.Duration, cs ...clocked) {
	t.Helper()
	at := time.Now().Add(d).UnixNano()
	time.Sleep(d)
	eventually(t, 5*time.Second, "the caches' clocks to pass the wait", func() bool {
		for _, c := range cs {
			if c.clockNow() < at {
				return false
			}
		}
		return true
	})
}

// mustGet reads key and fails unless it holds want.
func mustGet(t testing.TB, c *Cache[string], key, want, when string) {
	t.Helper()
	v, ok, err := c.Get(context.Background(), key)
	if err != nil || !ok || v != want {
		t.Fatalf("%s: Get(%q) = %q, %v, %v; want %q", when, key, v, ok, err, want)
	}
}

// TestFence_InvalidationBetweenL2ReadAndL1Store forces pitfalls C-a: the
// reader has read the old value from L2, then another instance's write is
// applied here, then the reader's fill completes. The old value must never
// be served afterwards.
func TestFence_InvalidationBetweenL2ReadAndL1Store(t *testing.T) {
	f := newFleet[string](t, shared, 2, Options{})
	reader, writer := f[0].c, f[1].c
	ctx := ctxT(t)
	got := applied(reader)
	if err := writer.Set(ctx, "k", "old", 0); err != nil {
		t.Fatal(err)
	}
	await(t, got, "the first write's invalidation")

	reader.setReadHook(func(key string) {
		// The fill holds "old". Now the write lands and its invalidation is
		// applied here before the fill stores.
		if err := writer.Set(ctx, key, "new", 0); err != nil {
			t.Error(err)
		}
		await(t, got, "the second write's invalidation")
	})

	// This read began before the write finished, so "old" is a legal answer.
	mustGet(t, reader, "k", "old", "read concurrent with the write")
	reader.setReadHook(nil)
	for i := range 5 {
		mustGet(t, reader, "k", "new", "read after the write")
		_ = i
	}
	if st := reader.Stats(); st.L2.Hits != 2 {
		t.Fatalf("L2 hits = %d, want 2 (the stale fill must not have been served from L1)", st.L2.Hits)
	}
}

// TestFence_InvalidationAfterPreCheck forces the case the fill's pre-check
// cannot see: the invalidation lands after the check, right before the
// ristretto Set (pitfalls C-e). Validation on read must reject the entry.
func TestFence_InvalidationAfterPreCheck(t *testing.T) {
	f := newFleet[string](t, shared, 2, Options{})
	reader, writer := f[0].c, f[1].c
	ctx := ctxT(t)
	got := applied(reader)
	_ = writer.Set(ctx, "k", "old", 0)
	await(t, got, "the first write's invalidation")

	reader.setStoreHook(func(key string) {
		if err := writer.Set(ctx, key, "new", 0); err != nil {
			t.Error(err)
		}
		await(t, got, "the second write's invalidation")
	})
	mustGet(t, reader, "k", "old", "read concurrent with the write")
	reader.setStoreHook(nil)
	// The stale entry is in L1 now, exactly as the race leaves it...
	e, ok := reader.l1.Get(hashKey("k"))
	if !ok || e.val != "old" {
		t.Fatalf("L1 holds %v, %v; the test needs the stale entry stored", e, ok)
	}
	// ...and it is never served.
	mustGet(t, reader, "k", "new", "read after the write")
	mustGet(t, reader, "k", "new", "second read after the write")
}

// TestFence_LocalWriteDuringFill: a write on the same instance while its
// own fill is in flight.
func TestFence_LocalWriteDuringFill(t *testing.T) {
	c := newCache[string](t, Options{})
	ctx := ctxT(t)
	_ = c.Set(ctx, "k", "old", 0)
	c.setReadHook(func(key string) {
		if err := c.Set(ctx, key, "new", 0); err != nil {
			t.Error(err)
		}
	})
	mustGet(t, c, "k", "old", "read concurrent with the write")
	c.setReadHook(nil)
	mustGet(t, c, "k", "new", "read after the local write")
	mustGet(t, c, "k", "new", "second read after the local write")
}

// TestFence_TwoQueuedFillsOfANewKey forces pitfalls R3: two fills of one new
// key, the older value's Set reaching ristretto after the newer one's. The
// reader must never go back to the older value.
func TestFence_TwoQueuedFillsOfANewKey(t *testing.T) {
	f := newFleet[string](t, shared, 2, Options{})
	reader, writer := f[0].c, f[1].c
	ctx := ctxT(t)
	got := applied(reader)
	_ = writer.Set(ctx, "k", "v1", 0)
	await(t, got, "v1's invalidation")

	release := make(chan struct{})
	paused := make(chan struct{})
	first := true
	reader.setStoreHook(func(string) {
		if first { // fill #1 (v1) stops right before its ristretto Set
			first = false
			close(paused)
			<-release
		}
	})
	done := make(chan string)
	go func() {
		v, _, _ := reader.Get(ctx, "k")
		done <- v
	}()
	<-paused
	// v2 is written; its invalidation detaches fill #1's flight, so the
	// next read runs fill #2, which stores v2.
	_ = writer.Set(ctx, "k", "v2", 0)
	await(t, got, "v2's invalidation")
	mustGet(t, reader, "k", "v2", "fill #2")
	mustGet(t, reader, "k", "v2", "L1 hit after fill #2")
	close(release) // fill #1 now Sets v1 over v2's entry
	if v := <-done; v != "v1" {
		t.Fatalf("fill #1 returned %q, want v1", v)
	}
	reader.l1.Wait()
	for range 3 {
		mustGet(t, reader, "k", "v2", "after the late fill")
	}
}

// TestFence_ResetDuringFill: the Bus loses and regains its subscription
// while a fill is in flight; the fill's entry belongs to the old epoch and
// must not be served, even for a change L1 never heard about.
func TestFence_ResetDuringFill(t *testing.T) {
	s := redistest.Start(t)
	f := newFleet[string](t, standalone{s}, 1, Options{})
	c, bus := f[0].c, f[0].bus
	ctx := ctxT(t)
	_ = c.Set(ctx, "k", "old", 0)
	// The reset lands after the fill's pre-check, so only validation on
	// read stands between the old-epoch entry and a reader.
	c.setStoreHook(func(string) {
		before := bus.Epoch()
		s.KillPubSub(t)
		eventually(t, 5*time.Second, "the bus to resubscribe", func() bool { return bus.Live() && bus.Epoch() > before })
	})
	mustGet(t, c, "k", "old", "read during the reset")
	c.setStoreHook(nil)
	if e, ok := c.l1.Get(hashKey("k")); !ok || e.val != "old" {
		t.Fatalf("L1 holds %v, %v; the test needs the old-epoch entry stored", e, ok)
	}
	// A change whose invalidation was "lost": written straight into Redis.
	raw, _, err := c.encodeValue("new")
	if err != nil {
		t.Fatal(err)
	}
	if err := f[0].rdb.Set(ctx, c.dataKey(c.nsGen.Load(), "k"), raw, time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	mustGet(t, c, "k", "new", "read after the reset")
}

// TestFence_ClearDuringFill: a namespace flush from another instance lands
// while a fill is in flight.
func TestFence_ClearDuringFill(t *testing.T) {
	f := newFleet[string](t, shared, 2, Options{})
	reader, writer := f[0].c, f[1].c
	ctx := ctxT(t)
	got := applied(reader)
	_ = writer.Set(ctx, "k", "old", 0)
	await(t, got, "the write's invalidation")
	reader.setStoreHook(func(string) {
		if err := writer.Clear(ctx); err != nil {
			t.Error(err)
		}
		await(t, got, "the flush")
	})
	mustGet(t, reader, "k", "old", "read concurrent with Clear")
	reader.setStoreHook(nil)
	if v, ok, err := reader.Get(ctx, "k"); ok || err != nil {
		t.Fatalf("Get after Clear = %q, %v, %v; want a miss", v, ok, err)
	}
}

// TestFence_FlightStartingAfterItsForget forces the race TestFleet_Stress
// found: a read flight created before an invalidation, whose goroutine only
// starts after it. The invalidation forgets the flight; if the flight took
// its snapshot when it started, it would share the snapshot of the next
// flight while holding an older value, and its late fill would replace the
// newer one in L1: a reader would go back from v2 to v1.
func TestFence_FlightStartingAfterItsForget(t *testing.T) {
	f := newFleet[string](t, shared, 2, Options{})
	reader, writer := f[0].c, f[1].c
	ctx := ctxT(t)
	got := applied(reader)
	_ = writer.Set(ctx, "k", "v0", 0)
	await(t, got, "v0's invalidation")

	startOld, readOld := make(chan struct{}), make(chan struct{})
	oldStarted, oldRead := make(chan struct{}), make(chan struct{})
	holding, release := make(chan struct{}), make(chan struct{})
	var releaseOnce sync.Once
	releaseBus := func() { releaseOnce.Do(func() { close(release) }) }
	defer releaseBus() // on failure too, or Close would wait for the held handler
	var flights atomic.Int32
	var holdNext atomic.Bool
	// All seams are installed up front: installing one takes the cache's
	// write lock, which would wait for the Get blocked in the old flight.
	reader.setFlightHooks(func(string) {
		if flights.Add(1) == 1 { // the old flight starts late
			close(oldStarted)
			<-startOld
		}
	}, func() {
		if holdNext.CompareAndSwap(true, false) { // v2's invalidation arrives late
			close(holding)
			<-release
		}
	})
	reader.setReadHook(func(string) {
		if flights.Load() == 1 { // the old flight holds v1 between its read and its fill
			close(oldRead)
			<-readOld
		}
	})
	oldResult := make(chan string)
	go func() { v, _, _ := reader.Get(ctx, "k"); oldResult <- v }()
	<-oldStarted

	_ = writer.Set(ctx, "k", "v1", 0) // forgets the old flight
	await(t, got, "v1's invalidation")
	close(startOld)
	<-oldRead

	holdNext.Store(true)
	_ = writer.Set(ctx, "k", "v2", 0)
	<-holding
	mustGet(t, reader, "k", "v2", "the new flight") // reads v2, fills L1
	close(readOld)                                  // the old flight now fills v1
	if v := <-oldResult; v != "v1" {
		t.Fatalf("old flight returned %q, want v1", v)
	}
	reader.l1.Wait()
	mustGet(t, reader, "k", "v2", "after the old flight's fill (reads must not go back)")
	releaseBus()
	await(t, got, "v2's invalidation")
}

// TestFence_StaleFlightReturnsNewerValue forces the third race
// TestFleet_Stress found. An old flight (its key invalidated while it ran)
// reads Redis after a newer flight did, so it returns a newer value than the
// one the newer flight stores in L1 with a valid snapshot. Unless the old
// flight voids the key on its way out, its caller's next read goes back.
func TestFence_StaleFlightReturnsNewerValue(t *testing.T) {
	f := newFleet[string](t, shared, 2, Options{})
	reader, writer := f[0].c, f[1].c
	ctx := ctxT(t)
	got := applied(reader)
	_ = writer.Set(ctx, "k", "v0", 0)
	await(t, got, "v0's invalidation")

	startOld, oldStarted := make(chan struct{}), make(chan struct{})
	storeNew, newStoring := make(chan struct{}), make(chan struct{})
	holding, release := make(chan struct{}), make(chan struct{})
	var releaseOnce sync.Once
	releaseBus := func() { releaseOnce.Do(func() { close(release) }) }
	defer releaseBus()
	var flights atomic.Int32
	var holdNext atomic.Bool
	reader.setFlightHooks(func(string) {
		if flights.Add(1) == 1 { // the old flight waits before reading
			close(oldStarted)
			<-startOld
		}
	}, func() {
		if holdNext.CompareAndSwap(true, false) {
			close(holding)
			<-release
		}
	})
	var stores atomic.Int32
	reader.setStoreHook(func(string) { // the new flight's store waits
		if stores.Add(1) == 1 {
			close(newStoring)
			<-storeNew
		}
	})

	oldResult := make(chan string)
	go func() { v, _, _ := reader.Get(ctx, "k"); oldResult <- v }()
	<-oldStarted
	_ = writer.Set(ctx, "k", "v1", 0) // detaches the old flight
	await(t, got, "v1's invalidation")
	newResult := make(chan string)
	go func() { v, _, _ := reader.Get(ctx, "k"); newResult <- v }() // the new flight reads v1
	<-newStoring

	holdNext.Store(true)
	_ = writer.Set(ctx, "k", "v2", 0) // its invalidation is held back at the reader
	<-holding
	close(startOld) // the old flight reads v2 and returns it
	if v := <-oldResult; v != "v2" {
		t.Fatalf("old flight returned %q, want v2", v)
	}
	close(storeNew) // the new flight now stores v1 with a snapshot that was valid
	if v := <-newResult; v != "v1" {
		t.Fatalf("new flight returned %q, want v1", v)
	}
	reader.l1.Wait()
	// The caller that saw v2 reads again, before v2's invalidation arrives.
	mustGet(t, reader, "k", "v2", "after having seen v2 (reads must not go back)")
	releaseBus()
}
