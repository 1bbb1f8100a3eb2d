package integration

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/tiercache/tiercache/internal/redistest"
)

// phaseSpec is one phase of the checker: its fault, driven from the test
// (redistest's faults take the test's testing.TB), and whether it is the
// strict no-fault phase.
type phaseSpec struct {
	name   string
	strict bool
	fault  func(t *testing.T, ctx context.Context, srv *redistest.Server, f *Fleet, window time.Duration)
}

// phases are the checker's phases, in order. Each fault lasts about
// window and is removed before its function returns.
var phases = []phaseSpec{
	{name: "no-fault", strict: true},
	{name: "pubsub-killed", fault: killPubSub},
	{name: "redis-restarted", fault: restartRedis},
	{name: "pause-write", fault: pauseWrite},
	{name: "slow-l2-30ms", fault: slowL2(30 * time.Millisecond)},
	{name: "slow-l2-150ms", fault: slowL2(150 * time.Millisecond)},
	{name: "cut-off-blackhole", fault: cutOff(true)},
	{name: "cut-off-refused", fault: cutOff(false)},
	{name: "lagging-link", fault: lagging(230 * time.Millisecond)},
}

// lagging slows the last instance's link by d per chunk each way, just
// under HeartbeatTimeout, while the others keep writing; it only reads.
// Its stream keeps delivering, late and later (chunks queue behind each
// other), so silence alone never shows; its pongs come late, and that is
// what must end its trust in L1.
func lagging(d time.Duration) func(*testing.T, context.Context, *redistest.Server, *Fleet, time.Duration) {
	return func(t *testing.T, ctx context.Context, _ *redistest.Server, f *Fleet, window time.Duration) {
		in := f.Instances()[len(f.Instances())-1]
		in.SetWritable(false)
		defer in.SetWritable(true)
		in.Proxy.SetLatency(d)
		defer in.Proxy.SetLatency(0)
		hold(ctx, window)
	}
}

// killPubSub runs CLIENT KILL TYPE pubsub every 300 ms: every Bus loses its
// subscription again and again.
func killPubSub(t *testing.T, ctx context.Context, srv *redistest.Server, _ *Fleet, window time.Duration) {
	end := time.Now().Add(window)
	kills := 0
	for ctx.Err() == nil && time.Now().Before(end) {
		kills += srv.KillPubSub(t)
		hold(ctx, min(300*time.Millisecond, time.Until(end)))
	}
	t.Logf("killed %d subscriptions", kills)
}

// restartRedis stops Redis for half the window, then starts it again with
// nothing in it.
func restartRedis(t *testing.T, ctx context.Context, srv *redistest.Server, _ *Fleet, window time.Duration) {
	start := time.Now()
	srv.Stop(t)
	hold(ctx, window/2)
	srv.Restart(t)
	t.Logf("Redis down for %v", time.Since(start).Round(time.Millisecond))
	hold(ctx, window-time.Since(start))
}

// pauseWrite holds every write command (and PUBLISH, and the fill script)
// for the window with CLIENT PAUSE WRITE; reads go on.
func pauseWrite(t *testing.T, ctx context.Context, srv *redistest.Server, _ *Fleet, window time.Duration) {
	srv.Pause(t, window, true)
	hold(ctx, window) // the pause ends by itself
}

// slowL2 adds d to every chunk each way on every instance's link, pub/sub
// included, for the window.
func slowL2(d time.Duration) func(*testing.T, context.Context, *redistest.Server, *Fleet, time.Duration) {
	return func(t *testing.T, ctx context.Context, _ *redistest.Server, f *Fleet, window time.Duration) {
		for _, in := range f.Instances() {
			in.Proxy.SetLatency(d)
		}
		defer func() {
			for _, in := range f.Instances() {
				in.Proxy.SetLatency(0)
			}
		}()
		hold(ctx, window)
	}
}

// cutOff separates the last instance from Redis for the window while the
// others keep writing; it only reads meanwhile. With blackhole its sockets
// stay open and carry nothing (a half-open link); otherwise they are cut
// and new ones refused.
func cutOff(blackhole bool) func(*testing.T, context.Context, *redistest.Server, *Fleet, time.Duration) {
	return func(t *testing.T, ctx context.Context, _ *redistest.Server, f *Fleet, window time.Duration) {
		in := f.Instances()[len(f.Instances())-1]
		in.SetWritable(false)
		defer in.SetWritable(true)
		if blackhole {
			in.Proxy.Blackhole(true)
			defer in.Proxy.Blackhole(false)
		} else {
			in.Proxy.Refuse(true)
			defer in.Proxy.Refuse(false)
			in.Proxy.Cut()
		}
		hold(ctx, window)
	}
}

// startFleet starts a Fleet on srv, closed when the test ends, and waits
// until every Bus is live.
func startFleet(t *testing.T, srv *redistest.Server, cfg Config) *Fleet {
	t.Helper()
	f, err := NewFleet(cfg, srv.Options(), srv.Prefix())
	return keepFleet(t, "NewFleet", f, err)
}

// keepFleet fails t on err from the constructor named what, closes f when
// the test ends and waits until every Bus is live.
func keepFleet(t *testing.T, what string, f *Fleet, err error) *Fleet {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	t.Cleanup(func() {
		if err := f.Close(); err != nil {
			t.Errorf("Fleet.Close: %v", err)
		}
	})
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := f.WaitLive(ctx); err != nil {
		t.Fatal(err)
	}
	return f
}

// runCoherence starts a private Redis and a Fleet, runs every phase as a
// subtest (failing it when it misses a bar) and returns the reports.
func runCoherence(t *testing.T, cfg Config) []PhaseReport {
	srv := redistest.Start(t)
	f := startFleet(t, srv, cfg)
	var reports []PhaseReport
	for _, spec := range phases {
		t.Run(spec.name, func(t *testing.T) {
			var fault func(context.Context, time.Duration)
			if spec.fault != nil {
				fault = func(ctx context.Context, window time.Duration) { spec.fault(t, ctx, srv, f, window) }
			}
			reports = append(reports, runChecked(t, f, spec.name, spec.strict, fault))
		})
	}
	return reports
}

// runChecked runs one phase on f, logs its table and fails t for each bar
// it misses. A strict phase (no fault) allows no violation at δ; any other
// a worst staleness of HeartbeatTimeout + δ.
func runChecked(t *testing.T, f *Fleet, name string, strict bool, fault func(context.Context, time.Duration)) PhaseReport {
	t.Helper()
	cfg := f.Config()
	p := Phase{Name: name, Strict: strict, Fault: fault}
	if !strict {
		p.Bound = cfg.HeartbeatTimeout + cfg.Delta
	}
	rep := f.RunPhase(t.Context(), p)
	t.Log("\n" + FormatTable([]PhaseReport{rep}))
	for _, s := range rep.Failures() {
		t.Errorf("%s: %s", name, s)
	}
	return rep
}

// TestCoherence is the checker as CI runs it (under -race): four instances,
// short phases. Bars: no violation at δ with no fault; under faults a worst
// staleness within HeartbeatTimeout + δ; no read error (the loader can
// always serve); recovery after every phase.
func TestCoherence(t *testing.T) {
	start := time.Now()
	reports := runCoherence(t, Config{})
	t.Logf("coherence checker, %d phases in %v:\n%s", len(reports), time.Since(start).Round(time.Millisecond), FormatTable(reports))
}

// TestSoak is the long checker behind `make soak`: more instances, readers
// and keys (Zipf), 30 s phases (TIERCACHE_SOAK_PHASE overrides). It runs
// only with TIERCACHE_SOAK=1.
func TestSoak(t *testing.T) {
	cfg, d := soakConfig(t)
	start := time.Now()
	reports := runCoherence(t, cfg)
	table := FormatTable(reports)
	t.Logf("soak, %d phases of %v in %v:\n%s", len(reports), d, time.Since(start).Round(time.Millisecond), table)
	fmt.Printf("\nsoak, %d phases of %v:\n\n%s\n", len(reports), d, table)
}

// soakConfig is the soak's load, with phases of TIERCACHE_SOAK_PHASE (30 s
// by default); it skips t unless TIERCACHE_SOAK=1.
func soakConfig(t *testing.T) (Config, time.Duration) {
	if os.Getenv("TIERCACHE_SOAK") != "1" {
		t.Skip("the soak runs with TIERCACHE_SOAK=1 (make soak)")
	}
	d := 30 * time.Second
	if s := os.Getenv("TIERCACHE_SOAK_PHASE"); s != "" {
		var err error
		if d, err = time.ParseDuration(s); err != nil || d <= 0 {
			t.Fatalf("TIERCACHE_SOAK_PHASE=%q: want a positive duration (%v)", s, err)
		}
	}
	return Config{
		Instances: 6, Keys: 256, Writers: 6, ReadersPerInstance: 4, Zipf: 1.1,
		PhaseDuration: d, ReadInterval: 500 * time.Microsecond,
	}, d
}

// TestCheckerSeesStaleness is the checker's negative control, end to end:
// with a HeartbeatTimeout of 1 s, an instance behind a blackhole keeps
// serving its L1 until its Bus notices the silence, so its reads fall behind
// the writes the other instance makes meanwhile by up to that timeout (as
// the library allows). The checker must see those stale reads.
func TestCheckerSeesStaleness(t *testing.T) {
	srv := redistest.Start(t)
	// Few keys written slowly, so the cut instance holds them in L1 when
	// the cut begins and serves them from there.
	cfg := Config{Instances: 2, Keys: 4, Writers: 2, HeartbeatTimeout: time.Second,
		WriteInterval: 20 * time.Millisecond, PhaseDuration: 2 * time.Second}
	f := startFleet(t, srv, cfg)
	cfg = f.Config()
	rep := f.RunPhase(t.Context(), Phase{
		Name:  "control: blackhole, HeartbeatTimeout 1s",
		Bound: cfg.HeartbeatTimeout + cfg.Delta,
		Fault: func(ctx context.Context, window time.Duration) { cutOff(true)(t, ctx, srv, f, window) },
	})
	// Only the detection is asserted here; the other bars are TestCoherence's.
	t.Log("\n" + FormatTable([]PhaseReport{rep}))
	if rep.Violations == 0 || rep.WorstStaleness <= cfg.Delta {
		t.Errorf("checker saw %d violations, worst staleness %v; want stale reads on the cut instance (> δ = %v)", rep.Violations, rep.WorstStaleness, cfg.Delta)
	}
}

// TestAnalyze checks the checker: which reads count as stale, by how much,
// and that failed writes and failed reads are left out.
func TestAnalyze(t *testing.T) {
	ms := func(n int) time.Duration { return time.Duration(n) * time.Millisecond }
	seeds := []writeRec{
		{}, // key 0: no earlier write
		{end: ms(1), version: 5, key: 1, ok: true}, // key 1: v5 returned in an earlier phase
	}
	writes := []writeRec{
		{start: ms(15), end: ms(20), version: 2, key: 0, inst: 1, ok: true},
		{start: ms(5), end: ms(10), version: 1, key: 0, inst: 0, ok: true},
		{start: ms(21), end: ms(25), version: 3, key: 0, inst: 2, ok: false}, // failed: never held against a read
	}
	reads := []readRec{
		{start: ms(5), version: 0, key: 0, ok: true},            // nothing had returned: fresh
		{start: ms(10), version: 0, key: 0, ok: true},           // v1 returns at 10ms, not before: fresh
		{start: ms(15), version: 0, key: 0, ok: true},           // 5ms behind v1
		{start: ms(200), version: 1, key: 0, inst: 3, ok: true}, // 180ms behind v2
		{start: ms(300), version: 2, key: 0, ok: true},          // v3 failed: fresh
		{start: ms(900), version: 0, key: 0, ok: false},         // an error: not checked
		{start: ms(50), version: 4, key: 1, ok: true},           // 49ms behind the seed
		{start: ms(60), version: 6, key: 1, ok: true},           // newer than anything returned: fresh
	}
	st := analyze(2, seeds, writes, reads, ms(40), ms(100))
	if st.behind != 3 || st.violations != 2 || st.overBound != 1 || st.worst != ms(180) {
		t.Errorf("analyze = %d behind, %d violations, %d over bound, worst %v; want 3 behind, 2, 1, 180ms", st.behind, st.violations, st.overBound, st.worst)
	}
	if st.worstRead.inst != 3 || st.worstNewer.version != 2 || st.worstNewer.inst != 1 {
		t.Errorf("worst read = %+v behind %+v; want the read on instance 3 behind v2 written through instance 1", st.worstRead, st.worstNewer)
	}
	if len(st.overByInst) != 1 || st.overByInst[3] != 1 || len(st.overKeys) != 1 || !st.overKeys[0] || st.overFrom != ms(200) || st.overTo != ms(200) {
		t.Errorf("over the bound: by instance %v, keys %v, from %v to %v; want 1 read on instance 3, key 0, at 200ms", st.overByInst, st.overKeys, st.overFrom, st.overTo)
	}
}
