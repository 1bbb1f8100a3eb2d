package main

import (
	"context"
	"fmt"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/tiercache/tiercache/example/app/server"
	"github.com/tiercache/tiercache/example/internal/pgtest"
	"github.com/tiercache/tiercache/example/loadgen/load"
	"github.com/tiercache/tiercache/internal/redistest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// startFleet runs n app instances in this process, each with its own
// Redis client, Bus, caches and database pool, over one Redis and one
// database, as `make demo` runs them in n processes. It returns their URLs.
func startFleet(t *testing.T, n int, env map[string]string) []string {
	t.Helper()
	var urls []string
	for i := 1; i <= n; i++ {
		e := map[string]string{"INSTANCE_ID": fmt.Sprintf("app-%d", i)}
		for k, v := range env {
			e[k] = v
		}
		cfg, err := server.LoadConfig(func(k string) string { return e[k] })
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		srv, err := server.New(ctx, cfg, server.Deps{})
		cancel()
		if err != nil {
			t.Fatalf("instance %d: %v", i, err)
		}
		ts := httptest.NewServer(srv.Handler())
		t.Cleanup(func() {
			ts.Close() // waits for requests in flight
			if err := srv.Close(); err != nil {
				t.Errorf("instance %d: Close: %v", i, err)
			}
		})
		urls = append(urls, ts.URL)
	}
	return urls
}

// fleetEnv is the demo's configuration with the key space scaled to a
// few seconds of load: the demo seeds 10,000 users and loads them for 20 s
// at several thousand requests a second; here, under -race, a few thousand
// requests in all would barely touch each hot user once per instance, so
// the hit ratio would measure cold starts, not the cache.
func fleetEnv(t *testing.T, cacheType string, rs *redistest.Server) map[string]string {
	env := map[string]string{
		"CACHE_TYPE":    cacheType,
		"SQLITE_PATH":   filepath.Join(t.TempDir(), "demo.db"),
		"DB_LATENCY":    "1ms",
		"SEED_USERS":    "200",
		"SEED_LICENSES": "1000",
	}
	if rs != nil {
		env["REDIS_URL"] = "redis://" + rs.Addr() + "/0"
	}
	return env
}

// shortLoad is the demo's load generator settings, for a few seconds and
// a few thousand requests, however slow the machine (-race, other
// packages' tests beside this one).
func shortLoad(targets []string) load.Config {
	return load.Config{
		Targets:        targets,
		Warmup:         time.Second,
		WarmupRequests: 1500,
		Duration:       3 * time.Second,
		Requests:       3000,
		MaxDuration:    40 * time.Second,
		Concurrency:    8,
		Seed:           7,
	}
}

func runLoad(t *testing.T, cfg load.Config) *load.Result {
	t.Helper()
	res, err := load.Run(context.Background(), cfg)
	if err != nil {
		t.Fatalf("load.Run: %v", err)
	}
	var b strings.Builder
	res.WriteSummary(&b)
	t.Log("\n" + b.String())
	// The report renders whatever the run found.
	if err := res.WriteHTML(filepath.Join(t.TempDir(), "report.html")); err != nil {
		t.Errorf("WriteHTML: %v", err)
	}
	return res
}

// checkCoherentRun holds a tiered fleet's run to the demo's bars: no stale
// read, no error, most reads answered by L1.
func checkCoherentRun(t *testing.T, res *load.Result) {
	t.Helper()
	c := res.Coherence
	if c.StaleReads != 0 {
		t.Errorf("%d stale reads (δ %v ms), e.g. %+v", c.StaleReads, c.DeltaMs, c.Examples)
	}
	if len(c.FinalStale) != 0 || c.FinalReads == 0 || c.FinalErrors != 0 {
		t.Errorf("read-back after the load: %d stale of %d reads (%d failed), e.g. %+v", len(c.FinalStale), c.FinalReads, c.FinalErrors, c.FinalStale)
	}
	if res.Errors != 0 || len(res.ErrorKinds) != 0 {
		t.Errorf("errors: %v, e.g. %v", res.ErrorKinds, res.ErrorExamples)
	}
	if c.Reads < 1000 || c.Writes < 10 {
		t.Errorf("only %d reads and %d writes were checked", c.Reads, c.Writes)
	}
	if !res.Cache.Available || res.Cache.L1HitRatio == nil || *res.Cache.L1HitRatio <= 0.8 {
		t.Errorf("L1 hit ratio %s, want above 80%% on the default mix", ratioString(res.Cache.L1HitRatio))
	}
	if res.Cache.DBQueriesPerRequest == nil || *res.Cache.DBQueriesPerRequest >= 0.2 {
		t.Errorf("database queries per request %s, want under 0.2 with the cache", ratioString(res.Cache.DBQueriesPerRequest))
	}
	if res.CacheType != "tiered" || len(res.Cache.PerInstance) != 3 {
		t.Errorf("cache type %q, %d instances scraped; want tiered, 3", res.CacheType, len(res.Cache.PerInstance))
	}
}

func ratioString(p *float64) string {
	if p == nil {
		return "n/a"
	}
	return fmt.Sprintf("%.3f", *p)
}

// make demo's pieces, for a few seconds: three instances on SQLite over one
// Redis, the load generator's default mix against all three.
func TestDemo_SQLite(t *testing.T) {
	rs := redistest.Start(t)
	res := runLoad(t, shortLoad(startFleet(t, 3, fleetEnv(t, "redis", rs))))
	checkCoherentRun(t, res)
}

// The same against PostgreSQL.
func TestDemo_Postgres(t *testing.T) {
	dsn, ok := pgtest.URL(t)
	if !ok {
		t.Skip("no PostgreSQL (see the log)") // pgtest.URL fails instead under CI
	}
	rs := redistest.Start(t)
	env := fleetEnv(t, "redis", rs)
	env["DATABASE_URL"] = dsn
	res := runLoad(t, shortLoad(startFleet(t, 3, env)))
	checkCoherentRun(t, res)
}

// The negative control: in memory mode each instance caches alone, so an
// update on one is never seen by the others until L1TTL. The load
// generator must find stale reads there; if it did not, its check would
// prove nothing above.
func TestDemo_MemoryModeIsCaught(t *testing.T) {
	res := runLoad(t, shortLoad(startFleet(t, 3, fleetEnv(t, "memory", nil))))
	if res.Coherence.StaleReads == 0 {
		t.Errorf("memory mode: no stale reads found in %d reads against %d writes; the check is blind", res.Coherence.Reads, res.Coherence.Writes)
	}
	if len(res.Coherence.FinalStale) == 0 {
		t.Errorf("memory mode: the read-back found nothing stale in %d reads; it is blind", res.Coherence.FinalReads)
	}
	if res.Errors != 0 {
		t.Errorf("memory mode: %d errors: %v", res.Errors, res.ErrorExamples)
	}
	if res.CacheType != "memory" || res.Cache.L2HitRatio != nil {
		t.Errorf("memory mode: cache type %q, L2 hit ratio %v; want memory and none", res.CacheType, res.Cache.L2HitRatio)
	}
}

// At a target rate the load generator paces its requests: the throughput
// it reports is the rate asked for, not what the instance could take.
func TestLoad_TargetRate(t *testing.T) {
	targets := startFleet(t, 1, fleetEnv(t, "memory", nil))
	// Workers enough that pacing, not latency (slow under -race on a busy
	// machine), sets the rate: with 16, a run beside a busy CPU fell to 116
	// req/s in its first second (each request's slot is kept, but a worker
	// waits out its request before it takes the next).
	cfg := load.Config{Targets: targets, Duration: 2 * time.Second, Rate: 150, Concurrency: 64, Seed: 3}
	res := runLoad(t, cfg)
	if res.Throughput < 135 || res.Throughput > 165 {
		t.Errorf("throughput %.1f req/s at a target of 150, want within 10%%", res.Throughput)
	}
	if res.Errors != 0 || res.Coherence.StaleReads != 0 {
		t.Errorf("one instance: %d errors, %d stale reads; want none", res.Errors, res.Coherence.StaleReads)
	}
	if len(res.Series) != 2 || res.Series[0].RPS < 120 || res.Series[1].RPS < 120 {
		t.Errorf("series %+v, want two intervals near 150 req/s", res.Series)
	}
}
