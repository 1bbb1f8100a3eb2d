package tiered

import (
	"context"
	"testing"
)

// BenchmarkRememberL1Hit: Remember answered by L1 against Get answered by
// L1, same cache, same keys, same run (issue: Remember on a hit must cost no
// more than Get).
func BenchmarkRememberL1Hit(b *testing.B) {
	keys := benchKeys("item:")
	proc := newBenchProc(b)
	v, _ := makeBenchValue(b, 1024)
	c := proc.cache(b, "", benchOpts)
	preload(b, c, keys, v)
	warmL1(b, c, keys)
	ctx := context.Background()
	load := func(context.Context, string) (benchValue, error) {
		b.Fatal("the loader ran: not an L1 hit")
		return benchValue{}, nil
	}
	b.Run("Get", func(b *testing.B) {
		b.ReportAllocs()
		j := 0
		for b.Loop() {
			if _, ok, err := c.Get(ctx, keys[j]); !ok || err != nil {
				b.Fatal("miss", err)
			}
			if j++; j == len(keys) {
				j = 0
			}
		}
	})
	b.Run("Remember", func(b *testing.B) {
		b.ReportAllocs()
		j := 0
		for b.Loop() {
			if _, err := c.Remember(ctx, keys[j], load); err != nil {
				b.Fatal(err)
			}
			if j++; j == len(keys) {
				j = 0
			}
		}
	})
}
