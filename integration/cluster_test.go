package integration

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tiercache/tiercache/internal/redistest"
)

// clusterConfig is the load of TestCoherenceCluster and
// TestSentinelFailoverDuringLoad: the checker's defaults, but reads skewed
// (Zipf) so that the first keys are the hot ones, and 36 keys, 9 per
// writer, so that each key's writes rotate over all four instances (with
// 8 per writer, a key would always be written through the same one).
var clusterConfig = Config{Keys: 36, Zipf: 1.1}

// failoverTimeout bounds each wait for a failover or a rejoin; a killed
// master's replica takes over in about 2-3 s.
const failoverTimeout = 20 * time.Second

// clusterPhase is one phase of TestCoherenceCluster; its fault acts on the
// cluster and is removed (the cluster ok again) before it returns.
type clusterPhase struct {
	name   string
	strict bool
	fault  func(t *testing.T, ctx context.Context, c *redistest.Cluster, f *Fleet, window time.Duration)
}

// clusterPhases are TestCoherenceCluster's phases, in order.
var clusterPhases = []clusterPhase{
	{name: "no-fault", strict: true},
	{name: "slot-migration", fault: migrateHotSlots(3)},
	{name: "master-killed", fault: killMaster(false)},
	{name: "pubsub-master-killed", fault: killMaster(true)},
}

// migrateHotSlots moves the slots of the n hottest keys, one after the
// other, each to the next master, again and again for the window, while
// they are read and written.
func migrateHotSlots(n int) func(*testing.T, context.Context, *redistest.Cluster, *Fleet, time.Duration) {
	return func(t *testing.T, ctx context.Context, c *redistest.Cluster, f *Fleet, window time.Duration) {
		hot := f.Keys()[:n]
		start := time.Now()
		moves, slowest := 0, time.Duration(0)
		for ctx.Err() == nil && time.Since(start) < window {
			for _, k := range hot {
				slot := redistest.KeySlot(k)
				masters := c.Masters(t)
				from := c.MasterForSlot(t, slot)
				to := masters[(slices.Index(masters, from)+1)%len(masters)]
				s := time.Now()
				c.MigrateSlot(t, slot, to)
				slowest = max(slowest, time.Since(s))
				moves++
			}
		}
		t.Logf("%d slot migrations of %v in %v (slowest %v)", moves, hot, time.Since(start).Round(time.Millisecond), slowest.Round(time.Millisecond))
	}
}

// killMaster kills a master that owns some of the keys being written and
// waits for its replica to take over; then for every Bus to be live again
// with the old master still down (a dead master may never come back); then
// restarts the old master and waits until it has rejoined as a replica.
// With pubsub the victim is the master that owns the Bus channel's slot,
// which every ClusterClient subscribes through; otherwise the master of the
// hottest key that does not.
func killMaster(pubsub bool) func(*testing.T, context.Context, *redistest.Cluster, *Fleet, time.Duration) {
	return func(t *testing.T, ctx context.Context, c *redistest.Cluster, f *Fleet, _ time.Duration) {
		channel := f.Instances()[0].Bus.Channel()
		chanMaster := c.MasterFor(t, channel)
		owner := map[string][]string{}
		victim := ""
		for _, k := range f.Keys() {
			m := c.MasterFor(t, k)
			owner[m] = append(owner[m], k)
			if victim == "" && m != chanMaster {
				victim = m
			}
		}
		if pubsub {
			victim = chanMaster
		}
		if victim == "" || len(owner[victim]) == 0 {
			t.Fatalf("no master to kill: keys by master %v, channel on %s", owner, chanMaster)
		}
		genKey := clusterPrefix + Namespace + ":1:nsgen" // docs/wire.md
		t.Logf("killing master %s (replica %v), which owns %d of %d keys (%s); the channel %q is on %s, the namespace generation on %s",
			victim, c.ReplicasOf(t, victim), len(owner[victim]), len(f.Keys()), strings.Join(owner[victim], " "), channel, chanMaster, c.MasterFor(t, genKey))

		start := time.Now()
		c.KillMaster(t, victim)
		c.WaitFailover(t, failoverTimeout)
		failover := time.Since(start)

		live := waitLiveAfterFailover(t, ctx, f, victim)

		rejoin := time.Now()
		c.Node(victim).Restart(t)
		c.WaitOK(t, failoverTimeout)
		t.Logf("killed %s: its replica took over after %v; every Bus live again %v later, the old master still down; restarted, it rejoined as a replica of %s after %v",
			victim, fmtDur(failover), fmtDur(live), c.MasterFor(t, owner[victim][0]), fmtDur(time.Since(rejoin)))
	}
}

// waitLiveAfterFailover waits until every Bus of f is live again after a
// failover from the dead master old, at most liveAfterFailover, and returns
// how long that took. It fails t, with every Bus's state, on timeout.
func waitLiveAfterFailover(t *testing.T, ctx context.Context, f *Fleet, old string) time.Duration {
	t.Helper()
	start := time.Now()
	wctx, cancel := context.WithTimeout(ctx, liveAfterFailover)
	defer cancel()
	if err := f.WaitLive(wctx); err != nil {
		var state []string
		for _, in := range f.Instances() {
			state = append(state, fmt.Sprintf("instance %d: %+v", in.ID, in.Bus.Stats()))
		}
		t.Errorf("fleet not live %v after the failover, with %s still down: %v\n%s", fmtDur(time.Since(start)), old, err, strings.Join(state, "\n"))
	}
	return time.Since(start)
}

// liveAfterFailover bounds how long after a failover every Bus must be live
// again without the old master. It is not the checker's RecoveryBound (3 s,
// measured once the fault is over): a Bus that lost its subscription keeps
// retrying with a backoff of up to 2 s, and it needs a slot map that has
// seen the promotion.
const liveAfterFailover = 10 * time.Second

// TestCoherenceCluster is the checker on a Redis Cluster (3 masters, 3
// replicas), as CI runs it: four instances, each with its own
// ClusterClient, Bus and Cache. Phases: no fault; the hottest keys' slots
// migrated again and again during writes; a master killed (its replica
// takes over, every Bus must be live again before it returns, then it
// rejoins as a replica), first one that holds keys only, then the one every
// subscription goes through. The bars are TestCoherence's.
func TestCoherenceCluster(t *testing.T) {
	start := time.Now()
	reports := runCluster(t, clusterConfig)
	t.Logf("coherence checker on a cluster, %d phases in %v:\n%s", len(reports), time.Since(start).Round(time.Millisecond), FormatTable(reports))
}

// TestSoakCluster is TestSoak's load on a cluster, through
// TestCoherenceCluster's phases (make soak). It runs only with
// TIERCACHE_SOAK=1.
func TestSoakCluster(t *testing.T) {
	cfg, d := soakConfig(t)
	start := time.Now()
	reports := runCluster(t, cfg)
	table := FormatTable(reports)
	t.Logf("cluster soak, %d phases of %v in %v:\n%s", len(reports), d, time.Since(start).Round(time.Millisecond), table)
	fmt.Printf("\ncluster soak, %d phases of %v:\n\n%s\n", len(reports), d, table)
}

// runCluster starts a private Redis Cluster and a Fleet on it, runs every
// cluster phase as a subtest (failing it when it misses a bar) and returns
// the reports.
func runCluster(t *testing.T, cfg Config) []PhaseReport {
	start := time.Now()
	c := redistest.StartCluster(t, redistest.ClusterConfig{})
	f, err := NewClusterFleet(cfg, c.Options(), clusterPrefix)
	f = keepFleet(t, "NewClusterFleet", f, err)
	t.Logf("cluster up and fleet live in %v", time.Since(start).Round(time.Millisecond))
	var reports []PhaseReport
	for _, spec := range clusterPhases {
		t.Run(spec.name, func(t *testing.T) {
			var fault func(context.Context, time.Duration)
			if spec.fault != nil {
				fault = func(ctx context.Context, window time.Duration) { spec.fault(t, ctx, c, f, window) }
			}
			reports = append(reports, runChecked(t, f, spec.name, spec.strict, fault))
		})
	}
	return reports
}

// clusterPrefix and sentinelPrefix scope the keys and channel on the
// tests' private deployments.
const (
	clusterPrefix  = "tcc:"
	sentinelPrefix = "tcs:"
)

// TestSentinelFailoverDuringLoad runs the checker on a Sentinel set-up
// (master, replica, three sentinels), four instances each with its own
// failover client, Bus and Cache, and kills the master in the middle of the
// load. Bars: no read error (reads keep being served), a worst staleness
// within HeartbeatTimeout + δ, every Bus live again after the failover and
// the checker's recovery probe, and writes that succeed again after it.
func TestSentinelFailoverDuringLoad(t *testing.T) {
	start := time.Now()
	s := redistest.StartSentinel(t, redistest.SentinelConfig{})
	f, err := NewFailoverFleet(clusterConfig, s.FailoverOptions(), sentinelPrefix)
	f = keepFleet(t, "NewFailoverFleet", f, err)
	rep := runChecked(t, f, "sentinel-failover", false, func(ctx context.Context, _ time.Duration) {
		kill := time.Now()
		old := s.KillMaster(t)
		nu := s.WaitFailover(t, failoverTimeout)
		failover := time.Since(kill)
		live := waitLiveAfterFailover(t, ctx, f, old)
		t.Logf("killed master %s; the sentinels promoted %s, which takes writes, after %v; every Bus live again %v later",
			old, nu, fmtDur(failover), fmtDur(live))
	})
	if rep.WriteErrors > 0 && rep.WritesAfter == 0 {
		t.Errorf("no write succeeded after the last failed one (%v after the failover)", fmtDur(rep.LastWriteError))
	}
	t.Logf("sentinel failover in %v:\n%s", time.Since(start).Round(time.Millisecond), FormatTable([]PhaseReport{rep}))
}
