// Package integration is tiercache's coherence checker: a fleet of
// instances over one Redis deployment, each with its own client, Bus and
// Cache, driven by writers and readers that record every operation, and an
// offline check of those records against the staleness rule. Over a
// standalone Redis each client reaches it through its own fault proxy
// ([NewFleet]); over a Redis Cluster or a Sentinel set-up each has its own
// cluster or failover client and the faults are in the deployment itself
// ([NewClusterFleet], [NewFailoverFleet]).
//
// # The rule
//
// The source of truth is an in-process database every instance can reach,
// even when Redis cannot be reached: a version per key. A write increments a
// key's version in it and then invalidates the cache through one instance
// (Delete, or Set of the new version: cache-aside). Each key has one writer
// at a time, so its versions strictly increase. A write has returned when
// its cache call succeeded; a write whose cache call failed may not have
// reached anyone, so it is counted as a write error and never used against
// a read.
//
// A read (Remember through the database's loader) that began at s and saw
// version v is stale if some write of a newer version returned before s;
// its staleness is s minus the earliest such return. A violation is a read
// staler than Config.Delta. With no fault the bar is no violation at all;
// under faults the bar is a worst staleness within the Bus's
// HeartbeatTimeout plus Delta, the bound the library promises.
//
// # Phases
//
// [Fleet.RunPhase] runs the load for Config.PhaseDuration: a quarter of
// warm-up, then the phase's fault (which should last about half), then the
// rest without it. Afterwards it probes recovery: every Bus live, one
// successful write per key, and every instance reading it, within
// Config.RecoveryBound. The fault drivers live in the tests, which own the
// Redis server and its faults.
//
// # Lifecycle
//
// [NewFleet], [NewClusterFleet] and [NewFailoverFleet] start the proxies
// (if any), clients, Buses and caches; [Fleet.Close] stops them all. The
// Redis servers belong to the caller.
package integration

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tiercache/tiercache/internal/faultproxy"
	"github.com/tiercache/tiercache/invalidate"
	"github.com/tiercache/tiercache/tiered"
)

// Defaults for Config.
const (
	DefaultInstances          = 4
	DefaultKeys               = 32
	DefaultWriters            = 4
	DefaultReadersPerInstance = 2
	DefaultDelta              = 100 * time.Millisecond
	DefaultPhaseDuration      = 3 * time.Second
	DefaultHeartbeatInterval  = 50 * time.Millisecond
	DefaultHeartbeatTimeout   = 250 * time.Millisecond
	DefaultCommandTimeout     = 200 * time.Millisecond
	DefaultLoadLatency        = 200 * time.Microsecond
	DefaultWriteInterval      = time.Millisecond
	DefaultReadInterval       = 200 * time.Microsecond
	DefaultRecoveryBound      = 3 * time.Second
	DefaultOpTimeout          = 5 * time.Second
)

// Namespace is the cache namespace every instance of a Fleet uses.
const Namespace = "coherence"

// Config sizes a Fleet and its load. The zero value means all defaults.
type Config struct {
	// Instances is how many simulated processes share the Redis, each with
	// its own proxy, client, Bus and Cache. Zero means DefaultInstances.
	Instances int
	// Keys is how many keys the load uses. Zero means DefaultKeys; it must
	// be at least Writers.
	Keys int
	// Writers is how many writer goroutines run. Keys are partitioned among
	// them (one writer per key); each writer rotates over the instances.
	// Zero means DefaultWriters.
	Writers int
	// ReadersPerInstance is how many reader goroutines run on each
	// instance. Zero means DefaultReadersPerInstance.
	ReadersPerInstance int
	// Zipf, when above 1, draws read keys from a Zipf distribution with
	// this exponent (hot keys first); zero means uniform.
	Zipf float64

	// Delta is the staleness allowed with no fault: a read that began more
	// than Delta after a newer write returned must not see an older
	// version. Zero means DefaultDelta.
	Delta time.Duration
	// PhaseDuration is how long the load of one phase runs. Zero means
	// DefaultPhaseDuration.
	PhaseDuration time.Duration
	// RecoveryBound is how long the recovery probe after a phase may take.
	// Zero means DefaultRecoveryBound.
	RecoveryBound time.Duration

	// HeartbeatInterval and HeartbeatTimeout configure every Bus; the
	// staleness bound under faults is HeartbeatTimeout plus Delta. Zero
	// means DefaultHeartbeatInterval and DefaultHeartbeatTimeout.
	HeartbeatInterval, HeartbeatTimeout time.Duration
	// CommandTimeout is every Cache's Options.CommandTimeout. Zero means
	// DefaultCommandTimeout.
	CommandTimeout time.Duration

	// LoadLatency is how long the loader takes after it has read the
	// database (so a slow load returns a version that may be overtaken).
	// Zero means DefaultLoadLatency; negative means none.
	LoadLatency time.Duration
	// WriteInterval and ReadInterval are the pauses between two operations
	// of one writer or reader goroutine; they keep the record count (and
	// the load under -race) bounded. Zero means the defaults; negative
	// means no pause.
	WriteInterval, ReadInterval time.Duration
	// OpTimeout bounds each read and write (its ctx). Zero means
	// DefaultOpTimeout.
	OpTimeout time.Duration
}

func (c Config) withDefaults() (Config, error) {
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	defd := func(v *time.Duration, d time.Duration) {
		if *v == 0 {
			*v = d
		}
	}
	def(&c.Instances, DefaultInstances)
	def(&c.Keys, DefaultKeys)
	def(&c.Writers, DefaultWriters)
	def(&c.ReadersPerInstance, DefaultReadersPerInstance)
	defd(&c.Delta, DefaultDelta)
	defd(&c.PhaseDuration, DefaultPhaseDuration)
	defd(&c.RecoveryBound, DefaultRecoveryBound)
	defd(&c.HeartbeatInterval, DefaultHeartbeatInterval)
	defd(&c.HeartbeatTimeout, DefaultHeartbeatTimeout)
	defd(&c.CommandTimeout, DefaultCommandTimeout)
	defd(&c.LoadLatency, DefaultLoadLatency)
	defd(&c.WriteInterval, DefaultWriteInterval)
	defd(&c.ReadInterval, DefaultReadInterval)
	defd(&c.OpTimeout, DefaultOpTimeout)
	var errs []error
	if c.Instances < 1 || c.Writers < 1 || c.ReadersPerInstance < 1 || c.Keys < 1 {
		errs = append(errs, errors.New("integration: Instances, Keys, Writers and ReadersPerInstance must be positive"))
	}
	if c.Keys < c.Writers {
		errs = append(errs, fmt.Errorf("integration: Keys %d must be at least Writers %d (one writer per key)", c.Keys, c.Writers))
	}
	if c.Instances > 1<<15 || c.Keys > 1<<30 {
		errs = append(errs, errors.New("integration: too many instances or keys"))
	}
	if c.Zipf != 0 && c.Zipf <= 1 {
		errs = append(errs, fmt.Errorf("integration: Zipf %v must be above 1 (or zero for uniform)", c.Zipf))
	}
	if c.Delta < 0 || c.PhaseDuration < 0 || c.RecoveryBound < 0 || c.OpTimeout < 0 {
		errs = append(errs, errors.New("integration: negative duration in Config"))
	}
	return c, errors.Join(errs...)
}

// DB is the source of truth: a version per key, reachable by every
// instance whatever happens to Redis. Safe for concurrent use.
type DB struct {
	versions []atomic.Int64
	index    map[string]int // read-only after NewFleet
	latency  time.Duration
}

// Version returns key i's current version.
func (d *DB) Version(i int) int64 { return d.versions[i].Load() }

// bump increments key i's version and returns the new one.
func (d *DB) bump(i int) int64 { return d.versions[i].Add(1) }

// Load is the instances' Loader: it reads the version, then takes
// LoadLatency to return it.
func (d *DB) Load(ctx context.Context, key string) (int64, error) {
	i, ok := d.index[key]
	if !ok {
		return 0, tiered.ErrNotFound
	}
	v := d.versions[i].Load()
	if d.latency > 0 {
		t := time.NewTimer(d.latency)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-t.C:
		}
	}
	return v, nil
}

// Instance is one simulated process: its own client, Bus and Cache, and
// over a standalone Redis a fault proxy the client dials through.
type Instance struct {
	ID int
	// Proxy is the fault proxy in front of the standalone Redis; nil in a
	// Fleet from NewClusterFleet or NewFailoverFleet.
	Proxy *faultproxy.Proxy
	// Client is a *redis.Client (through Proxy, or a Sentinel failover
	// client) or a *redis.ClusterClient.
	Client redis.UniversalClient
	Bus    *invalidate.Bus
	Cache  *tiered.Cache[int64]

	// mu is held shared by each write through this instance and exclusively
	// by SetWritable, so SetWritable(false) returns only once no write is in
	// flight here.
	mu       sync.RWMutex
	readOnly bool
}

// SetWritable lets writers use the instance, or not (it keeps serving
// reads). SetWritable(false) waits for the writes already in flight on it.
func (in *Instance) SetWritable(on bool) {
	in.mu.Lock()
	in.readOnly = !on
	in.mu.Unlock()
}

// Fleet is Config.Instances instances of one namespace over one Redis
// deployment, the database they load from, and the load that drives them.
// Its methods are meant for one goroutine (the test's); RunPhase calls are
// sequential.
type Fleet struct {
	cfg   Config
	db    *DB
	keys  []string
	insts []*Instance
	base  time.Time
	// last holds, per key, the last write that returned before the current
	// phase: the floor every read of the phase is checked against.
	last []writeRec
}

// NewFleet starts cfg.Instances instances against the standalone Redis that
// opts describes (opts is copied; each instance dials through its own proxy
// and gets ContextTimeoutEnabled). prefix scopes the Buses' channel and the
// caches' keys. Close the Fleet when done.
func NewFleet(cfg Config, opts *redis.Options, prefix string) (*Fleet, error) {
	return newFleet(cfg, prefix, func() (redis.UniversalClient, *faultproxy.Proxy, error) {
		p, err := faultproxy.Start(opts.Addr)
		if err != nil {
			return nil, nil, fmt.Errorf("proxy: %w", err)
		}
		o := *opts
		o.Addr = p.Addr()
		o.ContextTimeoutEnabled = true
		return redis.NewClient(&o), p, nil
	})
}

// NewClusterFleet starts cfg.Instances instances against the Redis Cluster
// that opts describes, each with its own *redis.ClusterClient (opts is
// copied and gets ContextTimeoutEnabled) and no proxy: a test injects its
// faults into the cluster (a slot migration, a killed master). prefix is as
// for NewFleet. Close the Fleet when done.
func NewClusterFleet(cfg Config, opts *redis.ClusterOptions, prefix string) (*Fleet, error) {
	return newFleet(cfg, prefix, func() (redis.UniversalClient, *faultproxy.Proxy, error) {
		o := *opts
		o.ContextTimeoutEnabled = true
		return redis.NewClusterClient(&o), nil, nil
	})
}

// NewFailoverFleet starts cfg.Instances instances against the Sentinel
// set-up that opts describes, each with its own failover client
// (redis.NewFailoverClient; opts is copied and gets ContextTimeoutEnabled)
// and no proxy. prefix is as for NewFleet. Close the Fleet when done.
func NewFailoverFleet(cfg Config, opts *redis.FailoverOptions, prefix string) (*Fleet, error) {
	return newFleet(cfg, prefix, func() (redis.UniversalClient, *faultproxy.Proxy, error) {
		o := *opts
		o.ContextTimeoutEnabled = true
		return redis.NewFailoverClient(&o), nil, nil
	})
}

// dialFunc makes one instance's client and, over a standalone Redis, the
// proxy it dials through (nil otherwise).
type dialFunc func() (redis.UniversalClient, *faultproxy.Proxy, error)

func newFleet(cfg Config, prefix string, dial dialFunc) (*Fleet, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	f := &Fleet{cfg: cfg, base: time.Now(), last: make([]writeRec, cfg.Keys)}
	f.db = &DB{versions: make([]atomic.Int64, cfg.Keys), index: make(map[string]int, cfg.Keys), latency: max(cfg.LoadLatency, 0)}
	for i := range cfg.Keys {
		k := "k" + strconv.Itoa(i)
		f.keys = append(f.keys, k)
		f.db.index[k] = i
	}
	for i := range cfg.Instances {
		in, err := f.newInstance(i, dial, prefix)
		if err != nil {
			return nil, errors.Join(err, f.Close())
		}
		f.insts = append(f.insts, in)
	}
	return f, nil
}

func (f *Fleet) newInstance(id int, dial dialFunc, prefix string) (*Instance, error) {
	rdb, p, err := dial()
	if err != nil {
		return nil, fmt.Errorf("integration: instance %d: %w", id, err)
	}
	closeConn := func() error {
		err := rdb.Close()
		if p != nil {
			err = errors.Join(err, p.Close())
		}
		return err
	}
	bus, err := invalidate.New(rdb, invalidate.Options{Prefix: prefix, HeartbeatInterval: f.cfg.HeartbeatInterval, HeartbeatTimeout: f.cfg.HeartbeatTimeout})
	if err != nil {
		return nil, errors.Join(fmt.Errorf("integration: instance %d: bus: %w", id, err), closeConn())
	}
	c, err := tiered.New[int64](Namespace, rdb, bus, tiered.Options{KeyPrefix: prefix, CommandTimeout: f.cfg.CommandTimeout})
	if err != nil {
		return nil, errors.Join(fmt.Errorf("integration: instance %d: cache: %w", id, err), bus.Close(), closeConn())
	}
	return &Instance{ID: id, Proxy: p, Client: rdb, Bus: bus, Cache: c}, nil
}

// Keys returns the load's keys, key i at index i (the Zipf skew makes the
// first ones the hottest). The caller owns the slice.
func (f *Fleet) Keys() []string { return slices.Clone(f.keys) }

// Config is the Fleet's configuration, defaults filled in.
func (f *Fleet) Config() Config { return f.cfg }

// Instances returns the Fleet's instances.
func (f *Fleet) Instances() []*Instance { return f.insts }

// DB returns the source of truth.
func (f *Fleet) DB() *DB { return f.db }

// WaitLive waits until every instance's Bus is live or ctx is done.
func (f *Fleet) WaitLive(ctx context.Context) error {
	for _, in := range f.insts {
		if err := in.Bus.WaitLive(ctx); err != nil {
			return fmt.Errorf("integration: instance %d: bus not live: %w", in.ID, err)
		}
	}
	return nil
}

// Close closes the caches, then the Buses, the clients and the proxies (if
// any). It is idempotent in effect (each part's Close is).
func (f *Fleet) Close() error {
	var errs []error
	for _, in := range f.insts {
		errs = append(errs, in.Cache.Close())
	}
	for _, in := range f.insts {
		errs = append(errs, in.Bus.Close())
	}
	for _, in := range f.insts {
		if err := in.Client.Close(); err != nil && !errors.Is(err, redis.ErrClosed) {
			errs = append(errs, err)
		}
	}
	for _, in := range f.insts {
		if in.Proxy != nil {
			errs = append(errs, in.Proxy.Close())
		}
	}
	return errors.Join(errs...)
}

// now is the time since the Fleet started, on the monotonic clock every
// record uses.
func (f *Fleet) now() time.Duration { return time.Since(f.base) }

// Phase is one bounded run of the load, with or without a fault.
type Phase struct {
	Name string
	// Fault injects the phase's fault, keeps it for about window, removes
	// it and returns. It runs on the goroutine that called RunPhase while
	// the load runs; nil means no fault.
	Fault func(ctx context.Context, window time.Duration)
	// Bound is the worst staleness allowed. Zero means Config.Delta (no
	// fault: no violation at all).
	Bound time.Duration
	// Strict also fails the phase on any write error or violation (the
	// no-fault phase).
	Strict bool
}

// PhaseReport is what one phase measured.
type PhaseReport struct {
	Name string
	// Load is how long the load ran; Fault how long the fault lasted.
	Load, Fault time.Duration
	// Reads and Writes count attempts; ReadErrors and WriteErrors the
	// attempts whose cache call failed. A failed write is not used against
	// reads (its invalidation may not have reached anyone).
	Reads, Writes, ReadErrors, WriteErrors int
	// Delta and Bound are the staleness allowed without and with the fault.
	Delta, Bound time.Duration
	// Violations counts reads staler than Delta; OverBound those staler
	// than Bound.
	Violations, OverBound int
	// WorstStaleness is the largest staleness of any read.
	WorstStaleness time.Duration
	// MaxReadLatency is the slowest read.
	MaxReadLatency time.Duration
	// Recovered reports that after the fault every Bus was live again, one
	// write per key succeeded and every instance read it, within
	// Config.RecoveryBound; RecoveryTime is how long that took.
	Recovered    bool
	RecoveryTime time.Duration
	// LastWriteError is when the phase's last failed write ended, from the
	// end of the fault (negative: before the fault ended); WritesAfter
	// counts the writes that began after it, all of which returned. Both
	// are zero when no write failed.
	LastWriteError time.Duration
	WritesAfter    int
	// Strict is Phase.Strict.
	Strict bool
	// Notes carry evidence: per-instance read errors, error samples, the
	// worst read, why recovery failed.
	Notes []string
}

// Failures lists the bars the phase missed; empty means it passed.
func (r PhaseReport) Failures() []string {
	var out []string
	if r.Reads == 0 || r.Writes == 0 {
		out = append(out, fmt.Sprintf("no load: %d reads, %d writes", r.Reads, r.Writes))
	}
	if r.WorstStaleness > r.Bound {
		out = append(out, fmt.Sprintf("worst staleness %v exceeds the bound %v (%d reads over it)", fmtDur(r.WorstStaleness), fmtDur(r.Bound), r.OverBound))
	}
	if r.Strict && r.Violations > 0 && r.Bound > r.Delta {
		out = append(out, fmt.Sprintf("%d violations at δ = %v", r.Violations, fmtDur(r.Delta)))
	}
	if r.ReadErrors > 0 {
		out = append(out, fmt.Sprintf("%d read errors, though the loader could serve every read", r.ReadErrors))
	}
	if r.Strict && r.WriteErrors > 0 {
		out = append(out, fmt.Sprintf("%d write errors with no fault", r.WriteErrors))
	}
	if !r.Recovered {
		out = append(out, "did not recover within the bound")
	}
	return out
}

// FormatTable renders reports as a Markdown table, followed by each
// phase's failures and notes.
func FormatTable(reports []PhaseReport) string {
	var b strings.Builder
	b.WriteString("| phase | reads | read errors | writes | write errors | violations (δ) | worst staleness | bound | over bound | slowest read | recovered | result |\n")
	b.WriteString("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|\n")
	for _, r := range reports {
		rec := "no"
		if r.Recovered {
			rec = "yes, " + fmtDur(r.RecoveryTime)
		}
		result := "pass"
		if len(r.Failures()) > 0 {
			result = "**FAIL**"
		}
		fmt.Fprintf(&b, "| %s | %d | %d | %d | %d | %d (%v) | %v | %v | %d | %v | %s | %s |\n",
			r.Name, r.Reads, r.ReadErrors, r.Writes, r.WriteErrors, r.Violations, fmtDur(r.Delta),
			fmtDur(r.WorstStaleness), fmtDur(r.Bound), r.OverBound, fmtDur(r.MaxReadLatency), rec, result)
	}
	for _, r := range reports {
		fails, notes := r.Failures(), r.Notes
		if len(fails)+len(notes) == 0 {
			continue
		}
		fmt.Fprintf(&b, "\n%s:\n", r.Name)
		for _, s := range fails {
			fmt.Fprintf(&b, "- FAIL: %s\n", s)
		}
		for _, s := range notes {
			fmt.Fprintf(&b, "- %s\n", s)
		}
	}
	return b.String()
}

// fmtDur rounds d for a table: milliseconds, or microseconds below one.
func fmtDur(d time.Duration) string {
	switch {
	case d == 0:
		return "0"
	case d < time.Millisecond:
		return d.Round(time.Microsecond).String()
	case d < 10*time.Second:
		return d.Round(time.Millisecond).String()
	}
	return d.Round(100 * time.Millisecond).String()
}

// writeRec and readRec are the records of one operation; times are since
// the Fleet's base.
type writeRec struct {
	start, end time.Duration
	version    int64
	key        int32
	inst       int16
	ok         bool // the cache call succeeded: the write returned
}

type readRec struct {
	start, end time.Duration
	version    int64
	key        int32
	inst       int16
	ok         bool
}

// errSample counts distinct error texts, keeping at most maxSamples.
type errSample map[string]int

const maxSamples = 4

// addrRE matches host:port pairs, whose ephemeral ports would make every
// sample distinct.
var addrRE = regexp.MustCompile(`\b\d{1,3}(\.\d{1,3}){3}:\d+\b`)

func (s errSample) add(what string, err error) {
	k := what + ": " + addrRE.ReplaceAllString(err.Error(), "ADDR")
	if _, ok := s[k]; ok || len(s) < maxSamples {
		s[k]++
	}
}

// worker is one load goroutine's private records.
type worker struct {
	reads  []readRec
	writes []writeRec
	errs   errSample
}

// RunPhase runs p: the load for Config.PhaseDuration with p.Fault in its
// middle, then the recovery probe, then the check of the records. A
// panic or runtime.Goexit in p.Fault (a failed test) stops the load before
// it propagates.
func (f *Fleet) RunPhase(ctx context.Context, p Phase) PhaseReport {
	cfg := f.cfg
	rep := PhaseReport{Name: p.Name, Delta: cfg.Delta, Bound: p.Bound, Strict: p.Strict}
	if rep.Bound == 0 {
		rep.Bound = cfg.Delta
	}
	seeds := slices.Clone(f.last)
	reconnects := make([]uint64, len(f.insts))
	for i, in := range f.insts {
		reconnects[i] = in.Bus.Stats().Reconnects
	}

	watchStop := make(chan struct{})
	watchDone := make(chan [][]interval, 1)
	go func() { watchDone <- f.watchBuses(watchStop) }()
	defer func() {
		if watchStop != nil {
			close(watchStop)
			<-watchDone
		}
	}()

	wctx, cancel := context.WithTimeout(ctx, cfg.RecoveryBound)
	if err := f.WaitLive(wctx); err != nil {
		rep.Notes = append(rep.Notes, "before the phase: "+err.Error())
	}
	cancel()

	stop := make(chan struct{})
	var wg sync.WaitGroup
	nr := cfg.Instances * cfg.ReadersPerInstance
	workers := make([]worker, cfg.Writers+nr)
	for w := range cfg.Writers {
		wg.Go(func() { f.writer(ctx, w, &workers[w], stop) })
	}
	for r := range nr {
		wg.Go(func() { f.reader(ctx, f.insts[r%cfg.Instances], &workers[cfg.Writers+r], stop) })
	}
	loadStart := time.Now()
	stopped := false
	stopLoad := func() {
		if !stopped {
			stopped = true
			close(stop)
			wg.Wait()
		}
	}
	defer stopLoad() // also when Fault fails the test

	// The phase's length is the point of these waits, not an event.
	window := cfg.PhaseDuration / 2
	hold(ctx, cfg.PhaseDuration/4)
	faultStart := time.Now()
	if p.Fault != nil {
		p.Fault(ctx, window)
	} else {
		hold(ctx, window)
	}
	rep.Fault = time.Since(faultStart)
	hold(ctx, max(cfg.PhaseDuration-time.Since(loadStart), cfg.PhaseDuration/4))
	stopLoad()
	rep.Load = time.Since(loadStart)

	// Gather the records.
	var reads []readRec
	var writes []writeRec
	readErrs, writeErrs := errSample{}, errSample{}
	for i, w := range workers {
		reads = append(reads, w.reads...)
		writes = append(writes, w.writes...)
		errs := readErrs
		if i < cfg.Writers {
			errs = writeErrs
		}
		for k, n := range w.errs {
			if _, ok := errs[k]; ok || len(errs) < 4*maxSamples {
				errs[k] += n
			}
		}
	}
	for _, w := range writes {
		if w.ok && w.version > f.last[w.key].version {
			f.last[w.key] = w
		}
	}

	rep.Recovered, rep.RecoveryTime = f.probe(ctx, &rep)
	close(watchStop)
	watchStop = nil
	dead := <-watchDone
	for i, in := range f.insts {
		reconnects[i] = in.Bus.Stats().Reconnects - reconnects[i]
	}
	if note := deadNote(dead); note != "" {
		rep.Notes = append(rep.Notes, note)
	}
	if slices.ContainsFunc(reconnects, func(n uint64) bool { return n > 0 }) {
		rep.Notes = append(rep.Notes, fmt.Sprintf("Bus resubscriptions by instance: %v", reconnects))
	}

	rep.Reads, rep.Writes = len(reads), len(writes)
	perInst := make([]int, cfg.Instances)
	for _, r := range reads {
		if !r.ok {
			rep.ReadErrors++
			perInst[r.inst]++
		}
		rep.MaxReadLatency = max(rep.MaxReadLatency, r.end-r.start)
	}
	ok := 0
	lastErr := time.Duration(-1)
	for _, w := range writes {
		if w.ok {
			ok++
		} else {
			rep.WriteErrors++
			lastErr = max(lastErr, w.end)
		}
	}
	if rep.WriteErrors > 0 {
		faultEnd := faultStart.Sub(f.base) + rep.Fault
		rep.LastWriteError = lastErr - faultEnd
		for _, w := range writes {
			if w.start > lastErr {
				rep.WritesAfter++
			}
		}
		rel := fmtDur(rep.LastWriteError) + " after"
		if rep.LastWriteError < 0 {
			rel = fmtDur(-rep.LastWriteError) + " before"
		}
		rep.Notes = append(rep.Notes, fmt.Sprintf("the last failed write ended %s the fault ended; %d writes began after it, and all returned", rel, rep.WritesAfter))
	}
	st := analyze(cfg.Keys, seeds, writes, reads, cfg.Delta, rep.Bound)
	rep.Violations, rep.OverBound, rep.WorstStaleness = st.violations, st.overBound, st.worst
	if ok == 0 {
		rep.Notes = append(rep.Notes, "no write returned: the staleness check had nothing to check against")
	}
	if rep.ReadErrors > 0 {
		rep.Notes = append(rep.Notes, fmt.Sprintf("read errors by instance: %v", perInst))
	}
	if st.behind > 0 {
		rep.Notes = append(rep.Notes, fmt.Sprintf("%d reads were behind a returned write, %d of them by more than δ", st.behind, st.violations))
	}
	if st.overBound > 0 {
		by := make([]int, cfg.Instances)
		for i, n := range st.overByInst {
			by[i] = n
		}
		rep.Notes = append(rep.Notes, fmt.Sprintf("reads over the bound by instance: %v, of %d keys, begun between %v and %v",
			by, len(st.overKeys), fmtDur(st.overFrom), fmtDur(st.overTo)))
	}
	if st.worst > 0 {
		r := st.worstRead
		rep.Notes = append(rep.Notes, fmt.Sprintf("stalest read: %s on instance %d began at %v (fault began at %v) and saw v%d; v%d had returned %v earlier (written through instance %d)",
			f.keys[r.key], r.inst, fmtDur(r.start), fmtDur(faultStart.Sub(f.base)), r.version, st.worstNewer.version, fmtDur(st.worst), st.worstNewer.inst))
	}
	for _, errs := range []errSample{readErrs, writeErrs} {
		for _, k := range sortedSamples(errs) {
			rep.Notes = append(rep.Notes, fmt.Sprintf("%d× %s", errs[k], k))
		}
	}
	return rep
}

// sortedSamples returns the texts of s, most frequent first.
func sortedSamples(s errSample) []string {
	keys := make([]string, 0, len(s))
	for k := range s {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b string) int {
		if c := cmp.Compare(s[b], s[a]); c != 0 {
			return c
		}
		return strings.Compare(a, b)
	})
	return keys[:min(len(keys), maxSamples)]
}

// interval is a stretch of time since the Fleet's base.
type interval struct{ from, to time.Duration }

// watchBuses samples every Bus's epoch every 2 ms until stop and returns,
// per instance, the stretches during which it was dead (odd epoch): the
// evidence for when an instance bypassed its L1. Stretches shorter than
// the sampling are missed (Bus.Stats().Reconnects counts those).
func (f *Fleet) watchBuses(stop <-chan struct{}) [][]interval {
	out := make([][]interval, len(f.insts))
	deadSince := make([]time.Duration, len(f.insts))
	for i := range deadSince {
		deadSince[i] = -1
	}
	t := time.NewTicker(2 * time.Millisecond)
	defer t.Stop()
	for {
		now := f.now()
		for i, in := range f.insts {
			switch dead := !in.Bus.Live(); {
			case dead && deadSince[i] < 0:
				deadSince[i] = now
			case !dead && deadSince[i] >= 0:
				out[i] = append(out[i], interval{deadSince[i], now})
				deadSince[i] = -1
			}
		}
		select {
		case <-stop:
			for i, d := range deadSince {
				if d >= 0 {
					out[i] = append(out[i], interval{d, -1})
				}
			}
			return out
		case <-t.C:
		}
	}
}

// deadNote describes the dead stretches of each instance's Bus; "" if none.
func deadNote(dead [][]interval) string {
	var b strings.Builder
	for i, ivs := range dead {
		if len(ivs) == 0 {
			continue
		}
		fmt.Fprintf(&b, "; instance %d:", i)
		for j, iv := range ivs {
			if j == 3 {
				fmt.Fprintf(&b, " and %d more", len(ivs)-j)
				break
			}
			if iv.to < 0 {
				fmt.Fprintf(&b, " %v–(still dead)", fmtDur(iv.from))
			} else {
				fmt.Fprintf(&b, " %v–%v (%v)", fmtDur(iv.from), fmtDur(iv.to), fmtDur(iv.to-iv.from))
			}
		}
	}
	if b.Len() == 0 {
		return ""
	}
	return "Bus dead (L1 bypassed)" + b.String()[1:]
}

// hold waits d or until ctx is done.
func hold(ctx context.Context, d time.Duration) {
	if d <= 0 {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// stopped reports whether stop is closed.
func stopped(stop <-chan struct{}) bool {
	select {
	case <-stop:
		return true
	default:
		return false
	}
}

// writer owns the keys k with k % Writers == w and writes them in turn
// through the writable instances, in rotation: the database first, then
// the cache (Delete and Set alternately).
func (f *Fleet) writer(ctx context.Context, w int, rec *worker, stop <-chan struct{}) {
	rec.errs = errSample{}
	var mine []int
	for k := w; k < f.cfg.Keys; k += f.cfg.Writers {
		mine = append(mine, k)
	}
	for i := 0; !stopped(stop); i++ {
		k := mine[i%len(mine)]
		// round shifts the rotation each pass over mine, so that every key
		// is written through every instance, by Delete and by Set, even
		// when len(mine) is a multiple of the instances (or of 2).
		round := i / len(mine)
		in := f.insts[(w+i+round)%len(f.insts)]
		in.mu.RLock()
		if in.readOnly {
			in.mu.RUnlock()
			continue // the next instance in the rotation
		}
		start := f.now()
		v := f.db.bump(k)
		octx, cancel := context.WithTimeout(ctx, f.cfg.OpTimeout)
		var err error
		if (i+round)%2 == 0 {
			err = in.Cache.Delete(octx, f.keys[k])
		} else {
			err = in.Cache.Set(octx, f.keys[k], v, 0)
		}
		cancel()
		end := f.now()
		in.mu.RUnlock()
		rec.writes = append(rec.writes, writeRec{start: start, end: end, version: v, key: int32(k), inst: int16(in.ID), ok: err == nil})
		if err != nil {
			rec.errs.add(fmt.Sprintf("write through instance %d", in.ID), err)
		}
		pause(f.cfg.WriteInterval)
	}
}

// reader reads random keys on in through Remember until stop.
func (f *Fleet) reader(ctx context.Context, in *Instance, rec *worker, stop <-chan struct{}) {
	rec.errs = errSample{}
	rng := rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
	next := func() int { return rng.IntN(f.cfg.Keys) }
	if f.cfg.Zipf > 1 {
		z := rand.NewZipf(rng, f.cfg.Zipf, 1, uint64(f.cfg.Keys-1))
		next = func() int { return int(z.Uint64()) }
	}
	for !stopped(stop) {
		k := next()
		start := f.now()
		octx, cancel := context.WithTimeout(ctx, f.cfg.OpTimeout)
		v, err := in.Cache.Remember(octx, f.keys[k], f.db.Load)
		cancel()
		end := f.now()
		rec.reads = append(rec.reads, readRec{start: start, end: end, version: v, key: int32(k), inst: int16(in.ID), ok: err == nil})
		if err != nil {
			rec.errs.add(fmt.Sprintf("read on instance %d", in.ID), err)
		}
		pause(f.cfg.ReadInterval)
	}
}

func pause(d time.Duration) {
	if d > 0 {
		time.Sleep(d) // pacing the load, not waiting for anything
	}
}

// probeKeys is how many keys the recovery probe writes and reads back.
const probeKeys = 32

// probe checks recovery after a phase, with no load and no fault: every
// Bus live, one successful write for each of up to probeKeys keys (through
// the instances in rotation), and every instance reading each new version,
// all within RecoveryBound. The probe's writes become the floor of the next
// phase.
func (f *Fleet) probe(ctx context.Context, rep *PhaseReport) (bool, time.Duration) {
	start := time.Now()
	pctx, cancel := context.WithTimeout(ctx, f.cfg.RecoveryBound)
	defer cancel()
	fail := func(format string, args ...any) (bool, time.Duration) {
		rep.Notes = append(rep.Notes, "recovery: "+fmt.Sprintf(format, args...))
		return false, time.Since(start)
	}
	if err := f.WaitLive(pctx); err != nil {
		return fail("%v after %v", err, fmtDur(time.Since(start)))
	}
	var sample []int
	for j := range min(f.cfg.Keys, probeKeys) {
		sample = append(sample, j*f.cfg.Keys/min(f.cfg.Keys, probeKeys))
	}
	// Polling: a failed write or a stale read has no event to wait for.
	const retry = 5 * time.Millisecond
	want := make([]int64, f.cfg.Keys)
	for j, k := range sample {
		in := f.insts[j%len(f.insts)]
		for {
			s := f.now()
			v := f.db.bump(k)
			err := in.Cache.Delete(pctx, f.keys[k])
			if err == nil {
				want[k] = v
				f.last[k] = writeRec{start: s, end: f.now(), version: v, key: int32(k), inst: int16(in.ID), ok: true}
				break
			}
			if pctx.Err() != nil {
				return fail("write of %s through instance %d: %v", f.keys[k], in.ID, err)
			}
			hold(pctx, retry)
		}
	}
	stuck := make([]string, len(f.insts))
	var wg sync.WaitGroup
	for i, in := range f.insts {
		wg.Go(func() {
			for _, k := range sample {
				for {
					v, err := in.Cache.Remember(pctx, f.keys[k], f.db.Load)
					if err == nil && v >= want[k] {
						break
					}
					if pctx.Err() != nil {
						stuck[i] = fmt.Sprintf("instance %d reads %s = v%d, %v; want ≥ v%d", in.ID, f.keys[k], v, err, want[k])
						return
					}
					hold(pctx, retry)
				}
			}
		})
	}
	wg.Wait()
	took := time.Since(start)
	for _, s := range stuck {
		if s != "" {
			rep.Notes = append(rep.Notes, "recovery: "+s)
			return false, took
		}
	}
	return true, took
}

// staleness is the result of analyze.
type staleness struct {
	behind                int // reads behind a returned write at all
	violations, overBound int
	worst                 time.Duration
	worstRead             readRec
	worstNewer            writeRec // the earliest returned write newer than worstRead saw
	// The reads over the bound: how many per instance, their keys, and the
	// span of their start times.
	overByInst       map[int16]int
	overKeys         map[int32]bool
	overFrom, overTo time.Duration
}

// analyze checks reads against the writes that had returned before each
// began. seeds holds, per key, the last write returned before the records
// (ok false: none). A read's staleness is its start minus the return of the
// earliest write newer than what it saw (0 if none had returned); it is a
// violation above delta and over the bound above bound. O(n log n).
func analyze(keys int, seeds, writes []writeRec, reads []readRec, delta, bound time.Duration) staleness {
	type history struct {
		ends  []time.Duration // return times, ascending
		vmax  []int64         // the newest version returned by then
		first []writeRec      // the write that first reached vmax[i]
	}
	byKey := make([][]writeRec, keys)
	for _, w := range seeds {
		if w.ok {
			byKey[w.key] = append(byKey[w.key], w)
		}
	}
	for _, w := range writes {
		if w.ok {
			byKey[w.key] = append(byKey[w.key], w)
		}
	}
	hs := make([]history, keys)
	for k, ws := range byKey {
		sort.Slice(ws, func(i, j int) bool { return ws[i].end < ws[j].end })
		h := &hs[k]
		var top writeRec
		for i, w := range ws {
			if i == 0 || w.version > top.version {
				top = w
			}
			h.ends = append(h.ends, w.end)
			h.vmax = append(h.vmax, top.version)
			h.first = append(h.first, top)
		}
	}
	var st staleness
	for _, r := range reads {
		if !r.ok {
			continue
		}
		h := &hs[r.key]
		n := sort.Search(len(h.ends), func(i int) bool { return h.ends[i] >= r.start }) // returned before r began
		if n == 0 || h.vmax[n-1] <= r.version {
			continue
		}
		j := sort.Search(n, func(i int) bool { return h.vmax[i] > r.version }) // the first newer one
		s := r.start - h.ends[j]
		st.behind++
		if s > delta {
			st.violations++
		}
		if s > bound {
			if st.overBound == 0 {
				st.overByInst, st.overKeys = map[int16]int{}, map[int32]bool{}
				st.overFrom, st.overTo = r.start, r.start
			}
			st.overBound++
			st.overByInst[r.inst]++
			st.overKeys[r.key] = true
			st.overFrom, st.overTo = min(st.overFrom, r.start), max(st.overTo, r.start)
		}
		if s > st.worst {
			st.worst, st.worstRead, st.worstNewer = s, r, h.first[j]
		}
	}
	return st
}
