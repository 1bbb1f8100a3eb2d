package tiered

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// nodeVector is JSON.stringify's output (Node.js 20) for the value below,
// produced with:
//
//	node -e 'process.stdout.write(JSON.stringify({id:42,name:"Ada <ada@example.com> & co",
//	  tags:["a","b"],score:1.5,big:1e21,small:1e-7,uni:"é✓",nested:{ok:true,none:null}}))'
const nodeVector = `{"id":42,"name":"Ada <ada@example.com> & co","tags":["a","b"],"score":1.5,"big":1e+21,"small":1e-7,"uni":"é✓","nested":{"ok":true,"none":null}}`

type nodeValue struct {
	ID     int      `json:"id"`
	Name   string   `json:"name"`
	Tags   []string `json:"tags"`
	Score  float64  `json:"score"`
	Big    float64  `json:"big"`
	Small  float64  `json:"small"`
	Uni    string   `json:"uni"`
	Nested struct {
		OK   bool  `json:"ok"`
		None *bool `json:"none"`
	} `json:"nested"`
}

// TestPlainJSON_SharesL2WithNode: in plain-JSON mode the cache stores the
// exact bytes a Node.js service's JSON.stringify stores, at exactly
// KeyPrefix+key, and reads what that service wrote.
func TestPlainJSON_SharesL2WithNode(t *testing.T) {
	prefix := srv.Prefix() + "node:"
	c := newCache[nodeValue](t, Options{PlainJSON: true, KeyPrefix: prefix})
	ctx := ctxT(t)
	v := nodeValue{ID: 42, Name: "Ada <ada@example.com> & co", Tags: []string{"a", "b"}, Score: 1.5, Big: 1e21, Small: 1e-7, Uni: "é✓"}
	v.Nested.OK = true
	if err := c.Set(ctx, "user:42", v, time.Minute); err != nil {
		t.Fatal(err)
	}
	raw, err := c.rdb.Get(ctx, prefix+"user:42").Result()
	if err != nil {
		t.Fatalf("GET %q: %v", prefix+"user:42", err)
	}
	if raw != nodeVector {
		t.Fatalf("stored bytes differ from JSON.stringify:\n got %s\nwant %s", raw, nodeVector)
	}
	// What the Node.js service wrote, read by the cache.
	if err := c.rdb.Set(ctx, prefix+"user:7", `{"id":7,"name":"from node","tags":[],"score":0,"big":0,"small":0,"uni":"","nested":{"ok":false,"none":null}}`, time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	got, ok, err := c.Get(ctx, "user:7")
	if err != nil || !ok || got.ID != 7 || got.Name != "from node" {
		t.Fatalf("Get(node-written) = %+v, %v, %v", got, ok, err)
	}
}

// TestPlainJSON_ReadOverMaxValueSize: a plain-JSON value over MaxValueSize
// (the Node.js side's) is a miss counted as corrupt, as in envelope mode,
// and like any plain value this cache will not read, it is never deleted
// or overwritten. Before, it was decoded and returned, and kept in L1 at
// its full size.
func TestPlainJSON_ReadOverMaxValueSize(t *testing.T) {
	f := newFleet[string](t, shared, 1, Options{PlainJSON: true, MaxValueSize: 64})
	c, rdb := f[0].c, f[0].rdb
	ctx := ctxT(t)
	// Plain keys carry no namespace: this test's own, removed after it.
	k := "big-" + c.name
	big := `"` + strings.Repeat("x", 1000) + `"`
	if err := rdb.Set(ctx, c.dataKey(0, k), big, time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rdb.Del(context.Background(), c.dataKey(0, k)) })
	if err := c.Set(ctx, k+"-2", strings.Repeat("x", 1000), 0); !errors.Is(err, ErrValueTooLarge) {
		t.Fatalf("Set of a 1002-byte value with MaxValueSize 64: %v; want ErrValueTooLarge", err)
	}
	if v, ok, err := c.Get(ctx, k); ok || err != nil {
		t.Errorf("Get of a 1002-byte plain-JSON value with MaxValueSize 64 = %d bytes, %v, %v; want a miss (corrupt), as in envelope mode",
			len(v), ok, err)
	}
	if got, err := c.GetMany(ctx, []string{k}); len(got) != 0 || err != nil {
		t.Errorf("GetMany = %d values, %v; want a miss", len(got), err)
	}
	if n := c.Stats().Corrupt; n != 2 {
		t.Errorf("Corrupt = %d after a Get and a GetMany of it, want 2", n)
	}
	load := func(context.Context, string) (string, error) { return "loaded", nil }
	if v, err := c.Remember(ctx, k, load); err != nil || v != "loaded" {
		t.Errorf("Remember = %q, %v; want the loader's value", v, err)
	}
	if now, err := rdb.Get(ctx, c.dataKey(0, k)).Result(); err != nil || now != big {
		t.Errorf("the plain key holds %d bytes, %v after Get and Remember; want the Node.js side's %d left alone", len(now), err, len(big))
	}
}

// TestJSONCodec_PooledEncoder: the JSON codec reuses encoders, so a failed
// encode must not leak into the next one, results must not share a buffer,
// and concurrent encodes must not see each other's bytes. Output is what
// JSON.stringify writes (no HTML escaping, no trailing newline).
func TestJSONCodec_PooledEncoder(t *testing.T) {
	if _, err := JSON.Marshal(map[string]any{"f": func() {}}); err == nil {
		t.Fatal("Marshal of a func: no error")
	}
	first, err := JSON.Marshal(map[string]string{"a": "<b>&"})
	if err != nil {
		t.Fatal(err)
	}
	second, err := JSON.Marshal(map[string]string{"z": "y"})
	if err != nil {
		t.Fatal(err)
	}
	if string(first) != `{"a":"<b>&"}` || string(second) != `{"z":"y"}` {
		t.Fatalf("Marshal = %s, %s; want {\"a\":\"<b>&\"}, {\"z\":\"y\"} (the first must not change when the encoder is reused)", first, second)
	}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 300 {
				got, err := JSON.Marshal(user{ID: g*1000 + i, Name: strings.Repeat("x", i%50)})
				want := fmt.Sprintf(`{"id":%d,"name":%q,"roles":null}`, g*1000+i, strings.Repeat("x", i%50))
				if err != nil || string(got) != want {
					t.Errorf("Marshal = %s, %v; want %s", got, err, want)
					return
				}
			}
		})
	}
	wg.Wait()
}

// TestPlainJSON_AbsenceStaysOutOfRedis: plain JSON has no form for absence,
// so a key the loader says is absent is remembered in L1 alone: no negative
// entry, no tombstone under the key a Node.js service reads (before, both
// were written as envelope bytes, which are not JSON).
func TestPlainJSON_AbsenceStaysOutOfRedis(t *testing.T) {
	absent := func(t *testing.T, c *Cache[string], rdb redis.UniversalClient, key string) {
		t.Helper()
		n, err := rdb.Exists(ctxT(t), c.dataKey(0, key)).Result()
		if err != nil || n != 0 {
			raw, _ := rdb.Get(ctxT(t), c.dataKey(0, key)).Bytes()
			t.Fatalf("Redis holds %q under the plain key %q (%v); want nothing", raw, c.dataKey(0, key), err)
		}
	}
	t.Run("NegativeTTL", func(t *testing.T) {
		in := newFleet[string](t, shared, 1, Options{PlainJSON: true, NegativeTTL: time.Minute})[0]
		ctx := ctxT(t)
		src, many := newSource(), newSource()
		var calls [][]string
		for range 3 {
			if _, err := in.c.Remember(ctx, "gone", src.load); !errors.Is(err, ErrNotFound) {
				t.Fatalf("Remember = %v, want ErrNotFound", err)
			}
			if got, err := in.c.RememberMany(ctx, []string{"gone-too"}, many.batch(&calls, new(sync.Mutex))); err != nil || len(got) != 0 {
				t.Fatalf("RememberMany = %v, %v", got, err)
			}
		}
		absent(t, in.c, in.rdb, "gone")
		absent(t, in.c, in.rdb, "gone-too")
		if n := src.loads.Load(); n != 1 || len(calls) != 1 {
			t.Errorf("3 reads of an absent key loaded %d times (Remember) and %d (RememberMany); want 1 each: absence kept in L1", n, len(calls))
		}
	})
	t.Run("refresh finds the key gone", func(t *testing.T) {
		in := newFleet[string](t, shared, 1, Options{PlainJSON: true, FreshFor: 50 * time.Millisecond, NegativeTTL: -1})[0]
		ctx := ctxT(t)
		src := newSource()
		h := hashKey("k")
		// A refresh of a value L1 kept alone: it has a write ID of its own.
		if r, err := in.c.readThrough(ctx, "k", in.c.snap(h), src.load, writeID()); err != nil || !r.negative {
			t.Fatalf("readThrough = %+v, %v; want absent", r, err)
		}
		if _, err := in.c.readThroughMany(ctx, []string{"m"}, map[string]snapshot{"m": in.c.snap(hashKey("m"))},
			src.batch(new([][]string), new(sync.Mutex)), map[string]uint64{"m": writeID()}); err != nil {
			t.Fatal(err)
		}
		absent(t, in.c, in.rdb, "k")
		absent(t, in.c, in.rdb, "m")
	})
}

// TestPlainJSON_DeletePatternMatchesOverlongKey: a key under the prefix
// longer than an invalidation message can carry (invalidate.MaxKeyLen; the
// Node.js side's keys have no limit) makes DeletePattern invalidate with a
// namespace flush, as it does for too many keys. Before, the keys message
// was refused as malformed after the keys were deleted: DeletePattern
// returned an error, no instance heard of the delete, and the outbox kept a
// namespace flush, whose replay in this mode deletes every key under the
// prefix.
func TestPlainJSON_DeletePatternMatchesOverlongKey(t *testing.T) {
	prefix := shared.Prefix() + "plain-overlong:"
	f := newFleet[string](t, shared, 2, Options{PlainJSON: true, KeyPrefix: prefix})
	a, b := f[0].c, f[1].c
	rdb := f[0].rdb
	ctx := ctxT(t)
	long := "long:" + strings.Repeat("k", 5000)
	for k, v := range map[string]string{long: `"node"`, "long:short": `"s"`, "other": `"keep"`} {
		if err := rdb.Set(ctx, prefix+k, v, time.Minute).Err(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { rdb.Del(context.Background(), prefix+k) })
	}
	if v, ok, err := b.Get(ctx, "long:short"); !ok || err != nil {
		t.Fatalf("B: Get(long:short) = %q, %v, %v", v, ok, err)
	}
	bApplied := applied(b)
	if n, err := a.DeletePattern(ctx, "long:*"); n != 2 || err != nil {
		t.Fatalf("DeletePattern(long:*) = %d, %v; want 2, nil", n, err)
	}
	if n := a.bus.OutboxDepth(); n != 0 {
		t.Errorf("outbox depth after DeletePattern = %d, want 0 (a pending flush deletes the whole prefix)", n)
	}
	await(t, bApplied, "B applying DeletePattern's invalidation")
	if v, ok, err := b.Get(ctx, "long:short"); ok || err != nil {
		t.Errorf("B after DeletePattern: Get(long:short) = %q, %v, %v; want a miss", v, ok, err)
	}
	if v, _ := rdb.Get(ctx, prefix+"other").Result(); v != `"keep"` {
		t.Errorf("other key = %q after DeletePattern(long:*); want it kept", v)
	}
}
