package tiered

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"os/exec"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
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
//
// The 1,000 keys nearly all have a slot of their own in the hot index
// (hot.go), so most hits are served from it. The "100B-64Ki-keys" case reads
// 65,536 keys in turn through the default index of 8,192 slots: eight keys
// per slot, so nearly every hit finds another key's hash in the slot and
// takes the path through ristretto. It is the worst case for the index: the
// cost of looking there first and missing. (Both sides' keys then outgrow
// the CPU caches, which is why both take several times longer per hit.)
func BenchmarkL1HitPaired(b *testing.B) {
	keys := benchKeys("item:")
	proc := newBenchProc(b)
	b.Run("100B-64Ki-keys", func(b *testing.B) {
		wide := make([]string, 1<<16)
		for i := range wide {
			wide[i] = fmt.Sprintf("wide:%05d", i)
		}
		v, enc := makeBenchValue(b, 100)
		bare := newBareRistretto(b, wide, &v, int64(len(enc)))
		c, err := New[*benchValue](namespace(b), proc.rdb, proc.bus, Options{TTL: benchOpts.TTL, L1TTL: benchOpts.L1TTL, KeyPrefix: srv.Prefix()})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { c.Close() })
		preload(b, c, wide, &v)
		warmL1(b, c, wide)
		if n := len(c.hot.slots); n*8 != len(wide) {
			b.Fatalf("hot index has %d slots; this case wants 8 keys per slot", n)
		}
		bareRun := func(n, start int) {
			j := start
			for range n {
				if _, ok := bare.Get(wide[j]); !ok {
					panic("bare ristretto: miss")
				}
				if j++; j == len(wide) {
					j = 0
				}
			}
		}
		for _, mode := range []string{"serial", "parallel"} {
			workers := 1
			if mode == "parallel" {
				workers = runtime.GOMAXPROCS(0)
			}
			b.Run(mode+"/V=pointer", func(b *testing.B) {
				pairedL1(b, c, wide, workers, bareRun)
			})
		}
	})
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
	t := turns(n, pairedChunk, workers, a, b)
	return t[0], t[1]
}

// turns runs n operations of every side in chunks of chunk operations,
// the sides taking turns in an order drawn afresh each round (fixed seed),
// so that no side always follows the same other one and inherits its
// after-effects, and returns each side's total time.
func turns(n, chunk, workers int, sides ...func(n, start int)) []time.Duration {
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
	total := make([]time.Duration, len(sides))
	order := rand.New(rand.NewPCG(1, 2))
	for done := 0; done < n; {
		ops := min(chunk, n-done)
		for _, k := range order.Perm(len(sides)) {
			total[k] += timed(sides[k], ops)
		}
		done += ops
	}
	return total
}

// roundTripChunk is the paired chunk for benchmarks of one Redis round trip
// per operation (tens of µs here): a few ms per turn.
const roundTripChunk = 64

// BenchmarkL2HitPaired is BenchmarkL2Hit with the two sides taking turns
// (see BenchmarkL1HitPaired): a Get answered by Redis (ModeRedis, no L1)
// against go-redis GET plus json.Unmarshal of the same bytes.
func BenchmarkL2HitPaired(b *testing.B) {
	ctx := context.Background()
	rdb := srv.Client(b)
	proc := newBenchProc(b)
	redisOnly := benchOpts
	redisOnly.Mode = ModeRedis
	for _, s := range sizesAll {
		v, enc := makeBenchValue(b, s.n)
		bareKeys := benchKeys(srv.Prefix() + "bare-l2p:" + s.name + ":")
		preloadBare(b, rdb, bareKeys, enc)
		keys := benchKeys("l2p:")
		c := proc.cache(b, "", redisOnly)
		preload(b, c, keys, v)
		b.Run(s.name, func(b *testing.B) {
			ours := roundTrips(keys, func(key string) error {
				if _, ok, err := c.Get(ctx, key); !ok || err != nil {
					return fmt.Errorf("tiercache: Get(%q) = %v, %v", key, ok, err)
				}
				return nil
			})
			bare := roundTrips(bareKeys, func(key string) error {
				raw, err := rdb.Get(ctx, key).Bytes()
				if err != nil {
					return err
				}
				var v benchValue
				return json.Unmarshal(raw, &v)
			})
			t := turns(b.N, roundTripChunk, 1, ours, bare)
			b.ReportMetric(float64(t[0].Nanoseconds())/float64(b.N), "ns/op")
			b.ReportMetric(float64(t[1].Nanoseconds())/float64(b.N), "bare-ns/op")
			b.ReportMetric(float64(t[0])/float64(t[1]), "ratio")
		})
	}
}

// BenchmarkSetPaired is BenchmarkSet with its sides taking turns (see
// BenchmarkL1HitPaired): Set against a bare SET of the pre-encoded bytes,
// and the bare transaction Set sends (MULTI SET PUBLISH EXEC, pre-encoded,
// to the Bus's channel), whose delivery to this process's own Bus is part of
// the protocol's cost; the same transaction publishing to a channel nobody
// subscribes to shows how much (tx-nosub-ratio against tx-ratio).
//
// The target compares Set with the SET of bytes encoded beforehand. What a
// user would write instead encodes too: json.Marshal then SET, the fifth
// side, which ratio-to-marshal-set reports against (for information; the
// target's ratio is "ratio").
func BenchmarkSetPaired(b *testing.B) {
	ctx := context.Background()
	rdb := srv.Client(b)
	proc := newBenchProc(b)
	busChannel := proc.bus.Channel()
	msg, err := proc.bus.KeysMessage("bench", []string{"set:0000"})
	if err != nil {
		b.Fatal(err)
	}
	for _, s := range sizesSmall {
		v, enc := makeBenchValue(b, s.n)
		bareKeys := benchKeys(srv.Prefix() + "bare-setp:" + s.name + ":")
		c := proc.cache(b, "", benchOpts)
		keys := benchKeys("setp:")
		b.Run(s.name, func(b *testing.B) {
			ours := roundTrips(keys, func(key string) error { return c.Set(ctx, key, v, time.Hour) })
			set := roundTrips(bareKeys, func(key string) error { return rdb.Set(ctx, key, enc, time.Hour).Err() })
			txTo := func(channel string) func(n, start int) {
				return roundTrips(bareKeys, func(key string) error {
					_, err := rdb.TxPipelined(ctx, func(p redis.Pipeliner) error {
						p.Set(ctx, key, enc, time.Hour)
						p.Publish(ctx, channel, msg)
						return nil
					})
					return err
				})
			}
			marshalSet := roundTrips(bareKeys, func(key string) error {
				raw, err := json.Marshal(v)
				if err != nil {
					return err
				}
				return rdb.Set(ctx, key, raw, time.Hour).Err()
			})
			t := turns(b.N, roundTripChunk, 1, ours, set, txTo(busChannel), txTo(busChannel+":nobody"), marshalSet)
			b.ReportMetric(float64(t[0].Nanoseconds())/float64(b.N), "ns/op")
			b.ReportMetric(float64(t[1].Nanoseconds())/float64(b.N), "set-ns/op")
			b.ReportMetric(float64(t[2].Nanoseconds())/float64(b.N), "tx-ns/op")
			b.ReportMetric(float64(t[0])/float64(t[1]), "ratio")
			b.ReportMetric(float64(t[0])/float64(t[2]), "ratio-to-tx")
			b.ReportMetric(float64(t[2])/float64(t[1]), "tx-ratio")
			b.ReportMetric(float64(t[3])/float64(t[1]), "tx-nosub-ratio")
			b.ReportMetric(float64(t[0])/float64(t[4]), "ratio-to-marshal-set")
		})
	}
}

// BenchmarkFanoutPaired shows what delivering an invalidation costs the
// writer, in the pairing of BenchmarkSetPaired: a bare SET against the bare
// MULTI SET PUBLISH EXEC publishing to a channel nobody subscribes to
// (nosub-ratio), to this process's own Bus (self-ratio), and to a
// redis-cli in another process (ext-ratio).
func BenchmarkFanoutPaired(b *testing.B) {
	cli, err := exec.LookPath("redis-cli")
	if err != nil {
		b.Skip("redis-cli is not installed")
	}
	ctx := context.Background()
	rdb := srv.Client(b)
	proc := newBenchProc(b)
	own := proc.bus.Channel()
	ext := own + ":ext"
	host, port, err := net.SplitHostPort(srv.Addr())
	if err != nil {
		b.Fatal(err)
	}
	sub := exec.Command(cli, "-h", host, "-p", port, "subscribe", ext)
	if err := sub.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = sub.Process.Kill(); _ = sub.Wait() })
	for {
		n, err := rdb.PubSubNumSub(ctx, ext).Result()
		if err != nil {
			b.Fatal(err)
		}
		if n[ext] == 1 {
			break
		}
		time.Sleep(5 * time.Millisecond) // polling for another process's SUBSCRIBE: no signal to wait for
	}
	msg, err := proc.bus.KeysMessage("bench", []string{"set:0000"})
	if err != nil {
		b.Fatal(err)
	}
	_, enc := makeBenchValue(b, 100)
	keys := benchKeys(srv.Prefix() + "bare-fanout:")
	set := roundTrips(keys, func(key string) error { return rdb.Set(ctx, key, enc, time.Hour).Err() })
	txTo := func(channel string) func(n, start int) {
		return roundTrips(keys, func(key string) error {
			_, err := rdb.TxPipelined(ctx, func(p redis.Pipeliner) error {
				p.Set(ctx, key, enc, time.Hour)
				p.Publish(ctx, channel, msg)
				return nil
			})
			return err
		})
	}
	t := turns(b.N, roundTripChunk, 1, set, txTo(own+":nobody"), txTo(own), txTo(ext))
	b.ReportMetric(float64(t[0].Nanoseconds())/float64(b.N), "set-ns/op")
	b.ReportMetric(float64(t[1])/float64(t[0]), "nosub-ratio")
	b.ReportMetric(float64(t[2])/float64(t[0]), "self-ratio")
	b.ReportMetric(float64(t[3])/float64(t[0]), "ext-ratio")
}

// roundTrips returns a side for turns that applies op to keys in order,
// from the start-th on, wrapping around. A failing op panics: turns runs
// sides off the benchmark's goroutine. The call through op costs nothing
// next to a round trip; the L1 loops, where it would, are written out.
func roundTrips(keys []string, op func(key string) error) func(n, start int) {
	return func(n, start int) {
		j := start % len(keys)
		for range n {
			if err := op(keys[j]); err != nil {
				panic(err)
			}
			if j++; j == len(keys) {
				j = 0
			}
		}
	}
}
