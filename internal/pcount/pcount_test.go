package pcount

import (
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// incFrom increments c each times from each of goroutines goroutines at
// once, yielding now and then so that they move between Ps mid-run, and
// returns when all are done.
func incFrom(c Counter, goroutines, each int) {
	var wg sync.WaitGroup
	for range goroutines {
		wg.Go(func() {
			for i := range each {
				c.Inc()
				if i%500 == 0 {
					runtime.Gosched()
				}
			}
		})
	}
	wg.Wait()
}

// TestExact increments from many goroutines at once, several per P, and
// expects every increment counted: a lost update would show as a shortfall.
func TestExact(t *testing.T) {
	c := New()
	const goroutines, each = 16, 50_000
	incFrom(c, goroutines, each)
	if got := c.Load(); got != goroutines*each {
		t.Fatalf("Load = %d, want %d", got, goroutines*each)
	}
}

// TestMoreProcsThanCells runs increments on Ps without a cell of their own,
// which take the shared atomic spill cell; none may be lost. The counter is
// built with a cell for P 0 only, and GOMAXPROCS raised, so every increment
// on any other P spills; rounds run until one has (the scheduler decides
// where goroutines run), with a hard deadline.
func TestMoreProcsThanCells(t *testing.T) {
	c := Counter{cells: make([]cell, 2)} // P 0's cell, then the spill cell
	prev := runtime.GOMAXPROCS(max(4, runtime.NumCPU()*2))
	defer runtime.GOMAXPROCS(prev)

	const goroutines, each = 32, 5_000
	var total uint64
	deadline := time.Now().Add(5 * time.Second)
	for atomic.LoadUint64(&c.cells[1].n) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no increment ran on a P other than 0 in 5 s: the spill cell was not exercised")
		}
		incFrom(c, goroutines, each)
		total += goroutines * each
		if got := c.Load(); got != total {
			t.Fatalf("Load = %d, want %d", got, total)
		}
	}
}

// TestConcurrentLoad reads while others write: every Load lies between the
// increments finished before it began and all of them (and never falls).
func TestConcurrentLoad(t *testing.T) {
	c := New()
	const total = 200_000
	var done atomic.Bool
	var wg sync.WaitGroup
	wg.Go(func() {
		var last uint64
		for !done.Load() {
			n := c.Load()
			if n < last || n > total {
				t.Errorf("Load = %d after %d (total %d)", n, last, total)
				return
			}
			last = n
		}
	})
	var w sync.WaitGroup
	for range 4 {
		w.Go(func() {
			for range total / 4 {
				c.Inc()
			}
		})
	}
	w.Wait()
	done.Store(true)
	wg.Wait()
	if got := c.Load(); got != total {
		t.Fatalf("Load = %d, want %d", got, total)
	}
}

// TestIncSamples checks what callers use Inc's result for: every k-th
// increment on a P returns a multiple of k. From several goroutines, each
// cell contributes the multiples its count passed, so the total is within
// one per cell of n/k, and each goroutine sees its cell's count grow.
func TestIncSamples(t *testing.T) {
	c := New()
	const k, goroutines, each = 8, 8, 40_000
	var samples atomic.Uint64
	var wg sync.WaitGroup
	for range goroutines {
		wg.Go(func() {
			for i := range each {
				if n := c.Inc(); n == 0 {
					t.Error("Inc returned 0 after adding one")
					return
				} else if n%k == 0 {
					samples.Add(1)
				}
				if i%1000 == 0 {
					runtime.Gosched()
				}
			}
		})
	}
	wg.Wait()
	n := uint64(goroutines * each)
	if got, lo := samples.Load(), n/k-uint64(len(c.cells)); got > n/k || got < lo {
		t.Fatalf("%d of %d increments returned a multiple of %d; want %d..%d", got, n, k, lo, n/k)
	}
}

func TestIncAllocatesNothing(t *testing.T) {
	c := New()
	if n := testing.AllocsPerRun(1000, func() { c.Inc() }); n != 0 {
		t.Fatalf("Inc allocates %.1f times", n)
	}
}

// BenchmarkInc compares the per-P counter with the two alternatives it
// replaced: one shared atomic, and 64 padded atomics chosen by key hash.
func BenchmarkInc(b *testing.B) {
	b.Run("pcount", func(b *testing.B) {
		c := New()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				c.Inc()
			}
		})
	})
	b.Run("shared-atomic", func(b *testing.B) {
		var n atomic.Uint64
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				n.Add(1)
			}
		})
	})
	b.Run("striped-by-key", func(b *testing.B) {
		var s [64]struct {
			n atomic.Uint64
			_ [56]byte
		}
		var seq atomic.Uint64
		b.RunParallel(func(pb *testing.PB) {
			h := seq.Add(1) * 0x9e3779b97f4a7c15
			for pb.Next() {
				h = h*6364136223846793005 + 1442695040888963407 // a key hash per op
				s[h>>58].n.Add(1)
			}
		})
	})
}
