package tiered

import (
	"context"
	"errors"
	"fmt"
	"math"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/tiercache/tiercache/internal/racebuild"
)

// TestL1HitAllocs holds the promise of Get's documentation: an L1 hit
// allocates nothing.
//
// testing.AllocsPerRun divides whole allocations by runs, so the one 512-byte
// slice ristretto's access ring hands its policy every 64 Gets (in bare
// ristretto too) reads as 0, while anything allocated per Get reads as >= 1.
func TestL1HitAllocs(t *testing.T) {
	if racebuild.Enabled {
		// The detector makes sync.Pool drop items at random, and ristretto's
		// Get takes its ring stripe from a sync.Pool: the refills would
		// count as allocations of the hot path.
		t.Skip("allocation counts are not meaningful under -race")
	}
	t.Run("struct", func(t *testing.T) {
		testL1HitAllocs(t, user{ID: 7, Name: "alice", Roles: []string{"admin", "ops"}})
	})
	t.Run("bytes", func(t *testing.T) {
		testL1HitAllocs(t, []byte("a byte-slice value"))
	})
	t.Run("string", func(t *testing.T) {
		testL1HitAllocs(t, "a string value")
	})
}

func testL1HitAllocs[V any](t *testing.T, val V) {
	c := newCache[V](t, Options{TTL: time.Hour, L1TTL: time.Hour})
	ctx := ctxT(t)
	const key = "alloc:hot"
	h := hashKey(key)
	if err := c.Set(ctx, key, val, 0); err != nil {
		t.Fatalf("Set: %v", err)
	}
	if e, in := c.l1.Get(h); in && c.valid(e, h, key) {
		t.Fatal("L1 holds a valid entry before the first read")
	}
	if _, ok, err := c.Get(ctx, key); !ok || err != nil {
		t.Fatalf("first Get = %v, %v; want a hit from Redis", ok, err)
	}
	e, in := c.l1.Get(h)
	if !in || !c.valid(e, h, key) {
		t.Fatal("the first Get did not leave a valid entry in L1")
	}

	l2 := c.st.l2Hits.Load() + c.st.l2Misses.Load()
	rejected := c.st.l1Rejected.Load()
	var (
		missed bool
		getErr error
	)
	allocs := testing.AllocsPerRun(1000, func() {
		_, ok, err := c.Get(context.Background(), key)
		if !ok {
			missed = true
		}
		if err != nil {
			getErr = err
		}
	})
	if missed || getErr != nil {
		t.Fatalf("a Get during the measurement missed (%v) or failed: %v", missed, getErr)
	}
	if d := c.st.l2Hits.Load() + c.st.l2Misses.Load() - l2; d != 0 {
		t.Fatalf("%d Gets left L1 during the measurement; it did not measure the hit path", d)
	}
	if d := c.st.l1Rejected.Load() - rejected; d != 0 {
		t.Fatalf("the fence rejected the entry %d times during the measurement", d)
	}
	if allocs != 0 {
		t.Errorf("an L1 hit allocates %v times per Get; want 0", allocs)
	}
}

// TestL1HitsCountedExactly hits L1 from many goroutines at once, more than
// there are Ps, through Get, GetMany and Remember, and expects Stats to
// count every hit: the per-P counter must lose none.
func TestL1HitsCountedExactly(t *testing.T) {
	c := newCache[string](t, Options{TTL: time.Hour, L1TTL: time.Hour})
	ctx := ctxT(t)
	keys := []string{"count:a", "count:b", "count:c", "count:d"}
	for _, k := range keys {
		if err := c.Set(ctx, k, "v-"+k, 0); err != nil {
			t.Fatalf("Set: %v", err)
		}
		warmL1(t, c, []string{k})
	}
	before := c.Stats()
	l2Before := c.st.l2Hits.Load() + c.st.l2Misses.Load()

	const goroutines, rounds = 16, 500
	var wg sync.WaitGroup
	errs := make(chan error, goroutines)
	for g := range goroutines {
		wg.Go(func() {
			for r := range rounds {
				k := keys[(g+r)%len(keys)]
				if _, ok, err := c.Get(ctx, k); !ok || err != nil {
					errs <- fmt.Errorf("Get(%q) = %v, %v", k, ok, err)
					return
				}
				if got, err := c.GetMany(ctx, keys); err != nil || len(got) != len(keys) {
					errs <- fmt.Errorf("GetMany = %d values, %v", len(got), err)
					return
				}
				if _, err := c.Remember(ctx, k, func(context.Context, string) (string, error) {
					return "", errors.New("the loader ran: the key was not in L1")
				}); err != nil {
					errs <- fmt.Errorf("Remember(%q): %v", k, err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if d := c.st.l2Hits.Load() + c.st.l2Misses.Load() - l2Before; d != 0 {
		t.Fatalf("%d reads left L1: the test did not count L1 hits only", d)
	}
	want := uint64(goroutines * rounds * (1 + len(keys) + 1))
	if got := c.Stats().L1.Hits - before.L1.Hits; got != want {
		t.Fatalf("Stats counted %d L1 hits, want %d", got, want)
	}
}

// allocsPer is testing.AllocsPerRun without its GOMAXPROCS(1), under which
// a goroutine waiting for another's progress with runtime.Gosched can wait
// for long: the other may be woken by the network poller, which a busy
// single P seldom consults. Like AllocsPerRun, it counts the whole
// process's allocations and rounds down.
func allocsPer(runs int, f func()) float64 {
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range runs {
		f()
	}
	runtime.ReadMemStats(&after)
	return float64((after.Mallocs - before.Mallocs) / uint64(runs))
}

// TestSetAllocs keeps what Set allocates beyond the bare transaction it
// sends (MULTI, SET of the encoded value, PUBLISH of the invalidation,
// EXEC, through go-redis) in check: 13, counted exactly (25 before Set got a
// write path without per-batch slices and closures, a pooled JSON encoder,
// prebuilt metric options and an enter without a closure). Measured beside
// the bare transaction, so that go-redis's own count does not matter; what
// is left is the encoding, the CommandTimeout context, the span, the key
// and the message.
func TestSetAllocs(t *testing.T) {
	if racebuild.Enabled {
		t.Skip("allocation counts are not meaningful under -race (sync.Pool drops items at random)")
	}
	c := newCache[user](t, Options{TTL: time.Hour})
	ctx := context.Background() // no deadline of its own: Set adds CommandTimeout's
	const key = "alloc:set"
	v := user{ID: 7, Name: "alice", Roles: []string{"admin", "ops"}}
	raw, err := c.encodeRaw(v)
	if err != nil {
		t.Fatal(err)
	}
	msg, err := c.bus.KeysMessage(c.name, []string{key})
	if err != nil {
		t.Fatal(err)
	}
	dk := c.dataKey(c.nsGen.Load(), key)
	// Allocation counts are the whole process's, and this process's Bus
	// allocates as it receives each write's echo. Each op waits until the
	// Bus has skipped its echo, so that both sides count exactly one,
	// whenever the Bus's goroutine gets to run.
	echoes := c.bus.Stats().Own
	echoed := func() {
		echoes++
		deadline := time.Now().Add(5 * time.Second)
		for c.bus.Stats().Own < echoes {
			if time.Now().After(deadline) {
				t.Fatal("the Bus did not receive its own write's echo within 5s")
			}
			runtime.Gosched()
		}
	}
	bareTx := func() {
		tx := c.rdb.TxPipeline()
		tx.Set(ctx, dk, raw, time.Hour)
		if c.tags != nil {
			tx.SPublish(ctx, c.bus.ShardChannel(c.shard(key)), msg)
		} else {
			tx.Publish(ctx, c.bus.Channel(), msg)
		}
		if _, err := tx.Exec(ctx); err != nil {
			t.Fatalf("bare transaction: %v", err)
		}
		echoed()
	}
	set := func() {
		if err := c.Set(ctx, key, v, time.Hour); err != nil {
			t.Fatalf("Set: %v", err)
		}
		echoed()
	}
	// Other goroutines still allocate now and then (the Bus's heartbeats,
	// a reconnect when the machine is starved): the sides take turns, 5
	// rounds each, and each side's quietest round counts.
	bare, ours := math.Inf(1), math.Inf(1)
	bareTx()
	set()
	for range 5 {
		bare = min(bare, allocsPer(200, bareTx))
		ours = min(ours, allocsPer(200, set))
	}
	t.Logf("allocations per write: Set %.1f, bare transaction %.1f", ours, bare)
	if extra := ours - bare; extra > 13 {
		t.Errorf("Set allocates %.1f more than the bare transaction (%.1f against %.1f); at most 13", extra, ours, bare)
	}
}
