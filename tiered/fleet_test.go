package tiered

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tiercache/tiercache/internal/redistest"
	"github.com/tiercache/tiercache/invalidate"
)

// TestFleet_WriteSeenEverywhere: four instances (four clients, four Buses)
// on one Redis. Once Set returns on one, every other instance returns the
// new value as soon as it has applied the invalidation, which takes one
// pub/sub hop (DESIGN guarantee 1).
func TestFleet_WriteSeenEverywhere(t *testing.T) {
	f := newFleet[string](t, shared, 4, Options{})
	ctx := ctxT(t)
	signals := make([]<-chan struct{}, len(f))
	for i, in := range f {
		signals[i] = applied(in.c)
	}
	var worst time.Duration
	for round := range 20 {
		w := round % len(f)
		val := fmt.Sprintf("v%d", round)
		// Every instance holds the previous value in L1.
		for _, in := range f {
			_, _, _ = in.c.Get(ctx, "k")
			_, _, _ = in.c.Get(ctx, "k")
		}
		start := time.Now()
		if err := f[w].c.Set(ctx, "k", val, 0); err != nil {
			t.Fatal(err)
		}
		mustGet(t, f[w].c, "k", val, "writer after Set")
		for i, in := range f {
			if i == w {
				continue
			}
			await(t, signals[i], "the invalidation")
			worst = max(worst, time.Since(start))
			mustGet(t, in.c, "k", val, fmt.Sprintf("instance %d after the invalidation", i))
		}
	}
	t.Logf("slowest propagation (Set start to applied, 20 rounds × 3 instances): %v", worst)
	if worst > time.Second {
		t.Errorf("propagation took %v; want well under the 1s heartbeat bound", worst)
	}
}

// TestFleet_PubSubKilled: CLIENT KILL TYPE pubsub drops every instance's
// subscription. A change whose invalidation was lost (written straight into
// Redis) must be visible on every instance once it has resubscribed: L1 is
// flushed on every resubscription.
func TestFleet_PubSubKilled(t *testing.T) {
	s := redistest.Start(t)
	f := newFleet[string](t, standalone{s}, 4, Options{})
	ctx := ctxT(t)
	c0 := f[0].c
	got := make([]<-chan struct{}, len(f))
	for i, in := range f[1:] {
		got[i+1] = applied(in.c)
	}
	if err := c0.Set(ctx, "k", "v1", 0); err != nil {
		t.Fatal(err)
	}
	for i, in := range f {
		if i > 0 { // the writer skips its own
			// A read before the invalidation arrives fills L1 with v1
			// that the invalidation then voids: the premise below would
			// read Redis.
			await(t, got[i], fmt.Sprintf("the write's invalidation on instance %d", i))
		}
		mustGet(t, in.c, "k", "v1", fmt.Sprintf("instance %d warm", i))
	}
	raw, _, _ := c0.encodeValue("v2")
	if err := f[0].rdb.Set(ctx, c0.dataKey(c0.nsGen.Load(), "k"), raw, time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	for i, in := range f { // the premise: L1 still serves v1, nobody told it
		mustGet(t, in.c, "k", "v1", fmt.Sprintf("instance %d before the kill", i))
	}
	epochs := make([]uint64, len(f))
	for i, in := range f {
		epochs[i] = in.bus.Epoch()
	}
	if n := s.KillPubSub(t); n < len(f) {
		t.Fatalf("KillPubSub killed %d connections, want ≥ %d", n, len(f))
	}
	for i, in := range f {
		eventually(t, 5*time.Second, "resubscription", func() bool {
			return in.bus.Live() && in.bus.Epoch() > epochs[i]
		})
		mustGet(t, in.c, "k", "v2", fmt.Sprintf("instance %d after resubscribing", i))
		if st := in.bus.Stats(); st.Reconnects < 1 {
			t.Errorf("instance %d: Reconnects = %d, want ≥ 1", i, st.Reconnects)
		}
	}
}

// TestFleet_SilentStreamBypassesL1: a frozen Redis keeps the socket open
// but says nothing (a half-open link). After HeartbeatTimeout the instance
// stops serving L1 (DESIGN guarantee 2) and reads go to Redis, which here
// cannot answer: the caller gets an error, never the unverified L1 value.
func TestFleet_SilentStreamBypassesL1(t *testing.T) {
	s := redistest.Start(t)
	bo := invalidate.Options{HeartbeatInterval: 50 * time.Millisecond, HeartbeatTimeout: 300 * time.Millisecond}
	f := newFleetBus[string](t, standalone{s}, 1, Options{CommandTimeout: 250 * time.Millisecond}, bo)
	c, bus := f[0].c, f[0].bus
	ctx := ctxT(t)
	if err := c.Set(ctx, "k", "v1", 0); err != nil {
		t.Fatal(err)
	}
	mustGet(t, c, "k", "v1", "fill")
	mustGet(t, c, "k", "v1", "L1 hit")

	s.Freeze(t)
	frozen := time.Now()
	thawed := false
	defer func() {
		if !thawed {
			s.Thaw(t)
		}
	}()
	eventually(t, 2*time.Second, "the Bus to notice the silence", func() bool { return !bus.Live() })
	detect := time.Since(frozen)
	t.Logf("silence detected after %v (HeartbeatTimeout %v)", detect, bo.HeartbeatTimeout)
	if detect > bo.HeartbeatTimeout+200*time.Millisecond {
		t.Errorf("detection took %v; want ≤ HeartbeatTimeout + 200ms", detect)
	}
	if v, ok, err := c.Get(ctx, "k"); err == nil {
		t.Fatalf("Get with a dead stream and a frozen Redis = %q, %v, nil; want an error (L1 must be bypassed)", v, ok)
	}
	s.Thaw(t)
	thawed = true
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := bus.WaitLive(wctx); err != nil {
		t.Fatal(err)
	}
	mustGet(t, c, "k", "v1", "after the stream is back")
}

// TestFleet_RedisRestarted: Redis restarts empty. Every instance flushes L1
// on resubscribing, so nothing that only lived in the old Redis is served.
func TestFleet_RedisRestarted(t *testing.T) {
	s := redistest.Start(t)
	f := newFleet[string](t, standalone{s}, 2, Options{})
	ctx := ctxT(t)
	_ = f[0].c.Set(ctx, "k", "v1", 0)
	for _, in := range f {
		eventually(t, 5*time.Second, "the value", func() bool { v, _, _ := in.c.Get(ctx, "k"); return v == "v1" })
	}
	epochs := []uint64{f[0].bus.Epoch(), f[1].bus.Epoch()}
	s.Restart(t)
	for i, in := range f {
		eventually(t, 10*time.Second, "resubscription", func() bool { return in.bus.Live() && in.bus.Epoch() > epochs[i] })
		if v, ok, err := in.c.Get(ctx, "k"); ok || err != nil {
			t.Fatalf("instance %d after the restart: Get = %q, %v, %v; want a miss", i, v, ok, err)
		}
	}
	// And the namespace generation was re-read: writes and reads agree.
	if err := f[1].c.Set(ctx, "k", "v2", 0); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the new value", func() bool { v, _, _ := f[0].c.Get(ctx, "k"); return v == "v2" })
}

// TestFleet_ClearFromOneInstance: Clear on one instance empties the
// namespace for all of them, and only that namespace.
func TestFleet_ClearFromOneInstance(t *testing.T) {
	f := newFleet[string](t, shared, 3, Options{})
	other := newCache[string](t, Options{})
	ctx := ctxT(t)
	_ = f[0].c.SetMany(ctx, map[string]string{"a": "1", "b": "2"}, 0)
	_ = other.Set(ctx, "a", "other", 0)
	for _, in := range f {
		eventually(t, 5*time.Second, "the values", func() bool {
			m, _ := in.c.GetMany(ctx, []string{"a", "b"})
			return len(m) == 2
		})
	}
	got := applied(f[2].c)
	if err := f[1].c.Clear(ctx); err != nil {
		t.Fatal(err)
	}
	await(t, got, "the flush")
	for i, in := range f {
		if i == 0 {
			eventually(t, 5*time.Second, "the flush", func() bool { m, _ := in.c.GetMany(ctx, []string{"a", "b"}); return len(m) == 0 })
		}
		if m, err := in.c.GetMany(ctx, []string{"a", "b"}); len(m) != 0 || err != nil {
			t.Fatalf("instance %d after Clear: GetMany = %v, %v; want empty", i, m, err)
		}
	}
	mustGet(t, other, "a", "other", "another namespace after Clear")
}

// TestFleet_Stress runs writers and readers on four instances under -race.
// Each reader goroutine must see every key's versions in non-decreasing
// order, and after the writers stop every instance converges on the last
// version written.
func TestFleet_Stress(t *testing.T) {
	f := newFleet[string](t, shared, 4, Options{})
	const keys = 8
	dur := 1500 * time.Millisecond
	if testing.Short() {
		dur = 300 * time.Millisecond
	}
	ctx := ctxT(t)
	var last [keys]atomic.Int64 // last version whose Set returned
	var mu [keys]sync.Mutex     // one writer at a time per key keeps versions ordered
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var reads, writes atomic.Int64
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := f[w].c
			for {
				select {
				case <-stop:
					return
				default:
				}
				k := rand.IntN(keys)
				mu[k].Lock()
				v := last[k].Load() + 1
				err := c.Set(ctx, "k"+strconv.Itoa(k), strconv.FormatInt(v, 10), 0)
				if err == nil {
					last[k].Store(v)
				}
				mu[k].Unlock()
				if err != nil {
					t.Errorf("Set: %v", err)
					return
				}
				writes.Add(1)
			}
		}()
	}
	for r := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := f[r%4].c
			var seen [keys]int64
			for {
				select {
				case <-stop:
					return
				default:
				}
				k := rand.IntN(keys)
				v, ok, err := c.Get(ctx, "k"+strconv.Itoa(k))
				if err != nil {
					t.Errorf("Get: %v", err)
					return
				}
				reads.Add(1)
				if !ok {
					continue
				}
				n, _ := strconv.ParseInt(v, 10, 64)
				if n < seen[k] {
					t.Errorf("reader %d key %d went back from version %d to %d", r, k, seen[k], n)
					return
				}
				seen[k] = n
			}
		}()
	}
	time.Sleep(dur) // the length of the run, not a wait for an event
	close(stop)
	wg.Wait()
	for i, in := range f {
		for k := range keys {
			want := strconv.FormatInt(last[k].Load(), 10)
			eventually(t, 5*time.Second, "convergence", func() bool {
				v, _, err := in.c.Get(ctx, "k"+strconv.Itoa(k))
				return err == nil && v == want
			})
			_ = i
		}
	}
	t.Logf("%d writes, %d reads", writes.Load(), reads.Load())
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		t.Fatal("ran out of time")
	}
}
