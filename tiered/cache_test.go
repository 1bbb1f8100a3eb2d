package tiered

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tiercache/tiercache/internal/wire"
	"github.com/tiercache/tiercache/invalidate"
)

type user struct {
	ID    int      `json:"id" msgpack:"id"`
	Name  string   `json:"name" msgpack:"name"`
	Roles []string `json:"roles" msgpack:"roles"`
}

var modes = []struct {
	name string
	opts Options
}{
	{"tiered", Options{}},
	{"tiered-msgpack", Options{Codec: Msgpack}},
	{"tiered-compressed", Options{CompressAbove: 8}},
	{"tiered-copy", Options{CopyOnRead: true}},
	{"plainjson", Options{PlainJSON: true}},
	{"redis", Options{Mode: ModeRedis}},
	{"memory", Options{Mode: ModeMemory}},
}

// TestCache_API runs every public method in every mode against real Redis.
func TestCache_API(t *testing.T) {
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			c := newCache[user](t, m.opts)
			ctx := ctxT(t)
			alice := user{ID: 1, Name: "alice", Roles: []string{"admin"}}
			bob := user{ID: 2, Name: strings.Repeat("bob", 20), Roles: []string{}}

			// Get of a missing key is a miss, not an error.
			if v, ok, err := c.Get(ctx, "u1"); ok || err != nil {
				t.Fatalf("Get(missing) = %v, %v, %v; want miss", v, ok, err)
			}
			if ok, err := c.Exists(ctx, "u1"); ok || err != nil {
				t.Fatalf("Exists(missing) = %v, %v", ok, err)
			}
			if err := c.Set(ctx, "u1", alice, 0); err != nil {
				t.Fatalf("Set: %v", err)
			}
			for i := range 3 { // first read fills L1, later ones hit it
				v, ok, err := c.Get(ctx, "u1")
				if err != nil || !ok || v.Name != "alice" || !slices.Equal(v.Roles, alice.Roles) {
					t.Fatalf("Get #%d = %+v, %v, %v; want %+v", i, v, ok, err, alice)
				}
			}
			if ok, err := c.Exists(ctx, "u1"); !ok || err != nil {
				t.Fatalf("Exists(u1) = %v, %v; want true", ok, err)
			}

			// Overwrite is visible to the writer at once.
			if err := c.Set(ctx, "u1", bob, time.Minute); err != nil {
				t.Fatalf("Set: %v", err)
			}
			if v, ok, _ := c.Get(ctx, "u1"); !ok || v.Name != bob.Name {
				t.Fatalf("Get after overwrite = %+v, %v; want %+v", v, ok, bob)
			}

			// Batch operations.
			items := map[string]user{"b1": {ID: 11}, "b2": {ID: 12}, "b3": {ID: 13}}
			if err := c.SetMany(ctx, items, 0); err != nil {
				t.Fatalf("SetMany: %v", err)
			}
			got, err := c.GetMany(ctx, []string{"b1", "b2", "b3", "nope", "b1"})
			if err != nil || len(got) != 3 || got["b2"].ID != 12 {
				t.Fatalf("GetMany = %v, %v; want b1..b3", got, err)
			}
			got, _ = c.GetMany(ctx, []string{"b1", "b2", "b3"}) // from L1 now
			if len(got) != 3 || got["b3"].ID != 13 {
				t.Fatalf("GetMany (warm) = %v", got)
			}
			if err := c.DeleteMany(ctx, "b1", "b2"); err != nil {
				t.Fatalf("DeleteMany: %v", err)
			}
			got, _ = c.GetMany(ctx, []string{"b1", "b2", "b3"})
			if len(got) != 1 || got["b3"].ID != 13 {
				t.Fatalf("GetMany after DeleteMany = %v; want only b3", got)
			}

			// Delete.
			if err := c.Delete(ctx, "u1"); err != nil {
				t.Fatalf("Delete: %v", err)
			}
			if v, ok, err := c.Get(ctx, "u1"); ok || err != nil {
				t.Fatalf("Get after Delete = %+v, %v, %v; want miss", v, ok, err)
			}
			if ok, _ := c.Exists(ctx, "u1"); ok {
				t.Fatalf("Exists after Delete = true")
			}

			// DeletePattern.
			_ = c.SetMany(ctx, map[string]user{"p:1": {ID: 1}, "p:2": {ID: 2}, "q:1": {ID: 3}}, 0)
			_, _ = c.GetMany(ctx, []string{"p:1", "p:2", "q:1"})
			n, err := c.DeletePattern(ctx, "p:*")
			if err != nil {
				t.Fatalf("DeletePattern: %v", err)
			}
			if m.opts.Mode != ModeMemory && n != 2 {
				t.Fatalf("DeletePattern = %d, want 2", n)
			}
			got, _ = c.GetMany(ctx, []string{"p:1", "p:2", "q:1"})
			if _, ok := got["p:1"]; ok {
				t.Fatalf("p:1 survived DeletePattern: %v", got)
			}
			if m.opts.Mode != ModeMemory && got["q:1"].ID != 3 {
				t.Fatalf("q:1 lost by DeletePattern(p:*): %v", got)
			}

			// Clear.
			_ = c.Set(ctx, "c1", alice, 0)
			if err := c.Clear(ctx); err != nil {
				t.Fatalf("Clear: %v", err)
			}
			if v, ok, err := c.Get(ctx, "c1"); ok || err != nil {
				t.Fatalf("Get after Clear = %+v, %v, %v; want miss", v, ok, err)
			}
			if v, ok, _ := c.Get(ctx, "q:1"); ok {
				t.Fatalf("Get(q:1) after Clear = %+v; want miss", v)
			}
			_ = c.Set(ctx, "c2", alice, 0) // the namespace works after Clear
			if v, ok, _ := c.Get(ctx, "c2"); !ok || v.Name != "alice" {
				t.Fatalf("Get after Clear+Set = %+v, %v", v, ok)
			}

			// Ping, Stats, Health.
			if err := c.Ping(ctx); err != nil {
				t.Fatalf("Ping: %v", err)
			}
			st := c.Stats()
			if st.Type != c.Mode().String() || st.Writes == 0 || st.Uptime <= 0 {
				t.Fatalf("Stats = %+v", st)
			}
			if m.opts.Mode != ModeRedis && (st.L1.Hits == 0 || st.Keys == 0 || st.Memory == 0) {
				t.Fatalf("Stats.L1 = %+v (keys %d, memory %d); want L1 hits and keys", st.L1, st.Keys, st.Memory)
			}
			if m.opts.Mode != ModeMemory && st.L2.Hits == 0 {
				t.Fatalf("Stats.L2 = %+v; want L2 hits", st.L2)
			}
			if h := c.Health(ctx); h.Status != "ok" || !h.Redis || !h.BusLive {
				t.Fatalf("Health = %+v", h)
			}
		})
	}
}

// TestCache_TTL checks that values expire from both tiers, and that an L1
// entry never outlives the Redis key it came from (DESIGN guarantee 4).
func TestCache_TTL(t *testing.T) {
	f := newFleet[string](t, shared, 2, Options{TTLJitter: -1, L1TTL: time.Hour})
	ctx := ctxT(t)
	got := applied(f[1].c)
	if err := f[0].c.Set(ctx, "k", "v", 300*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	<-got // f[1] has applied the write's invalidation; its next read fills L1
	if v, ok, _ := f[1].c.Get(ctx, "k"); !ok || v != "v" {
		t.Fatalf("Get = %q, %v", v, ok)
	}
	e, ok := f[1].c.l1.Get(hashKey("k"))
	if !ok {
		t.Fatal("entry not in L1 after a fill (fill waits for ristretto)")
	}
	if ttl := time.Until(time.Unix(0, e.expires)); ttl > 300*time.Millisecond || ttl <= 0 {
		t.Fatalf("L1 TTL = %v; want ≤ the 300ms left in Redis", ttl)
	}
	// Expiry publishes nothing; L1 must stop serving on its own.
	deadline := time.Now().Add(2 * time.Second)
	for {
		_, ok, _ := f[1].c.Get(ctx, "k")
		if !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("value still served 2s after its 300ms TTL")
		}
		time.Sleep(20 * time.Millisecond) // polling an expiry: there is no event to await
	}
}

func TestCache_Jitter(t *testing.T) {
	c := newCache[string](t, Options{TTLJitter: 0.2})
	seen := map[time.Duration]bool{}
	for range 100 {
		d := c.jitter(time.Hour)
		if d > time.Hour || d < 48*time.Minute {
			t.Fatalf("jitter(1h) = %v; want within [48m, 1h]", d)
		}
		seen[d] = true
	}
	if len(seen) < 50 {
		t.Fatalf("jitter produced only %d distinct values in 100 draws", len(seen))
	}
	ctx := ctxT(t)
	_ = c.Set(ctx, "j", "x", time.Hour)
	pttl, _ := c.rdb.PTTL(ctx, c.dataKey(c.nsGen.Load(), "j")).Result()
	if pttl > time.Hour || pttl < 47*time.Minute {
		t.Fatalf("PTTL after Set(1h) = %v; want jittered below 1h", pttl)
	}
}

// TestCache_BadInput: every bad input gets a clear error and loses nothing.
func TestCache_BadInput(t *testing.T) {
	c := newCache[string](t, Options{MaxKeyLen: 16, MaxValueSize: 64})
	ctx := ctxT(t)
	if err := c.Set(ctx, "keep", "safe", 0); err != nil {
		t.Fatal(err)
	}
	long := strings.Repeat("k", 17)
	cases := []struct {
		name string
		err  error
		want error
	}{
		{"Get empty key", second(c.Get(ctx, "")), ErrInvalidKey},
		{"Get long key", second(c.Get(ctx, long)), ErrInvalidKey},
		{"Set empty key", c.Set(ctx, "", "v", 0), ErrInvalidKey},
		{"Set long key", c.Set(ctx, long, "v", 0), ErrInvalidKey},
		{"Set huge value", c.Set(ctx, "big", strings.Repeat("x", 100), 0), ErrValueTooLarge},
		{"Set negative ttl", c.Set(ctx, "neg", "v", -time.Second), ErrInvalidTTL},
		{"Delete empty key", c.Delete(ctx, ""), ErrInvalidKey},
		{"Exists empty key", errOf(c.Exists(ctx, "")), ErrInvalidKey},
		{"GetMany with empty key", errOf(c.GetMany(ctx, []string{"keep", ""})), ErrInvalidKey},
		{"SetMany with long key", c.SetMany(ctx, map[string]string{"ok": "v", long: "v"}, 0), ErrInvalidKey},
		{"DeleteMany with empty key", c.DeleteMany(ctx, "keep", ""), ErrInvalidKey},
		{"DeletePattern empty", errOf(c.DeletePattern(ctx, "")), ErrInvalidKey},
	}
	for _, tc := range cases {
		if !errors.Is(tc.err, tc.want) {
			t.Errorf("%s: err = %v, want %v", tc.name, tc.err, tc.want)
		}
	}
	// Nothing was lost or half-written.
	if v, ok, err := c.Get(ctx, "keep"); !ok || v != "safe" || err != nil {
		t.Fatalf("Get(keep) = %q, %v, %v after bad input; want safe", v, ok, err)
	}
	for _, k := range []string{"big", "neg", "ok"} {
		if ok, _ := c.Exists(ctx, k); ok {
			t.Errorf("Exists(%q) = true after a rejected write", k)
		}
	}

	// A cancelled context fails the call with the context's error.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, _, err := c.Get(cctx, "other"); !errors.Is(err, context.Canceled) {
		t.Errorf("Get(cancelled ctx) err = %v, want context.Canceled", err)
	}
	if err := c.Set(cctx, "other", "v", 0); !errors.Is(err, context.Canceled) {
		t.Errorf("Set(cancelled ctx) err = %v, want context.Canceled", err)
	}
	// An unencodable value is an error, not a panic.
	cf := newCache[func()](t, Options{})
	if err := cf.Set(ctx, "f", func() {}, 0); err == nil {
		t.Error("Set(func) succeeded; want an encode error")
	}

	// Bad options.
	for _, o := range []Options{{TTL: -1}, {TTLJitter: 0.9}, {Mode: 9}, {Schema: "a:b"}, {MaxKeyLen: 1 << 20}} {
		if _, err := New[string]("x", c.rdb, c.bus, o); err == nil {
			t.Errorf("New(%+v) succeeded; want an error", o)
		}
	}
	// Plain-JSON mode needs a prefix of its own: Clear deletes every key
	// under it (under the Bus's prefix, every namespace's keys and
	// generations), and has no room for lease keys.
	for _, o := range []Options{
		{PlainJSON: true},
		{PlainJSON: true, KeyPrefix: c.bus.Prefix()},
		{PlainJSON: true, KeyPrefix: invalidate.DefaultPrefix},
		{PlainJSON: true, KeyPrefix: c.bus.Prefix() + "node:", Lease: true},
	} {
		if pc, err := New[string](namespace(t), c.rdb, c.bus, o); err == nil || !strings.Contains(err.Error(), "PlainJSON") {
			if pc != nil {
				pc.Close()
			}
			t.Errorf("New(%+v) = %v; want an error about PlainJSON", o, err)
		}
	}
	if c.bus.Shards() == 0 { // PlainJSON needs classic pub/sub
		pc, err := New[string](namespace(t), c.rdb, c.bus, Options{PlainJSON: true, KeyPrefix: c.bus.Prefix() + "node:"})
		if err != nil {
			t.Errorf("New(PlainJSON with a prefix of its own): %v", err)
		} else {
			pc.Close()
		}
	}
	for _, name := range []string{"", "a:b", "a{b", strings.Repeat("n", 256), "\xff"} {
		if _, err := New[string](name, c.rdb, c.bus, Options{}); err == nil {
			t.Errorf("New(%q) succeeded; want an error", name)
		}
	}
	if _, err := New[string]("x", c.rdb, nil, Options{}); err == nil {
		t.Error("New(tiered, nil bus) succeeded")
	}
	first, err := New[string]("dup", c.rdb, c.bus, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	if _, err := New[string]("dup", c.rdb, c.bus, Options{}); !errors.Is(err, invalidate.ErrDuplicateNamespace) {
		t.Errorf("two caches of one namespace on one Bus: err = %v, want ErrDuplicateNamespace", err)
	}
}

// TestSetMany_SplitsByMessageSize: a batch is split by the size of its
// invalidation message as well as by its key count. 300 keys of 4,000
// bytes (MaxKeyLen raised to the wire's 4,096) make one message over
// invalidate.MaxMessageSize: before, SetMany failed, its keys went to the
// outbox, whose replay failed the same way for ever, and reads of them
// skipped Redis even after a successful Set. Every part's invalidation
// reaches the other instance (under a Secret: tagged messages are the
// longest), and the parts of the longest keys fit a message even in the
// longest namespace.
func TestSetMany_SplitsByMessageSize(t *testing.T) {
	// Heartbeats that a CPU-starved run (the race detector, other
	// packages' tests beside it) cannot miss: a stream declared dead drops
	// the messages this test counts, and the reset that voids L1 instead is
	// not what it is about.
	bo := invalidate.Options{Secret: []byte("0123456789abcdef-shared-secret"), HeartbeatInterval: time.Second, HeartbeatTimeout: time.Minute}
	f := newFleetBus[string](t, shared, 2, Options{MaxKeyLen: 4096}, bo)
	a, b := f[0].c, f[1].c
	ctx := ctxT(t)
	bApplied := applied(b)
	items, keys := longKeys()
	if err := a.SetMany(ctx, items, 0); err != nil {
		t.Fatalf("SetMany(300 valid keys of 4000 bytes) = %v; want nil", err)
	}
	parts := len(a.batches(a.nsGen.Load(), keys))
	if parts < 2 {
		t.Fatalf("300 keys of 4000 bytes go out in %d transaction; want them split by message size", parts)
	}
	awaitParts := func(what string) {
		t.Helper()
		for range parts {
			await(t, bApplied, what)
		}
	}
	awaitParts("B applying SetMany's invalidations")
	if err := a.Set(ctx, keys[0], "fresh", 0); err != nil {
		t.Fatalf("Set: %v", err)
	}
	await(t, bApplied, "B applying Set's invalidation")
	mustGet(t, a, keys[0], "fresh", "A after a successful Set")
	if got, err := b.GetMany(ctx, keys); err != nil || len(got) != 300 {
		t.Fatalf("B: GetMany = %d values, %v; want 300", len(got), err)
	}
	if err := a.DeleteMany(ctx, keys...); err != nil {
		t.Fatalf("DeleteMany(300 keys of 4000 bytes) = %v; want nil", err)
	}
	awaitParts("B applying DeleteMany's invalidations")
	if got, err := b.GetMany(ctx, keys); err != nil || len(got) != 0 {
		t.Fatalf("B after A's DeleteMany: GetMany = %d values, %v; want none", len(got), err)
	}

	longest := make([]string, 1000)
	for i := range longest {
		longest[i] = fmt.Sprintf("%04d", i) + strings.Repeat("k", invalidate.MaxKeyLen-4)
	}
	for _, part := range a.batches(0, longest) {
		ks := make([]string, len(part))
		for i, j := range part {
			ks[i] = longest[j]
		}
		if _, err := a.bus.KeysMessage(strings.Repeat("n", 255), ks); err != nil {
			t.Fatalf("a part of %d keys of %d bytes in a 255-byte namespace: %v", len(ks), invalidate.MaxKeyLen, err)
		}
	}
}

// TestDeletePattern_LongKeysFlush: when the matched keys' names would make
// one invalidation message pass invalidate.MaxMessageSize (300 keys of
// 4,000 bytes), DeletePattern invalidates with a namespace flush, as it
// does past 1,000 keys. Before, the message failed to encode: DeletePattern
// returned an error after deleting the keys, and the other instances kept
// serving them until the outbox's flush was replayed.
func TestDeletePattern_LongKeysFlush(t *testing.T) {
	f := newFleet[string](t, shared, 2, Options{MaxKeyLen: 4096})
	a, b := f[0].c, f[1].c
	ctx := ctxT(t)
	items, keys := longKeys()
	if err := a.SetMany(ctx, items, 0); err != nil {
		t.Fatal(err)
	}
	if got, err := b.GetMany(ctx, keys); err != nil || len(got) != 300 {
		t.Fatalf("B: GetMany = %d values, %v; want 300", len(got), err)
	}
	bApplied := applied(b)
	if n, err := a.DeletePattern(ctx, "*"); err != nil || n != 300 {
		t.Fatalf("DeletePattern(*) = %d, %v; want 300, nil", n, err)
	}
	await(t, bApplied, "B applying DeletePattern's flush")
	if got, err := b.GetMany(ctx, keys); err != nil || len(got) != 0 {
		t.Fatalf("B after A's DeletePattern: GetMany = %d values, %v; want none", len(got), err)
	}
	if n := a.bus.OutboxDepth(); n != 0 {
		t.Fatalf("outbox depth after DeletePattern = %d, want 0", n)
	}
}

// TestGetMany_ErrorBehindMiss: a key whose GET fails (a list stored where
// a value belongs: WRONGTYPE) fails GetMany wherever it stands in the
// batch. Before, a miss ahead of it in the pipeline hid the error (Exec
// returns the first command's error, and redis.Nil counted): GetMany
// returned no error and the failed key as a miss.
func TestGetMany_ErrorBehindMiss(t *testing.T) {
	for _, m := range []Mode{ModeRedis, ModeTiered} {
		t.Run(m.String(), func(t *testing.T) {
			f := newFleet[string](t, shared, 1, Options{Mode: m})
			c, rdb := f[0].c, f[0].rdb
			ctx := ctxT(t)
			if err := rdb.RPush(ctx, c.dataKey(c.nsGen.Load(), "bad"), "x").Err(); err != nil {
				t.Fatal(err)
			}
			if _, err := c.GetMany(ctx, []string{"bad", "absent"}); err == nil {
				t.Fatal("GetMany(bad, absent): no error")
			}
			errsBefore := c.Stats().Errors
			got, err := c.GetMany(ctx, []string{"absent", "bad"})
			if err == nil {
				t.Errorf("GetMany(absent, bad) = %v, nil; want the WRONGTYPE error as with (bad, absent) (errors %d -> %d)",
					got, errsBefore, c.Stats().Errors)
			}
			if n := c.Stats().Errors; n != errsBefore+1 {
				t.Errorf("Stats.Errors after the failed GetMany(absent, bad) = %d, want %d", n, errsBefore+1)
			}
			if _, _, err := c.Get(ctx, "bad"); err == nil {
				t.Error("Get(bad): no error")
			}
		})
	}
}

// TestStats_L2ErrorsAreReads: tiercache.requests{tier="l2",result="error"}
// counts reads Redis failed, one per key, and no writes. Before, it
// exported Stats.Errors, which counts failed writes too (and a failed
// GetMany once, however many keys it read).
func TestStats_L2ErrorsAreReads(t *testing.T) {
	f := newFleet[string](t, shared, 1, Options{})
	c, rdb := f[0].c, f[0].rdb
	ctx := ctxT(t)
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := c.Set(cctx, "k", "v", 0); err == nil {
		t.Fatal("Set with a cancelled ctx: no error")
	}
	if n := c.telemetry().L2Errors; n != 0 {
		t.Errorf("L2 read errors exported after one failed Set and no read = %d, want 0", n)
	}
	for _, k := range []string{"bad1", "bad2"} {
		if err := rdb.RPush(ctx, c.dataKey(c.nsGen.Load(), k), "x").Err(); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := c.Get(ctx, "bad1"); err == nil {
		t.Fatal("Get(bad1): no error")
	}
	if _, err := c.GetMany(ctx, []string{"bad1", "bad2"}); err == nil {
		t.Fatal("GetMany(bad1, bad2): no error")
	}
	if n := c.telemetry().L2Errors; n != 3 {
		t.Errorf("L2 read errors after a failed Get of one key and a failed GetMany of two = %d, want 3", n)
	}
	if n := c.Stats().Errors; n != 3 {
		t.Errorf("Stats.Errors after a failed Set, Get and GetMany = %d, want 3", n)
	}
}

// TestExists_ErrorCounted: an Exists that fails against Redis counts in
// Stats.Errors, as a failed Get does. Before, it was not counted.
func TestExists_ErrorCounted(t *testing.T) {
	f := newFleet[string](t, shared, 1, Options{Mode: ModeRedis})
	c, rdb := f[0].c, f[0].rdb
	ctx := ctxT(t)
	if err := rdb.RPush(ctx, c.dataKey(c.nsGen.Load(), "bad"), "x").Err(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.Get(ctx, "bad"); err == nil {
		t.Fatal("Get(bad): no error")
	}
	if n := c.Stats().Errors; n != 1 {
		t.Fatalf("Stats.Errors after a failed Get = %d, want 1", n)
	}
	if _, err := c.Exists(ctx, "bad"); err == nil {
		t.Fatal("Exists(bad): no error")
	}
	if n := c.Stats().Errors; n != 2 {
		t.Errorf("Stats.Errors after a failed Get and a failed Exists = %d, want 2", n)
	}
}

// TestStats_WritesCountDeletes: Stats.Writes counts keys written or
// deleted in every mode, and L1 refills and overwrites evict nothing.
// Before, ModeMemory's DeleteMany counted no writes. Stats.Keys is logged,
// not checked: in tiered mode the deleted entries stay in ristretto, voided,
// until refilled or evicted (as Stats says).
func TestStats_WritesCountDeletes(t *testing.T) {
	for _, m := range []Mode{ModeTiered, ModeMemory} {
		t.Run(m.String(), func(t *testing.T) {
			c := newCache[string](t, Options{Mode: m})
			ctx := ctxT(t)
			keys := make([]string, 100)
			items := map[string]string{}
			for i := range keys {
				keys[i] = "k" + strconv.Itoa(i)
				items[keys[i]] = "v"
			}
			for range 3 {
				if err := c.SetMany(ctx, items, 0); err != nil {
					t.Fatal(err)
				}
				if got, err := c.GetMany(ctx, keys); err != nil || len(got) != 100 {
					t.Fatalf("GetMany: %d, %v", len(got), err)
				}
			}
			if err := c.DeleteMany(ctx, keys[:50]...); err != nil {
				t.Fatal(err)
			}
			c.l1.Wait()
			st := c.Stats()
			t.Logf("%s: keys %d evictions %d writes %d", m, st.Keys, st.Evictions, st.Writes)
			if st.Writes != 350 {
				t.Errorf("%s: Writes = %d, want 350 (300 keys written, 50 deleted: \"keys written or deleted\")", m, st.Writes)
			}
			if st.Evictions != 0 {
				t.Errorf("%s: Evictions = %d, want 0 (nothing evicted for room)", m, st.Evictions)
			}
		})
	}
}

// TestNew_MemoryWithoutL1Refused: ModeMemory with a negative L1TTL ("negative
// disables L1") is a cache with no tier at all. Before, New accepted it,
// and every Set returned nil and stored nothing.
func TestNew_MemoryWithoutL1Refused(t *testing.T) {
	c, err := New[string](namespace(t), nil, nil, Options{Mode: ModeMemory, L1TTL: -1})
	if err == nil {
		defer c.Close()
		ctx := ctxT(t)
		_ = c.Set(ctx, "k", "v", 0)
		_, ok, _ := c.Get(ctx, "k")
		t.Fatalf("New(ModeMemory, L1TTL<0) accepted (Set, then Get found the value: %v); want an error", ok)
	}
	if !strings.Contains(err.Error(), "L1TTL") {
		t.Errorf("New(ModeMemory, L1TTL<0) = %v; want an error that names L1TTL", err)
	}
}

// TestExists_AgreesWithGet: Exists reports a value where Get finds one,
// from the envelope header alone. Before, it checked only the magic byte
// and the tombstone and negative flags, and said true for bytes Get reads
// as a miss: another codec's value, a newer envelope version's, an unknown
// flag; and after that, for a header Get reads as corrupt (write ID 0, a
// negative fresh-until), which it did not check at all.
func TestExists_AgreesWithGet(t *testing.T) {
	f := newFleet[string](t, shared, 1, Options{Mode: ModeRedis, CompressAbove: 8})
	c, rdb := f[0].c, f[0].rdb
	ctx := ctxT(t)
	payload, err := encode(c.opts.Codec, strings.Repeat("x", 40))
	if err != nil {
		t.Fatal(err)
	}
	valid, err := c.envelope(payload)
	if err != nil {
		t.Fatal(err)
	}
	if valid[3]&byte(wire.FlagCompressed) == 0 {
		t.Fatal("the valid value is not compressed; the test wants one")
	}
	with := func(i int, b byte) []byte {
		raw := bytes.Clone(valid)
		raw[i] = b
		return raw
	}
	cases := []struct {
		name string
		raw  []byte
	}{
		{"a value (compressed)", valid},
		{"another codec's value", with(2, codecMsgpack)},
		{"a newer envelope version", with(1, wire.Version+1)},
		{"an unknown flag", with(3, valid[3]|0x80)},
		{"a tombstone", tombstone()},
		{"write ID 0", append(append(bytes.Clone(valid[:4]), make([]byte, 8)...), valid[12:]...)},
		{"a negative fresh-until", with(12, 0x80)},
	}
	for i, tc := range cases {
		k := fmt.Sprint("k", i)
		if err := rdb.Set(ctx, c.dataKey(c.nsGen.Load(), k), tc.raw, time.Minute).Err(); err != nil {
			t.Fatal(err)
		}
		ex, exErr := c.Exists(ctx, k) // first: Get deletes what is corrupt
		_, ok, err := c.Get(ctx, k)
		if ok != ex || err != nil || exErr != nil {
			t.Errorf("%s: Get found=%v (%v) but Exists=%v (%v)", tc.name, ok, err, ex, exErr)
		}
	}
}

func second[V any](_ V, _ bool, err error) error { return err }
func errOf[T any](_ T, err error) error          { return err }

// TestCache_CorruptL2: undecodable bytes in Redis are a miss, get deleted and
// counted; never a panic or a wrong value. In plain-JSON mode they are left
// in place and never overwritten: the key is shared with the Node.js side,
// which may have written a value of another shape.
func TestCache_CorruptL2(t *testing.T) {
	for _, m := range modes {
		if m.opts.Mode == ModeMemory {
			continue
		}
		t.Run(m.name, func(t *testing.T) {
			c := newCache[user](t, m.opts)
			ctx := ctxT(t)
			garbage := [][]byte{
				{},
				[]byte("not json"),
				{0xFE, 1, c.opts.Codec.ID(), 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0xc1}, // undecodable payload in an envelope
				{0xFE, 1, 1, 0}, // a truncated header
				{0xFE, 1, 1, 0x80, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0, '{', '}'}, // an unknown flag
				{0xFE, 1, 0, 4, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0, 'x'},         // a tombstone with a payload
				[]byte(`{"id":"not a number"}`),
			}
			for i, g := range garbage {
				key := fmt.Sprintf("bad%d", i)
				dk := c.dataKey(c.nsGen.Load(), key)
				if err := c.rdb.Set(ctx, dk, g, time.Minute).Err(); err != nil {
					t.Fatal(err)
				}
				before := c.Stats().Corrupt
				v, ok, err := c.Get(ctx, key)
				if ok || err != nil {
					t.Fatalf("Get(%q) with %q = %+v, %v, %v; want a miss", key, g, v, ok, err)
				}
				if c.Stats().Corrupt != before+1 {
					t.Fatalf("Corrupt = %d, want %d", c.Stats().Corrupt, before+1)
				}
				got, err := c.GetMany(ctx, []string{key})
				if len(got) != 0 || err != nil {
					t.Fatalf("GetMany(corrupt) = %v, %v", got, err)
				}
				if !m.opts.PlainJSON {
					if n, _ := c.rdb.Exists(ctx, dk).Result(); n != 0 {
						t.Fatalf("corrupt key %q still in Redis", dk)
					}
					continue
				}
				load := func(context.Context, string) (user, error) { return user{ID: 7, Name: "loaded"}, nil }
				if v, err := c.Remember(ctx, key, load); err != nil || v.Name != "loaded" {
					t.Fatalf("Remember(%q) = %+v, %v; want the loader's value", key, v, err)
				}
				if now, err := c.rdb.Get(ctx, dk).Bytes(); err != nil || !bytes.Equal(now, g) {
					t.Fatalf("plain key %q holds %q, %v after Get and Remember; want the Node.js side's %q left alone", dk, now, err, g)
				}
			}
			if m.opts.PlainJSON {
				return
			}
			// Bytes another writer may legitimately have written (a newer
			// envelope version during a rollout, another codec) read as a
			// miss but are left in place.
			other := byte(2)
			if c.opts.Codec.ID() == 2 {
				other = 1
			}
			foreign := [][]byte{
				{0xFE, 2, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0, '{', '}'}, // envelope v2
				{0xFE, 1, other, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0x80}, // another codec
			}
			for i, g := range foreign {
				key := fmt.Sprintf("foreign%d", i)
				dk := c.dataKey(c.nsGen.Load(), key)
				_ = c.rdb.Set(ctx, dk, g, time.Minute).Err()
				if v, ok, err := c.Get(ctx, key); ok || err != nil {
					t.Fatalf("Get(%q) = %+v, %v, %v; want a miss", key, v, ok, err)
				}
				if n, _ := c.rdb.Exists(ctx, dk).Result(); n != 1 {
					t.Fatalf("foreign value %q was deleted; want it kept for its writer", g)
				}
			}
		})
	}
}

// TestCache_SharedValues documents that values are shared unless CopyOnRead.
func TestCache_SharedValues(t *testing.T) {
	ctx := ctxT(t)
	for _, copyOnRead := range []bool{false, true} {
		c := newCache[user](t, Options{CopyOnRead: copyOnRead})
		_ = c.Set(ctx, "u", user{Roles: []string{"a"}}, 0)
		v1, _, _ := c.Get(ctx, "u")
		v2, _, _ := c.Get(ctx, "u")
		v2.Roles[0] = "mutated"
		v3, _, _ := c.Get(ctx, "u")
		if copyOnRead && (v3.Roles[0] != "a" || v1.Roles[0] != "a") {
			t.Fatalf("CopyOnRead: a caller's mutation reached the cache: %v", v3.Roles)
		}
		if !copyOnRead && v3.Roles[0] != "mutated" {
			t.Fatalf("shared values: got %v; the test's premise (values are shared) is wrong", v3.Roles)
		}
	}
}

// TestCache_Close: Close is idempotent, safe concurrently, waits for
// in-flight calls, and later calls fail with ErrClosed.
func TestCache_Close(t *testing.T) {
	f := newFleet[string](t, shared, 2, Options{})
	c := f[0].c
	ctx := ctxT(t)
	_ = c.Set(ctx, "k", "v", 0)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; ; j++ {
				select {
				case <-stop:
					return
				default:
				}
				k := fmt.Sprintf("k%d", (i+j)%5)
				var err error
				switch j % 3 {
				case 0:
					err = c.Set(ctx, k, "v", 0)
				case 1:
					err = c.Delete(ctx, k)
				default:
					_, err = c.GetMany(ctx, []string{k, "k"})
				}
				if err != nil && !errors.Is(err, ErrClosed) {
					t.Errorf("op %d: %v", j%3, err)
					return
				}
			}
		}()
	}
	// Remote writes keep the handler busy during Close.
	for i := range 20 {
		_ = f[1].c.Set(ctx, fmt.Sprintf("k%d", i%5), "w", 0)
	}
	var cwg sync.WaitGroup
	for range 4 {
		cwg.Add(1)
		go func() { defer cwg.Done(); _ = c.Close() }()
	}
	cwg.Wait()
	close(stop)
	wg.Wait()
	if err := c.Close(); err != nil {
		t.Fatalf("second Close = %v", err)
	}
	if _, _, err := c.Get(ctx, "k"); !errors.Is(err, ErrClosed) {
		t.Fatalf("Get after Close err = %v, want ErrClosed", err)
	}
	if err := c.Set(ctx, "k", "v", 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("Set after Close err = %v, want ErrClosed", err)
	}
	if err := c.Ping(ctx); !errors.Is(err, ErrClosed) {
		t.Fatalf("Ping after Close err = %v, want ErrClosed", err)
	}
	// The namespace is free again on that Bus.
	c2, err := New[string](c.name, f[0].rdb, f[0].bus, Options{KeyPrefix: srv.Prefix()})
	if err != nil {
		t.Fatalf("New after Close: %v", err)
	}
	c2.Close()
}

func TestParseMode(t *testing.T) {
	for in, want := range map[string]Mode{"": ModeTiered, "redis": ModeTiered, "Memory": ModeMemory, " memory ": ModeMemory, "redis-only": ModeRedis} {
		if got, err := ParseMode(in); got != want || err != nil {
			t.Errorf("ParseMode(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	if _, err := ParseMode("disk"); err == nil {
		t.Error("ParseMode(disk) succeeded")
	}
}

// TestOpCtx: a round trip is bounded by CommandTimeout, unless the caller's
// deadline comes first, in which case the caller's ctx is used as it is.
func TestOpCtx(t *testing.T) {
	c := newCache[string](t, Options{CommandTimeout: time.Second})
	bg := context.Background()
	ctx, cancel := c.opCtx(bg)
	defer cancel()
	if d, ok := ctx.Deadline(); !ok || time.Until(d) > time.Second || time.Until(d) < 900*time.Millisecond {
		t.Fatalf("no deadline of its own: got %v, %v; want about 1 s from now", d, ok)
	}
	late, cancelLate := context.WithTimeout(bg, time.Minute)
	defer cancelLate()
	ctx, cancel = c.opCtx(late)
	defer cancel()
	if d, _ := ctx.Deadline(); time.Until(d) > time.Second {
		t.Fatalf("a later caller deadline: the bound is %v away; want at most 1 s", time.Until(d))
	}
	soon, cancelSoon := context.WithTimeout(bg, 100*time.Millisecond)
	defer cancelSoon()
	if ctx, cancel := c.opCtx(soon); ctx != soon {
		cancel()
		t.Fatal("a caller deadline sooner than CommandTimeout: opCtx made a new context; want the caller's")
	}
	off := newCache[string](t, Options{CommandTimeout: -1})
	if ctx, _ := off.opCtx(bg); ctx != bg {
		t.Fatal("CommandTimeout < 0: opCtx bounded the call anyway")
	}
}

// TestCache_DeletePatternGlob: DeletePattern matches the user's pattern
// against the user's keys alone. A namespace (or prefix, or schema) holding
// glob characters is matched literally: before, "gx?"'s pattern deleted
// "gxb"'s keys, and "g[v2]"'s deleted nothing of its own. A malformed
// pattern is refused: before, "a[" and "a\" deleted the key "a". On a
// sharded Bus a lease key cannot be a user's data key any more, nor be
// matched by a pattern.
// TestNew_BraceInKeyPrefixOnShardedBus: Redis hashes the first {...} of a
// key, so a brace in the prefix would take over every key's hash tag, and
// on a cluster each write's transaction (the key and its shard channel)
// would fail with CROSSSLOT. New refuses it.
func TestNew_BraceInKeyPrefixOnShardedBus(t *testing.T) {
	bus := newBus(t, standalone{srv}, srv.Client(t), invalidate.Options{ShardChannels: 4})
	for _, p := range []string{"app{x}:", "app}:", "app{:"} {
		if _, err := New[string](namespace(t), srv.Client(t), bus, Options{KeyPrefix: p}); err == nil {
			t.Errorf("New with KeyPrefix %q on a sharded Bus: nil error; want a refusal", p)
		}
	}
	c, err := New[string](namespace(t), srv.Client(t), bus, Options{KeyPrefix: "app:"})
	if err != nil {
		t.Fatalf("New with KeyPrefix app: on a sharded Bus: %v", err)
	}
	c.Close()
}

func TestCache_DeletePatternGlob(t *testing.T) {
	ctx := ctxT(t)
	t.Run("namespaces with glob characters", func(t *testing.T) {
		rdb := shared.Client(t)
		bus := newBus(t, shared, rdb, invalidate.Options{})
		suffix := namespace(t)
		open := func(ns string) *Cache[string] {
			c, err := New[string](ns, rdb, bus, Options{KeyPrefix: shared.Prefix()})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			if err := c.Set(ctx, "k", ns, 0); err != nil {
				t.Fatal(err)
			}
			return c
		}
		q, b := open("gx?"+suffix), open("gxb"+suffix)
		br := open("g[v2]" + suffix)
		if n, err := q.DeletePattern(ctx, "*"); err != nil || n != 1 {
			t.Fatalf("DeletePattern(*) on %q = %d, %v; want its own 1 key", q.name, n, err)
		}
		if v, ok, err := b.Get(ctx, "k"); !ok || err != nil || v != b.name {
			t.Fatalf("%q lost its key to %q's DeletePattern: %q, %v, %v", b.name, q.name, v, ok, err)
		}
		if n, err := br.DeletePattern(ctx, "*"); err != nil || n != 1 {
			t.Fatalf("DeletePattern(*) on %q = %d, %v; want its own 1 key", br.name, n, err)
		}
	})
	t.Run("malformed patterns", func(t *testing.T) {
		c := newCache[string](t, Options{})
		if err := c.Set(ctx, "a", "v", 0); err != nil {
			t.Fatal(err)
		}
		for _, p := range []string{"a[", `a\`, "*[^", "[a-"} {
			if n, err := c.DeletePattern(ctx, p); !errors.Is(err, ErrInvalidKey) {
				t.Errorf("DeletePattern(%q) = %d, %v; want ErrInvalidKey", p, n, err)
			}
		}
		if v, ok, err := c.Get(ctx, "a"); !ok || err != nil || v != "v" {
			t.Fatalf("a malformed pattern deleted the key: %q, %v, %v", v, ok, err)
		}
		for _, p := range []string{`a\[`, "[ab]", "[^b]", `[\]]`, "a?", "a*"} {
			if _, err := c.DeletePattern(ctx, p); err != nil {
				t.Errorf("DeletePattern(%q): %v", p, err)
			}
		}
	})
	t.Run("lease keys on a sharded Bus", func(t *testing.T) {
		in := newFleetBus[string](t, shared, 1, Options{Lease: true, LoadTimeout: time.Second}, invalidate.Options{ShardChannels: 4})[0]
		c := in.c
		// A key whose "<key>:lease" falls in its shard: under the old
		// layout its lease key was that user key's data key.
		key := ""
		for i := 0; key == ""; i++ {
			if k := fmt.Sprint("user", i); c.shard(k) == c.shard(k+":lease") {
				key = k
			}
		}
		if err := c.Set(ctx, key+":lease", "a user's value", time.Hour); err != nil {
			t.Fatal(err)
		}
		load := func(context.Context, string) (string, error) { return "loaded", nil }
		if v, err := c.Remember(ctx, key, load); err != nil || v != "loaded" {
			t.Fatalf("Remember(%q) with a user key %q stored = %q, %v", key, key+":lease", v, err)
		}
		// A held lease is no key a pattern deletes.
		lk := c.leaseKey(c.nsGen.Load(), "held")
		if err := in.rdb.Set(ctx, lk, "token", time.Minute).Err(); err != nil {
			t.Fatal(err)
		}
		if _, err := c.DeletePattern(ctx, "*"); err != nil {
			t.Fatal(err)
		}
		if n, _ := in.rdb.Exists(ctx, lk).Result(); n != 1 {
			t.Fatal("DeletePattern(*) deleted a held lease")
		}
	})
}

// TestRememberMany_ErrorReplyIsNotAMiss: a key whose read Redis answers
// with an error (WRONGTYPE: another program's value of another type) goes
// to the loader, is counted as an L2 error, its loaded value is not
// stored, and the other program's value is left alone. Before, RememberMany
// counted it as a miss, and told the breaker of a success.
func TestRememberMany_ErrorReplyIsNotAMiss(t *testing.T) {
	f := newFleet[string](t, shared, 1, Options{})
	c, rdb := f[0].c, f[0].rdb
	ctx := ctxT(t)
	bad := c.dataKey(c.nsGen.Load(), "bad")
	if err := rdb.RPush(ctx, bad, "x").Err(); err != nil {
		t.Fatal(err)
	}
	errsBefore := c.st.l2Errors.Load()
	got, err := c.RememberMany(ctx, []string{"absent", "bad"}, func(_ context.Context, keys []string) (map[string]string, error) {
		out := make(map[string]string, len(keys))
		for _, k := range keys {
			out[k] = "loaded-" + k
		}
		return out, nil
	})
	if err != nil || got["absent"] != "loaded-absent" || got["bad"] != "loaded-bad" {
		t.Fatalf("RememberMany = %v, %v; want both keys from the loader", got, err)
	}
	if n := c.st.l2Errors.Load() - errsBefore; n != 1 {
		t.Errorf("L2 read errors counted: %d, want 1", n)
	}
	if typ := rdb.Type(ctx, bad).Val(); typ != "list" {
		t.Errorf("the other program's value under %q is now a %s; want the list left alone", bad, typ)
	}
}

// longKeys is 300 keys of 4,000 bytes (whose names alone take 1.2 MB in
// one message), each with the value "v".
func longKeys() (map[string]string, []string) {
	items := make(map[string]string, 300)
	keys := make([]string, 0, 300)
	for i := range 300 {
		k := fmt.Sprintf("%04d", i) + strings.Repeat("k", 3996)
		items[k] = "v"
		keys = append(keys, k)
	}
	return items, keys
}
