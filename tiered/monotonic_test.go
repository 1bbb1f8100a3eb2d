package tiered

import (
	"context"
	"sync"
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
	time.Sleep(60 * time.Millisecond) // past FreshFor
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

// A Get flight and a Remember flight of one key are not joined, and share a
// snapshot. The Get flight reads Redis before a peer's write; the Remember
// (after an L1 miss) reads the new value, fills and returns it; the Get
// flight's fill must not then replace it (conflicts).
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
	getDone := make(chan string)
	go func() { v, _, _ := c.Get(ctx, key); getDone <- v }()
	await(t, reached, "the Get flight's L2 read")
	if err := c.rdb.Set(ctx, dk, newer, time.Hour).Err(); err != nil {
		t.Fatal(err)
	}
	v, err := c.Remember(ctx, key, func(context.Context, string) (string, error) {
		t.Error("loader called")
		return "", nil
	})
	if err != nil || v != "new" {
		t.Fatalf("R1: Remember = %q, %v", v, err)
	}
	close(resume)
	if v := <-getDone; v != "old" && v != "new" {
		t.Fatalf("the racing Get returned %q", v)
	}
	if v, _, _ := c.Get(ctx, key); v != "new" {
		t.Fatalf("R2 after R1 returned \"new\": Get = %q (monotonic reads broken)", v)
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
