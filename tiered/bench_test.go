package tiered

// Benchmarks of the cache's paths, each measured beside the bare dependency
// it wraps, in the same run, so that the ratio ours/bare means something on a
// noisy machine. docs/benchmarks.md has the command, the results and the
// targets.
//
//	BenchmarkL1Hit       tiercache Get of an L1-resident key vs ristretto Get
//	BenchmarkL2Hit       tiercache Get without L1 vs go-redis GET + json.Unmarshal
//	BenchmarkSet         tiercache Set vs go-redis SET (and SET then PUBLISH)
//	BenchmarkPropagation Set on one instance until another applied it (p50/p99)
//	                     vs a go-redis PUBLISH until a go-redis subscriber has it
//	BenchmarkGetMany     100 keys, L1 warm and cold, vs a pipelined GET + decode

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dgraph-io/ristretto/v2"
	"github.com/redis/go-redis/v9"

	"github.com/tiercache/tiercache/invalidate"
)

// benchValue is the cached type: a small struct whose JSON encoding is
// padded by Body to the size under test.
type benchValue struct {
	ID   int64    `json:"id"`
	Name string   `json:"name"`
	Tags []string `json:"tags"`
	Body string   `json:"body"`
}

type benchSize struct {
	name string
	n    int // exact length of the value's JSON encoding
}

var (
	sizesAll   = []benchSize{{"100B", 100}, {"1KiB", 1 << 10}, {"16KiB", 16 << 10}}
	sizesSmall = sizesAll[:2]
)

// benchKeyCount is how many distinct keys each benchmark cycles through.
const benchKeyCount = 1000

// Benchmarks keep values long-lived so that no TTL (L1 one minute by
// default) expires in the middle of a run.
var benchOpts = Options{TTL: 2 * time.Hour, L1TTL: time.Hour}

// benchWords make Body text-like: compressible about as well as real JSON.
var benchWords = strings.Fields(`alpha bravo charlie delta echo foxtrot golf
hotel india juliet kilo lima mike november oscar papa quebec romeo sierra
tango uniform victor whiskey xray yankee zulu account order invoice customer
shipment status pending active archived total amount currency region`)

// makeBenchValue returns a value whose JSON encoding is exactly size bytes,
// and that encoding.
func makeBenchValue(tb testing.TB, size int) (benchValue, []byte) {
	tb.Helper()
	v := benchValue{ID: 4242, Name: "benchmark value", Tags: []string{"bench", "tiered"}}
	empty, err := json.Marshal(v)
	if err != nil {
		tb.Fatal(err)
	}
	n := size - len(empty)
	if n < 0 {
		tb.Fatalf("size %d below the %d-byte minimum", size, len(empty))
	}
	r := rand.New(rand.NewPCG(uint64(size), 7))
	var sb strings.Builder
	for sb.Len() < n {
		sb.WriteString(benchWords[r.IntN(len(benchWords))])
		if r.IntN(5) == 0 {
			fmt.Fprintf(&sb, " %d", r.IntN(100000))
		}
		sb.WriteByte(' ')
	}
	v.Body = sb.String()[:n]
	enc, err := json.Marshal(v)
	if err != nil {
		tb.Fatal(err)
	}
	if len(enc) != size {
		tb.Fatalf("encoded %d bytes, want %d", len(enc), size)
	}
	return v, enc
}

func benchKeys(prefix string) []string {
	keys := make([]string, benchKeyCount)
	for i := range keys {
		keys[i] = fmt.Sprintf("%s%04d", prefix, i)
	}
	return keys
}

// benchHeartbeat is the Bus heartbeat of the benchmarks' instances. The
// default (ping after 250 ms idle, dead after 1 s of silence) flapped
// intermittently on the 2-vCPU benchmark VM at load average 10+ while the
// CPU-bound L1 loops ran: every flap moves the Bus epoch and voids all of
// L1, and the loop then measures 1,000 Redis reads instead of L1 hits. The
// hit path does the same work whatever the timeout (one atomic load of the
// epoch), so the benchmarks use a calmer heartbeat and fail if the Bus still
// reconnects.
var benchHeartbeat = invalidate.Options{HeartbeatInterval: time.Second, HeartbeatTimeout: 10 * time.Second}

// benchProc is one simulated process: a client and one Bus, shared by all
// its caches as in production (so a benchmark's PUBLISHes reach exactly one
// Bus subscriber per process, as the bare set-then-publish's reach one).
type benchProc struct {
	rdb *redis.Client
	bus *invalidate.Bus
}

func newBenchProc(b *testing.B) *benchProc {
	b.Helper()
	rdb := srv.Client(b)
	bo := benchHeartbeat
	bo.Prefix = srv.Prefix()
	bus, err := invalidate.New(rdb, bo)
	if err != nil {
		b.Fatalf("invalidate.New: %v", err)
	}
	b.Cleanup(func() {
		if st := bus.Stats(); st.Reconnects != 0 || !st.Live {
			b.Errorf("the Bus lost its stream during the benchmark (%d reconnects, live %v): numbers polluted", st.Reconnects, st.Live)
		}
		bus.Close()
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := bus.WaitLive(ctx); err != nil {
		b.Fatalf("bus.WaitLive: %v", err)
	}
	return &benchProc{rdb: rdb, bus: bus}
}

// cache opens namespace ns (a fresh one if "") in this process.
func (p *benchProc) cache(b *testing.B, ns string, opts Options) *Cache[benchValue] {
	b.Helper()
	if ns == "" {
		ns = namespace(b)
	}
	opts.KeyPrefix = srv.Prefix()
	c, err := New[benchValue](ns, p.rdb, p.bus, opts)
	if err != nil {
		b.Fatalf("New: %v", err)
	}
	b.Cleanup(func() { c.Close() })
	return c
}

// preload stores v under every key through the cache: one MULTI/EXEC.
func preload[V any](tb testing.TB, c *Cache[V], keys []string, v V) {
	tb.Helper()
	items := make(map[string]V, len(keys))
	for _, k := range keys {
		items[k] = v
	}
	if err := c.SetMany(context.Background(), items, 0); err != nil {
		tb.Fatalf("SetMany: %v", err)
	}
}

// preloadBare stores enc under every key with plain SETs in one pipeline.
func preloadBare(tb testing.TB, rdb *redis.Client, keys []string, enc []byte) {
	tb.Helper()
	pipe := rdb.Pipeline()
	for _, k := range keys {
		pipe.Set(context.Background(), k, enc, time.Hour)
	}
	if _, err := pipe.Exec(context.Background()); err != nil {
		tb.Fatalf("preload: %v", err)
	}
}

// warmL1 reads every key once so that it fills L1, and checks that L1 now
// holds a valid entry for each.
func warmL1[V any](tb testing.TB, c *Cache[V], keys []string) {
	tb.Helper()
	ctx := context.Background()
	for _, k := range keys {
		for attempt := 0; ; attempt++ {
			if _, ok, err := c.Get(ctx, k); !ok || err != nil {
				tb.Fatalf("warm Get(%q) = %v, %v", k, ok, err)
			}
			h := hashKey(k)
			if e, in := c.l1.Get(h); in && c.valid(e, h, k) {
				break
			}
			if attempt == 10 {
				tb.Fatalf("key %q does not stay in L1", k)
			}
		}
	}
}

// l1Only fails the benchmark if any read of the timed loop left L1: the
// numbers would then not be those of the L1 hit path.
func l1Only[V any](b *testing.B, c *Cache[V]) func() {
	l2, miss := c.st.l2Hits.Load()+c.st.l2Misses.Load(), c.st.l1Misses.Load()
	return func() {
		b.Helper()
		if d := c.st.l2Hits.Load() + c.st.l2Misses.Load() - l2; d != 0 {
			b.Fatalf("%d reads missed L1 during the loop", d)
		}
		if d := c.st.l1Misses.Load() - miss; d != 0 {
			b.Fatalf("%d reads L1 could not answer during the loop (absent, expired or fenced off)", d)
		}
	}
}

// newBareRistretto returns a ristretto cache configured the usual way,
// holding v under every key without a TTL: what a user would write.
//
// Both bare caches hold a pointer, as L1 does (*entry[V]). Held by value,
// the 64-byte struct makes every bare Get copy it twice (out of the map, and
// out of Get): about 2x the time of a pointer Get on the benchmark VM, which
// turned both baselines slower than tiercache and measured the copy, not
// our overhead.
func newBareRistretto(b *testing.B, keys []string, v *benchValue, cost int64) *ristretto.Cache[string, *benchValue] {
	b.Helper()
	rc, err := ristretto.NewCache(&ristretto.Config[string, *benchValue]{NumCounters: 1e6, MaxCost: 64 << 20, BufferItems: 64})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(rc.Close)
	for _, k := range keys {
		for !rc.Set(k, v, cost) { // dropped only when the set buffer is full
			runtime.Gosched()
		}
	}
	rc.Wait()
	for _, k := range keys {
		if _, ok := rc.Get(k); !ok {
			b.Fatalf("ristretto lost %q after Wait", k)
		}
	}
	return rc
}

// newBareRistrettoU64 is the strictest baseline: ristretto keyed by a
// precomputed uint64, so it hashes nothing at all, where we hash the key
// once (and bare-ristretto with string keys hashes it twice).
func newBareRistrettoU64(b *testing.B, hashes []uint64, v *benchValue, cost int64) *ristretto.Cache[uint64, *benchValue] {
	b.Helper()
	rc, err := ristretto.NewCache(&ristretto.Config[uint64, *benchValue]{NumCounters: 1e6, MaxCost: 64 << 20, BufferItems: 64})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(rc.Close)
	for _, h := range hashes {
		for !rc.Set(h, v, cost) {
			runtime.Gosched()
		}
	}
	rc.Wait()
	return rc
}

func bareU64Serial(b *testing.B, rc *ristretto.Cache[uint64, *benchValue], hashes []uint64) {
	b.ReportAllocs()
	j := 0
	for b.Loop() {
		if _, ok := rc.Get(hashes[j]); !ok {
			b.Fatal("miss")
		}
		if j++; j == len(hashes) {
			j = 0
		}
	}
}

func bareU64Parallel(b *testing.B, rc *ristretto.Cache[uint64, *benchValue], hashes []uint64) {
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		j := nextStart()
		for pb.Next() {
			if _, ok := rc.Get(hashes[j]); !ok {
				panic("miss")
			}
			if j++; j == len(hashes) {
				j = 0
			}
		}
	})
}

// startOffset spreads RunParallel goroutines over the key set.
var startOffset atomic.Uint64

func nextStart() int { return int(startOffset.Add(389) % benchKeyCount) }

// The benchmarks below run bare and ours back to back for each case (the
// sub-benchmark names carry the impl first, as in "L1Hit/tiercache/1KiB/
// serial", but the order of execution is case by case), so that a change in
// the machine's load between the two halves of a ratio stays short. Note
// that -count N repeats each sub-benchmark N times in a row; for strictly
// paired samples run the binary N times with -count 1 (docs/benchmarks.md).

// BenchmarkL1Hit compares a Get answered by L1 with a Get on a bare
// ristretto cache holding the same value under the same keys, and with the
// strictest baseline, bare ristretto keyed by a precomputed uint64.
func BenchmarkL1Hit(b *testing.B) {
	keys := benchKeys("item:")
	proc := newBenchProc(b)
	for _, s := range sizesAll {
		v, enc := makeBenchValue(b, s.n)
		bare := newBareRistretto(b, keys, &v, int64(len(enc)))
		hashes := make([]uint64, len(keys))
		for i, k := range keys {
			hashes[i] = hashKey(k)
		}
		bareU64 := newBareRistrettoU64(b, hashes, &v, int64(len(enc)))
		ours := proc.cache(b, "", benchOpts)
		preload(b, ours, keys, v)
		warmL1(b, ours, keys)
		for _, mode := range []string{"serial", "parallel"} {
			bareLoop, u64Loop, oursLoop := bareL1Serial, bareU64Serial, oursL1Serial
			if mode == "parallel" {
				bareLoop, u64Loop, oursLoop = bareL1Parallel, bareU64Parallel, oursL1Parallel
			}
			b.Run("bare-ristretto/"+s.name+"/"+mode, func(b *testing.B) { bareLoop(b, bare, keys) })
			b.Run("tiercache/"+s.name+"/"+mode, func(b *testing.B) { oursLoop(b, ours, keys) })
			b.Run("bare-ristretto-uint64/"+s.name+"/"+mode, func(b *testing.B) { u64Loop(b, bareU64, hashes) })
		}
	}
}

// The four loops are written out rather than sharing a func-valued getter,
// whose indirect call would add the same few ns to both sides and pull the
// ratio towards 1.

func bareL1Serial(b *testing.B, rc *ristretto.Cache[string, *benchValue], keys []string) {
	b.ReportAllocs()
	j := 0
	for b.Loop() {
		if _, ok := rc.Get(keys[j]); !ok {
			b.Fatal("miss")
		}
		if j++; j == len(keys) {
			j = 0
		}
	}
}

func bareL1Parallel(b *testing.B, rc *ristretto.Cache[string, *benchValue], keys []string) {
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		j := nextStart()
		for pb.Next() {
			if _, ok := rc.Get(keys[j]); !ok {
				panic("miss")
			}
			if j++; j == len(keys) {
				j = 0
			}
		}
	})
}

func oursL1Serial(b *testing.B, c *Cache[benchValue], keys []string) {
	b.ReportAllocs()
	ctx := context.Background()
	check := l1Only(b, c)
	j := 0
	for b.Loop() {
		if _, ok, err := c.Get(ctx, keys[j]); !ok || err != nil {
			b.Fatal("miss", err)
		}
		if j++; j == len(keys) {
			j = 0
		}
	}
	check()
}

func oursL1Parallel(b *testing.B, c *Cache[benchValue], keys []string) {
	b.ReportAllocs()
	ctx := context.Background()
	check := l1Only(b, c)
	b.RunParallel(func(pb *testing.PB) {
		j := nextStart()
		for pb.Next() {
			if _, ok, err := c.Get(ctx, keys[j]); !ok || err != nil {
				panic(fmt.Sprint("miss ", err))
			}
			if j++; j == len(keys) {
				j = 0
			}
		}
	})
	check()
}

// BenchmarkL2Hit compares a Get answered by Redis (ModeRedis: no L1) with a
// go-redis GET of the plain JSON bytes followed by json.Unmarshal.
func BenchmarkL2Hit(b *testing.B) {
	ctx := context.Background()
	rdb := srv.Client(b)
	proc := newBenchProc(b)
	redisOnly := benchOpts
	redisOnly.Mode = ModeRedis
	// Default options compress values over 1 KiB; the nocompress variant
	// isolates what compression costs (or saves) at 16 KiB.
	noCompress := redisOnly
	noCompress.CompressAbove = -1

	bare := func(b *testing.B, keys []string) {
		b.ReportAllocs()
		j := 0
		for b.Loop() {
			raw, err := rdb.Get(ctx, keys[j]).Bytes()
			if err != nil {
				b.Fatal(err)
			}
			var v benchValue
			if err := json.Unmarshal(raw, &v); err != nil {
				b.Fatal(err)
			}
			if j++; j == len(keys) {
				j = 0
			}
		}
	}
	ours := func(b *testing.B, c *Cache[benchValue], keys []string) {
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
	}
	for _, s := range sizesAll {
		v, enc := makeBenchValue(b, s.n)
		bareKeys := benchKeys(srv.Prefix() + "bare-l2:" + s.name + ":")
		preloadBare(b, rdb, bareKeys, enc)
		keys := benchKeys("l2:")
		c := proc.cache(b, "", redisOnly)
		preload(b, c, keys, v)
		b.Run("bare-goredis-get+decode/"+s.name, func(b *testing.B) { bare(b, bareKeys) })
		b.Run("tiercache/"+s.name, func(b *testing.B) { ours(b, c, keys) })
		if s.n > DefaultCompressAbove {
			nc := proc.cache(b, "", noCompress)
			preload(b, nc, keys, v)
			b.Run("tiercache-nocompress/"+s.name, func(b *testing.B) { ours(b, nc, keys) })
		}
	}
}

// BenchmarkSet compares Set with a go-redis SET of the pre-encoded JSON, and
// with the hand-rolled alternative to Set's single MULTI/EXEC: SET, then
// PUBLISH an invalidation (two round trips).
func BenchmarkSet(b *testing.B) {
	ctx := context.Background()
	rdb := srv.Client(b)
	proc := newBenchProc(b)
	// Like the Bus, one subscriber receives every invalidation published.
	channel := srv.Prefix() + "bench-invalidations"
	ps := srv.Client(b).Subscribe(ctx, channel)
	b.Cleanup(func() { _ = ps.Close() })
	if _, err := ps.Receive(ctx); err != nil {
		b.Fatal(err)
	}
	msgs := ps.Channel()
	go func() {
		for range msgs {
		}
	}()

	for _, s := range sizesSmall {
		v, enc := makeBenchValue(b, s.n)
		bareKeys := benchKeys(srv.Prefix() + "bare-set:" + s.name + ":")
		c := proc.cache(b, "", benchOpts)
		keys := benchKeys("set:")
		b.Run("bare-goredis-set/"+s.name, func(b *testing.B) {
			b.ReportAllocs()
			j := 0
			for b.Loop() {
				if err := rdb.Set(ctx, bareKeys[j], enc, time.Hour).Err(); err != nil {
					b.Fatal(err)
				}
				if j++; j == len(bareKeys) {
					j = 0
				}
			}
		})
		b.Run("bare-set-then-publish/"+s.name, func(b *testing.B) {
			b.ReportAllocs()
			j := 0
			for b.Loop() {
				if err := rdb.Set(ctx, bareKeys[j], enc, time.Hour).Err(); err != nil {
					b.Fatal(err)
				}
				if err := rdb.Publish(ctx, channel, bareKeys[j]).Err(); err != nil {
					b.Fatal(err)
				}
				if j++; j == len(bareKeys) {
					j = 0
				}
			}
		})
		// The transaction tiercache sends, with bytes encoded beforehand:
		// what the protocol costs, without the library around it.
		busChannel := proc.bus.Channel()
		msg, err := proc.bus.KeysMessage("bench", []string{"set:0000"})
		if err != nil {
			b.Fatal(err)
		}
		b.Run("bare-multi-set-publish/"+s.name, func(b *testing.B) {
			b.ReportAllocs()
			j := 0
			for b.Loop() {
				_, err := rdb.TxPipelined(ctx, func(p redis.Pipeliner) error {
					p.Set(ctx, bareKeys[j], enc, time.Hour)
					p.Publish(ctx, busChannel, msg)
					return nil
				})
				if err != nil {
					b.Fatal(err)
				}
				if j++; j == len(bareKeys) {
					j = 0
				}
			}
		})
		// The same transaction publishing to a channel nobody subscribes
		// to: what the PUBLISH costs without its delivery to this process's
		// own Bus (the echo every instance receives of its own writes).
		b.Run("bare-multi-set-publish-nosub/"+s.name, func(b *testing.B) {
			b.ReportAllocs()
			j := 0
			for b.Loop() {
				_, err := rdb.TxPipelined(ctx, func(p redis.Pipeliner) error {
					p.Set(ctx, bareKeys[j], enc, time.Hour)
					p.Publish(ctx, busChannel+":nobody", msg)
					return nil
				})
				if err != nil {
					b.Fatal(err)
				}
				if j++; j == len(bareKeys) {
					j = 0
				}
			}
		})
		b.Run("tiercache/"+s.name, func(b *testing.B) {
			b.ReportAllocs()
			j := 0
			for b.Loop() {
				if err := c.Set(ctx, keys[j], v, time.Hour); err != nil {
					b.Fatal(err)
				}
				if j++; j == len(keys) {
					j = 0
				}
			}
		})
	}
}

// BenchmarkPropagation measures, for every Set on instance A, the time from
// the call until instance B has applied the invalidation it published (B's
// handler stamps the moment), and reports its median and 99th percentile;
// B may apply it before A's Set has returned. set-p50-µs is the Set's own
// latency, for comparison. Each iteration waits for both before the next.
//
// The bare dependency takes turns with it, one sample each per iteration,
// the first side alternating: a go-redis PUBLISH of a message of the same
// size, from a client of its own, until a go-redis PubSub on another client
// has received it (bare-p50-µs, bare-p99-µs). That hop is the least any
// invalidation sent over Redis pub/sub through go-redis can take, so
// p50-ratio = p50 / bare-p50 is what the Bus and the write around it add,
// and it compares across machines where the absolute µs do not.
func BenchmarkPropagation(b *testing.B) {
	ctx := context.Background()
	ns := namespace(b)
	procA := newBenchProc(b)
	a := procA.cache(b, ns, benchOpts)
	peer := newBenchProc(b).cache(b, ns, benchOpts)
	stamps := make(chan time.Time, 1024)
	peer.mu.Lock()
	peer.afterApply = func() { stamps <- time.Now() }
	peer.mu.Unlock()
	v, _ := makeBenchValue(b, 100)
	keys := benchKeys("prop:")
	timeout := time.NewTimer(time.Hour)
	defer timeout.Stop()
	wait := func(stamps <-chan time.Time, who string) time.Time {
		timeout.Reset(5 * time.Second)
		select {
		case t := <-stamps:
			return t
		case <-timeout.C:
			b.Fatalf("%s did not receive the message within 5s", who)
			return time.Time{}
		}
	}

	msg, err := procA.bus.KeysMessage(ns, keys[:1]) // what a Set publishes
	if err != nil {
		b.Fatal(err)
	}
	hop := newBareHop(b, ctx, msg)
	ours := func(key string) (set, prop time.Duration) {
		start := time.Now()
		if err := a.Set(ctx, key, v, 0); err != nil {
			b.Fatal(err)
		}
		set = time.Since(start)
		return set, wait(stamps, "the peer").Sub(start)
	}
	bare := func() time.Duration {
		start := time.Now()
		if err := hop.pub.Publish(ctx, hop.channel, hop.msg).Err(); err != nil {
			b.Fatal(err)
		}
		return wait(hop.stamps, "the bare subscriber").Sub(start)
	}
	for _, k := range keys[:10] { // warm the connections and the paths
		ours(k)
		bare()
	}
	samples := make([]time.Duration, 0, 1<<14)
	sets := make([]time.Duration, 0, 1<<14)
	bares := make([]time.Duration, 0, 1<<14)
	b.ReportAllocs()
	j := 0
	for b.Loop() {
		if j%2 == 1 {
			bares = append(bares, bare())
		}
		set, prop := ours(keys[j])
		sets, samples = append(sets, set), append(samples, prop)
		if j%2 == 0 {
			bares = append(bares, bare())
		}
		if j++; j == len(keys) {
			j = 0
		}
	}
	q := func(d []time.Duration, p float64) float64 {
		slices.Sort(d)
		return float64(d[int(p*float64(len(d)-1))]) / float64(time.Microsecond)
	}
	b.ReportMetric(q(samples, 0.50), "p50-µs")
	b.ReportMetric(q(samples, 0.99), "p99-µs")
	b.ReportMetric(q(sets, 0.50), "set-p50-µs")
	b.ReportMetric(q(bares, 0.50), "bare-p50-µs")
	b.ReportMetric(q(bares, 0.99), "bare-p99-µs")
	b.ReportMetric(q(samples, 0.50)/q(bares, 0.50), "p50-ratio")
}

// bareHop is BenchmarkPropagation's bare side: a go-redis client that
// publishes and a go-redis PubSub, on another client, whose receive loop
// stamps each message's arrival.
type bareHop struct {
	pub     *redis.Client
	channel string
	msg     []byte
	stamps  chan time.Time
}

func newBareHop(b *testing.B, ctx context.Context, msg []byte) *bareHop {
	b.Helper()
	h := &bareHop{
		pub:     srv.Client(b),
		channel: srv.Prefix() + "bench:bare-hop",
		msg:     msg,
		stamps:  make(chan time.Time, 16),
	}
	ps := srv.Client(b).Subscribe(ctx, h.channel)
	if _, err := ps.Receive(ctx); err != nil { // the subscription's confirmation
		b.Fatalf("bare subscriber: %v", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			m, err := ps.Receive(ctx)
			if err != nil {
				return // Close below
			}
			if _, ok := m.(*redis.Message); ok {
				h.stamps <- time.Now()
			}
		}
	}()
	b.Cleanup(func() {
		_ = ps.Close()
		<-done
	})
	return h
}

// BenchmarkGetMany reads 100 keys of 1 KiB: all in L1 (warm), none valid in
// L1 (cold: every key invalidated before each call, so the call reads Redis
// in one pipeline and fills L1), and with go-redis alone (one pipeline of
// GETs and a json.Unmarshal per value).
func BenchmarkGetMany(b *testing.B) {
	const n = 100
	ctx := context.Background()
	v, enc := makeBenchValue(b, 1<<10)
	b.Run("bare-goredis-pipeline+decode", func(b *testing.B) {
		rdb := srv.Client(b)
		keys := benchKeys(srv.Prefix() + "bare-many:")[:n]
		preloadBare(b, rdb, keys, enc)
		b.ReportAllocs()
		cmds := make([]*redis.StringCmd, n)
		for b.Loop() {
			pipe := rdb.Pipeline()
			for i, k := range keys {
				cmds[i] = pipe.Get(ctx, k)
			}
			if _, err := pipe.Exec(ctx); err != nil {
				b.Fatal(err)
			}
			out := make(map[string]benchValue, n)
			for i, k := range keys {
				raw, err := cmds[i].Bytes()
				if err != nil {
					b.Fatal(err)
				}
				var v benchValue
				if err := json.Unmarshal(raw, &v); err != nil {
					b.Fatal(err)
				}
				out[k] = v
			}
		}
	})
	setup := func(b *testing.B) (*Cache[benchValue], []string) {
		c := newBenchProc(b).cache(b, "", benchOpts)
		keys := benchKeys("many:")[:n]
		preload(b, c, keys, v)
		warmL1(b, c, keys)
		return c, keys
	}
	b.Run("tiercache-cold", func(b *testing.B) {
		c, keys := setup(b)
		b.ReportAllocs()
		for b.Loop() {
			b.StopTimer()
			for _, k := range keys {
				c.invalidateLocal(k)
			}
			b.StartTimer()
			got, err := c.GetMany(ctx, keys)
			if err != nil || len(got) != n {
				b.Fatalf("GetMany: %d values, %v", len(got), err)
			}
		}
	})
	b.Run("tiercache-warm", func(b *testing.B) {
		c, keys := setup(b)
		check := l1Only(b, c)
		b.ReportAllocs()
		for b.Loop() {
			got, err := c.GetMany(ctx, keys)
			if err != nil || len(got) != n {
				b.Fatalf("GetMany: %d values, %v", len(got), err)
			}
		}
		check()
	})
}
