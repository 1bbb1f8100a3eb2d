package tiered

import (
	"sync"
	"sync/atomic"
	"time"
)

// clockTick is the resolution of the cache's coarse clock. Every L1 expiry
// is shortened by one tick, so a coarse reading (which lags real time by up
// to a tick) never lets an entry outlive its TTL.
const clockTick = 5 * time.Millisecond

// coarseClock is a wall clock read with one atomic load. On virtual machines
// time.Now can cost more than the whole rest of an L1 hit (it was 40% of the
// hit here), so L1 entries carry their own expiry, checked against this
// clock, and ristretto is given no TTL at all.
type coarseClock struct {
	now       *atomic.Int64 // unix ns, owned by the reader (see Cache.now)
	stop      chan struct{}
	done      chan struct{}
	closeOnce sync.Once
}

// startClock starts the goroutine that advances the clock; stop ends it.
func startClock(now *atomic.Int64) *coarseClock {
	k := &coarseClock{now: now, stop: make(chan struct{}), done: make(chan struct{})}
	k.now.Store(time.Now().UnixNano())
	go func() {
		defer close(k.done)
		t := time.NewTicker(clockTick)
		defer t.Stop()
		for {
			select {
			case <-k.stop:
				return
			case <-t.C:
				k.now.Store(time.Now().UnixNano())
			}
		}
	}()
	return k
}

// stop ends the clock's goroutine and waits for it. Idempotent.
func (k *coarseClock) stopClock() {
	k.closeOnce.Do(func() {
		close(k.stop)
		<-k.done
	})
}

// expiry returns the coarse-clock deadline for an entry that may live ttl
// from now.
func expiry(ttl time.Duration) int64 {
	return time.Now().UnixNano() + int64(ttl-clockTick)
}
