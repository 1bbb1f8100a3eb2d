package tiered

import (
	"context"
	"encoding/json"
	"slices"
	"testing"
	"time"

	"github.com/tiercache/tiercache/internal/redistest"
)

// BenchmarkDeployments measures the L2 paths and propagation on a
// standalone Redis, on a local Redis Cluster (3 masters, 3 replicas) with
// classic pub/sub, and on the cluster with sharded pub/sub (8 channels),
// each next to bare go-redis on the same client. Run it alone:
//
//	go test -run '^$' -bench Deployments ./tiered/
func BenchmarkDeployments(b *testing.B) {
	cl := redistest.StartCluster(b, redistest.ClusterConfig{})
	ctx := context.Background()
	v, enc := makeBenchValue(b, 100)
	for _, dep := range []struct {
		name   string
		be     backend
		shards int
	}{
		{"standalone", standalone{srv}, 0},
		{"cluster", clusterBackend{cl}, 0},
		{"cluster-sharded", clusterBackend{cl}, 8},
	} {
		bo := benchHeartbeat
		bo.ShardChannels = dep.shards
		mk := func(opts Options, ns string) *Cache[benchValue] {
			rdb := dep.be.Client(b)
			bus := newBus(b, dep.be, rdb, bo)
			opts.KeyPrefix = dep.be.Prefix()
			c, err := New[benchValue](ns, rdb, bus, opts)
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { c.Close() })
			return c
		}
		ns := namespace(b)
		redisOnly := benchOpts
		redisOnly.Mode = ModeRedis
		c := mk(redisOnly, ns)
		rdb := c.rdb
		keys := benchKeys("dep:")
		bareKeys := benchKeys(dep.be.Prefix() + "bare-dep:" + dep.name + ":")
		for i, k := range keys {
			if err := c.Set(ctx, k, v, 0); err != nil {
				b.Fatal(err)
			}
			if err := rdb.Set(ctx, bareKeys[i], enc, time.Hour).Err(); err != nil {
				b.Fatal(err)
			}
		}
		b.Run(dep.name+"/L2Hit/bare-goredis-get+decode", func(b *testing.B) {
			j := 0
			for b.Loop() {
				raw, err := rdb.Get(ctx, bareKeys[j]).Bytes()
				if err != nil {
					b.Fatal(err)
				}
				var out benchValue
				if err := json.Unmarshal(raw, &out); err != nil {
					b.Fatal(err)
				}
				j = (j + 1) % len(keys)
			}
		})
		b.Run(dep.name+"/L2Hit/tiercache", func(b *testing.B) {
			j := 0
			for b.Loop() {
				if _, ok, err := c.Get(ctx, keys[j]); !ok || err != nil {
					b.Fatal("miss", err)
				}
				j = (j + 1) % len(keys)
			}
		})
		b.Run(dep.name+"/Set/bare-goredis-set", func(b *testing.B) {
			j := 0
			for b.Loop() {
				if err := rdb.Set(ctx, bareKeys[j], enc, time.Hour).Err(); err != nil {
					b.Fatal(err)
				}
				j = (j + 1) % len(keys)
			}
		})
		b.Run(dep.name+"/Set/tiercache", func(b *testing.B) {
			j := 0
			for b.Loop() {
				if err := c.Set(ctx, keys[j], v, 0); err != nil {
					b.Fatal(err)
				}
				j = (j + 1) % len(keys)
			}
		})
		b.Run(dep.name+"/Propagation", func(b *testing.B) {
			pns := namespace(b)
			writer, peer := mk(benchOpts, pns), mk(benchOpts, pns)
			done := applied(peer)
			samples := make([]time.Duration, 0, 1<<14)
			j := 0
			for b.Loop() {
				start := time.Now()
				if err := writer.Set(ctx, keys[j], v, 0); err != nil {
					b.Fatal(err)
				}
				select {
				case <-done:
				case <-time.After(5 * time.Second):
					b.Fatal("the peer did not apply the invalidation within 5 s")
				}
				samples = append(samples, time.Since(start))
				j = (j + 1) % len(keys)
			}
			slices.Sort(samples)
			q := func(p float64) float64 {
				return float64(samples[int(p*float64(len(samples)-1))]) / float64(time.Microsecond)
			}
			b.ReportMetric(q(0.50), "p50-µs")
			b.ReportMetric(q(0.99), "p99-µs")
		})
	}
}
