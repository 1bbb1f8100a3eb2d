package tiered

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"testing"
	"time"
)

// BenchmarkL1HitPaired measures the L1 hit against a bare ristretto Get the
// way BenchmarkL1Hit cannot on a noisy VM: the two sides take turns in
// chunks of pairedChunk hits inside one benchmark, the first side
// alternating from chunk to chunk, so that a change in the machine's speed
// (a neighbour, the clock, the other vCPU's work) lands on both alike. Each
// side's time is summed over its chunks. It reports ns/op for tiercache,
// bare-ns/op, and ratio = tiercache / bare.
//
// The bare side is BenchmarkL1Hit's: ristretto keyed by string, holding a
// *benchValue. Two shapes of tiercache run against it:
//
//   - V=pointer: Cache[*benchValue], the same V as the bare cache; a hit
//     returns the pointer.
//   - V=struct: Cache[benchValue]; a hit returns a copy of the 64-byte
//     struct, which the bare side never makes.
//
// Loops run on 1 goroutine ("serial") or GOMAXPROCS goroutines
// ("parallel", which split each chunk).
func BenchmarkL1HitPaired(b *testing.B) {
	keys := benchKeys("item:")
	proc := newBenchProc(b)
	for _, s := range sizesAll {
		v, enc := makeBenchValue(b, s.n)
		bare := newBareRistretto(b, keys, &v, int64(len(enc)))
		bareRun := func(n, start int) {
			j := start
			for range n {
				if _, ok := bare.Get(keys[j]); !ok {
					panic("bare ristretto: miss")
				}
				if j++; j == len(keys) {
					j = 0
				}
			}
		}
		byValue := proc.cache(b, "", benchOpts)
		preload(b, byValue, keys, v)
		warmL1(b, byValue, keys)
		byPointer, err := New[*benchValue](namespace(b), proc.rdb, proc.bus, Options{TTL: benchOpts.TTL, L1TTL: benchOpts.L1TTL, KeyPrefix: srv.Prefix()})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { byPointer.Close() })
		preload(b, byPointer, keys, &v)
		warmL1(b, byPointer, keys)

		for _, mode := range []string{"serial", "parallel"} {
			workers := 1
			if mode == "parallel" {
				workers = runtime.GOMAXPROCS(0)
			}
			b.Run(s.name+"/"+mode+"/V=pointer", func(b *testing.B) {
				pairedL1(b, byPointer, keys, workers, bareRun)
			})
			b.Run(s.name+"/"+mode+"/V=struct", func(b *testing.B) {
				pairedL1(b, byValue, keys, workers, bareRun)
			})
		}
	}
}

func pairedL1[V any](b *testing.B, c *Cache[V], keys []string, workers int, bareRun func(n, start int)) {
	check := l1Only(b, c)
	ctx := context.Background()
	oursRun := func(n, start int) {
		j := start
		for range n {
			if _, ok, err := c.Get(ctx, keys[j]); !ok || err != nil {
				panic(fmt.Sprint("tiercache: miss ", err))
			}
			if j++; j == len(keys) {
				j = 0
			}
		}
	}
	tOurs, tBare := pairedRun(b.N, workers, oursRun, bareRun)
	check()
	b.ReportMetric(float64(tOurs.Nanoseconds())/float64(b.N), "ns/op")
	b.ReportMetric(float64(tBare.Nanoseconds())/float64(b.N), "bare-ns/op")
	b.ReportMetric(float64(tOurs)/float64(tBare), "ratio")
}

// pairedChunk is large enough that a chunk's first pass over the 1,000 keys
// (cold after the other side's chunk) is a small part of it.
const pairedChunk = 1 << 16

// pairedRun runs n operations of each side in alternating chunks and
// returns each side's total time. Within a chunk, workers goroutines split
// the operations, each starting at its own key.
func pairedRun(n, workers int, a, b func(n, start int)) (ta, tb time.Duration) {
	timed := func(f func(n, start int), ops int) time.Duration {
		start := time.Now()
		if workers == 1 {
			f(ops, nextStart())
			return time.Since(start)
		}
		var wg sync.WaitGroup
		for w := range workers {
			share := ops / workers
			if w < ops%workers {
				share++
			}
			at := nextStart()
			wg.Go(func() { f(share, at) })
		}
		wg.Wait()
		return time.Since(start)
	}
	for done, round := 0, 0; done < n; round++ {
		ops := min(pairedChunk, n-done)
		if round%2 == 0 {
			ta += timed(a, ops)
			tb += timed(b, ops)
		} else {
			tb += timed(b, ops)
			ta += timed(a, ops)
		}
		done += ops
	}
	return ta, tb
}
