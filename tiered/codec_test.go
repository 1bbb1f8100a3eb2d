package tiered

import (
	"bytes"
	"fmt"
	"runtime"
	"testing"
	"time"
)

// TestMsgpack_DeclaredLengthsBounded: a few corrupt bytes whose header
// declares a huge array, map, string or binary are refused before anything
// is allocated for them. Before, msgpack.Unmarshal made room for all of it
// first: 5 bytes declaring 2^22 int64s took 32 MiB, a map32 header
// gigabytes, and 0xdd ff ff ff ff (2^32 elements) more memory than the
// process could get.
func TestMsgpack_DeclaredLengthsBounded(t *testing.T) {
	cases := []struct {
		name string
		data []byte
		into func() any
	}{
		{"array32 of 2^22 into []int64", []byte{0xdd, 0x00, 0x40, 0x00, 0x00}, func() any { return new([]int64) }},
		{"array32 of 2^22 into any", []byte{0xdd, 0x00, 0x40, 0x00, 0x00}, func() any { return new(any) }},
		{"map32 of 2^20 into map[string]int", []byte{0xdf, 0x00, 0x10, 0x00, 0x00}, func() any { return new(map[string]int) }},
		{"bin32 of 2^24 into []byte", []byte{0xc6, 0x01, 0x00, 0x00, 0x00}, func() any { return new([]byte) }},
		{"str32 of 2^24 into string", []byte{0xdb, 0x01, 0x00, 0x00, 0x00}, func() any { return new(string) }},
		{"array16 in an array", []byte{0x91, 0xdc, 0xff, 0xff}, func() any { return new([][]int64) }},
		{"a value, then the never-used code", []byte{0x01, 0xc1}, func() any { return new(int) }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			v := tc.into()
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			err := Msgpack.Unmarshal(tc.data, v)
			runtime.ReadMemStats(&after)
			if err == nil {
				t.Errorf("Unmarshal(%x) = nil; want an error", tc.data)
			}
			if n := after.TotalAlloc - before.TotalAlloc; n > 1<<20 {
				t.Errorf("Unmarshal(%x) allocated %d bytes; want under 1 MiB", tc.data, n)
			}
		})
	}

	// What the codec writes still reads back.
	in := map[string][]int64{"a": {1, 2, 3}, "b": nil}
	b, err := Msgpack.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	var out map[string][]int64
	if err := Msgpack.Unmarshal(b, &out); err != nil || fmt.Sprint(out) != fmt.Sprint(in) {
		t.Fatalf("Unmarshal(Marshal(%v)) = %v, %v", in, out, err)
	}
}

// TestMsgpack_DepthBounded: msgpack.Unmarshal recurses once per nesting
// level, so bytes nesting one-element arrays a megabyte deep would take a
// million frames (and with a larger MaxValueSize, the goroutine's stack
// limit, which kills the process). Past msgpackMaxDepth they are refused.
func TestMsgpack_DepthBounded(t *testing.T) {
	nested := func(depth int) []byte {
		b := bytes.Repeat([]byte{0x91}, depth) // fixarray of one element
		return append(b, 0x01)
	}
	var v any
	if err := Msgpack.Unmarshal(nested(msgpackMaxDepth), &v); err != nil {
		t.Fatalf("%d levels: %v; want them decoded", msgpackMaxDepth, err)
	}
	for _, depth := range []int{msgpackMaxDepth + 1, 1 << 20} {
		var v any
		if err := Msgpack.Unmarshal(nested(depth), &v); err == nil {
			t.Errorf("%d levels decoded; want them refused", depth)
		}
	}
	// Depth is per value: siblings do not add up.
	wide := []byte{0x92}
	wide = append(wide, nested(msgpackMaxDepth-1)...)
	wide = append(wide, nested(msgpackMaxDepth-1)...)
	var w any
	if err := Msgpack.Unmarshal(wide, &w); err != nil {
		t.Errorf("two siblings %d deep: %v; want them decoded", msgpackMaxDepth, err)
	}
}

// TestCache_CorruptMsgpackDeclaresHugeArray: such bytes in Redis are a
// miss, counted as corrupt and deleted, like any other corrupt value.
func TestCache_CorruptMsgpackDeclaresHugeArray(t *testing.T) {
	c := newCache[[]int64](t, Options{Codec: Msgpack})
	ctx := ctxT(t)
	raw := []byte{0xFE, 1, codecMsgpack, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0xdd, 0x00, 0x40, 0x00, 0x00}
	dk := c.dataKey(c.nsGen.Load(), "bomb")
	if err := c.rdb.Set(ctx, dk, raw, time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	corrupt := c.Stats().Corrupt
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	v, ok, err := c.Get(ctx, "bomb")
	runtime.ReadMemStats(&after)
	if ok || err != nil {
		t.Fatalf("Get(bomb) = %v, %v, %v; want a miss", len(v), ok, err)
	}
	if n := after.TotalAlloc - before.TotalAlloc; n > 8<<20 {
		t.Errorf("Get(bomb) allocated %d bytes for %d bytes in Redis", n, len(raw))
	}
	if got := c.Stats().Corrupt; got != corrupt+1 {
		t.Errorf("Corrupt = %d, want %d", got, corrupt+1)
	}
	if n, _ := c.rdb.Exists(ctx, dk).Result(); n != 0 {
		t.Errorf("corrupt key %q still in Redis", dk)
	}
}
