package load

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"
)

// Result is what a run measured. Its JSON form is what WriteJSON writes.
type Result struct {
	Started time.Time `json:"started"`
	// Targets are the instances' URLs; Instances their INSTANCE_IDs.
	Targets   []string `json:"targets"`
	Instances []string `json:"instances"`
	// CacheType is the instances' cache mode ("tiered", "memory", "redis",
	// "off"), as the first one reported it.
	CacheType string   `json:"cacheType"`
	Settings  Settings `json:"settings"`

	// The figures below cover the measured window (after the warm-up),
	// except Coherence, which checks every read. WarmupSeconds is when the
	// warm-up ended; ElapsedSeconds how long the measured window lasted.
	WarmupSeconds  float64 `json:"warmupSeconds"`
	ElapsedSeconds float64 `json:"elapsedSeconds"`
	Requests       int64   `json:"requests"`
	Errors         int64   `json:"errors"`
	// ErrorKinds counts errors by request kind and cause ("write HTTP 503")
	// over the whole run, warm-up included; ErrorExamples holds the last
	// message of each.
	ErrorKinds    map[string]int64  `json:"errorKinds,omitempty"`
	ErrorExamples map[string]string `json:"errorExamples,omitempty"`
	Throughput    float64           `json:"throughput"` // requests per second
	Latency       Latency           `json:"latencyMs"`
	Ops           map[string]Op     `json:"ops"`
	Coherence     Coherence         `json:"coherence"`
	Cache         Cache             `json:"cache"`
	Series        []Point           `json:"series"`
	// ScrapeErrors counts scrapes of the instances' counters that failed.
	ScrapeErrors int `json:"scrapeErrors"`
}

// Settings records the Config the run used.
type Settings struct {
	Duration       string  `json:"duration"`
	Warmup         string  `json:"warmup"`
	Requests       int64   `json:"requests,omitempty"`
	WarmupRequests int64   `json:"warmupRequests,omitempty"`
	Rate           float64 `json:"rate"` // 0: flat out
	Concurrency    int     `json:"concurrency"`
	Mix            Mix     `json:"mix"`
	Users          int     `json:"users"`
	Zipf           float64 `json:"zipf"`
	Pages          int     `json:"pages"`
	Limit          int     `json:"limit"`
	Delta          string  `json:"delta"`
	Interval       string  `json:"interval"`
	Seed           uint64  `json:"seed"`
}

// Latency summarizes successful requests' latencies, in milliseconds.
type Latency struct {
	P50  float64 `json:"p50"`
	P95  float64 `json:"p95"`
	P99  float64 `json:"p99"`
	P999 float64 `json:"p999"`
	Max  float64 `json:"max"`
	Mean float64 `json:"mean"`
}

func latency(h *hdrhistogram.Histogram) Latency {
	q := func(p float64) float64 { return float64(h.ValueAtQuantile(p)) / 1000 }
	return Latency{P50: q(50), P95: q(95), P99: q(99), P999: q(99.9), Max: float64(h.Max()) / 1000, Mean: h.Mean() / 1000}
}

// Op is one kind of request's figures.
type Op struct {
	Requests int64   `json:"requests"`
	Errors   int64   `json:"errors"`
	Latency  Latency `json:"latencyMs"`
}

// Cache is what the instances' counters say about the measured window,
// added up over the instances. Ratios are absent (null) when the tier
// answered no read (memory mode has no L2; "off" has no cache).
type Cache struct {
	Available  bool     `json:"available"`
	L1Hits     uint64   `json:"l1Hits"`
	L1Misses   uint64   `json:"l1Misses"`
	L1HitRatio *float64 `json:"l1HitRatio"`
	L2Hits     uint64   `json:"l2Hits"`
	L2Misses   uint64   `json:"l2Misses"`
	L2HitRatio *float64 `json:"l2HitRatio"`
	// ServerRequests are API requests the instances counted; DBQueries the
	// queries they made.
	ServerRequests      uint64   `json:"serverRequests"`
	DBQueries           uint64   `json:"dbQueries"`
	DBQueriesPerRequest *float64 `json:"dbQueriesPerRequest"`
	// PerInstance has the same figures for each instance.
	PerInstance []InstanceFigures `json:"perInstance,omitempty"`
}

// InstanceFigures is one instance's share of Cache.
type InstanceFigures struct {
	Instance            string   `json:"instance"`
	Requests            uint64   `json:"requests"`
	DBQueries           uint64   `json:"dbQueries"`
	L1HitRatio          *float64 `json:"l1HitRatio"`
	L2HitRatio          *float64 `json:"l2HitRatio"`
	DBQueriesPerRequest *float64 `json:"dbQueriesPerRequest"`
}

// Point is one interval of the time series.
type Point struct {
	T        float64 `json:"t"` // seconds since the start, at the interval's start
	Warmup   bool    `json:"warmup,omitempty"`
	Requests int64   `json:"requests"`
	Errors   int64   `json:"errors"`
	RPS      float64 `json:"rps"`
	// Latency percentiles of the interval's successful requests, in ms.
	P50 *float64 `json:"p50"`
	P95 *float64 `json:"p95"`
	P99 *float64 `json:"p99"`
	// From the counters scraped at the interval's ends.
	L1HitRatio          *float64 `json:"l1HitRatio"`
	L2HitRatio          *float64 `json:"l2HitRatio"`
	DBQueriesPerRequest *float64 `json:"dbQueriesPerRequest"`
}

func ratio(num, den uint64) *float64 {
	if den == 0 {
		return nil
	}
	r := float64(num) / float64(den)
	return &r
}

func ptr(f float64) *float64 { return &f }

// delta is b's counters minus a's.
func delta(a, b InstanceStats) InstanceStats {
	return InstanceStats{
		Instance:  b.Instance,
		Requests:  b.Requests - a.Requests,
		DBQueries: b.DBQueries - a.DBQueries,
		L1:        Tier{b.L1.Hits - a.L1.Hits, b.L1.Misses - a.L1.Misses},
		L2:        Tier{b.L2.Hits - a.L2.Hits, b.L2.Misses - a.L2.Misses},
	}
}

// result assembles the Result of a run that lasted elapsed.
func (r *run) result(first InstanceStats, sc *scraper, reads []readRec, writes []writeRec, elapsed time.Duration) *Result {
	cfg := r.cfg
	warm := min(time.Duration(r.warm.Load()), elapsed) // notYet: the run ended in its warm-up
	res := &Result{
		Started:   r.base,
		Targets:   cfg.Targets,
		CacheType: first.CacheType,
		Settings: Settings{
			Duration: cfg.Duration.String(), Warmup: cfg.Warmup.String(), Requests: cfg.Requests, WarmupRequests: cfg.WarmupRequests,
			Rate: cfg.Rate, Concurrency: cfg.Concurrency,
			Mix: cfg.Mix, Users: cfg.Users, Zipf: cfg.Zipf, Pages: cfg.Pages, Limit: cfg.Limit,
			Delta: cfg.Delta.String(), Interval: cfg.Interval.String(), Seed: cfg.Seed,
		},
		WarmupSeconds:  warm.Seconds(),
		ElapsedSeconds: (elapsed - warm).Seconds(),
		ErrorKinds:     r.errKind,
		ErrorExamples:  r.errLast,
		Ops:            map[string]Op{},
		Coherence:      check(reads, writes, cfg.Delta, cfg.Targets),
		ScrapeErrors:   sc.errors,
	}
	all := newHist()
	for op := range numOps {
		all.Merge(r.opHist[op])
		res.Requests += r.opCount[op]
		res.Errors += r.opErrs[op]
		res.Ops[opNames[op]] = Op{Requests: r.opCount[op], Errors: r.opErrs[op], Latency: latency(r.opHist[op])}
	}
	res.Latency = latency(all)
	if res.ElapsedSeconds > 0 {
		res.Throughput = float64(res.Requests) / res.ElapsedSeconds
	}

	// The time series: one point per interval that began before the end.
	for i := range r.buckets {
		b := &r.buckets[i]
		t0 := time.Duration(i) * cfg.Interval
		if t0 >= elapsed {
			break
		}
		span := min(cfg.Interval, elapsed-t0)
		p := Point{T: t0.Seconds(), Warmup: t0 < warm, Requests: b.count, Errors: b.errors, RPS: float64(b.count) / span.Seconds()}
		if b.hist != nil && b.hist.TotalCount() > 0 {
			l := latency(b.hist)
			p.P50, p.P95, p.P99 = ptr(l.P50), ptr(l.P95), ptr(l.P99)
		}
		res.Series = append(res.Series, p)
	}
	for k := 1; k < len(sc.snaps); k++ {
		a, b := sc.snaps[k-1], sc.snaps[k]
		i := int(math.Round(float64(b.at)/float64(cfg.Interval))) - 1
		if i < 0 || i >= len(res.Series) || b.at-a.at < cfg.Interval/4 {
			continue
		}
		d := delta(a.sum(), b.sum())
		p := &res.Series[i]
		p.L1HitRatio = ratio(d.L1.Hits, d.L1.Hits+d.L1.Misses)
		p.L2HitRatio = ratio(d.L2.Hits, d.L2.Hits+d.L2.Misses)
		p.DBQueriesPerRequest = ratio(d.DBQueries, d.Requests)
	}

	// Totals over the measured window: from the snapshot taken at the
	// warm-up's end (or the start) to the last one.
	i := sc.baseline
	if warm >= elapsed || i >= len(sc.snaps)-1 || (i == 0 && warm > 0) {
		return res // no snapshot bounds the window
	}
	from, to := sc.snaps[i], sc.snaps[len(sc.snaps)-1]
	d := delta(from.sum(), to.sum())
	res.Cache = Cache{
		Available: true,
		L1Hits:    d.L1.Hits, L1Misses: d.L1.Misses, L1HitRatio: ratio(d.L1.Hits, d.L1.Hits+d.L1.Misses),
		L2Hits: d.L2.Hits, L2Misses: d.L2.Misses, L2HitRatio: ratio(d.L2.Hits, d.L2.Hits+d.L2.Misses),
		ServerRequests: d.Requests, DBQueries: d.DBQueries, DBQueriesPerRequest: ratio(d.DBQueries, d.Requests),
	}
	for j := range to.inst {
		d := delta(from.inst[j], to.inst[j])
		res.Instances = append(res.Instances, to.inst[j].Instance)
		res.Cache.PerInstance = append(res.Cache.PerInstance, InstanceFigures{
			Instance: to.inst[j].Instance, Requests: d.Requests, DBQueries: d.DBQueries,
			L1HitRatio: ratio(d.L1.Hits, d.L1.Hits+d.L1.Misses), L2HitRatio: ratio(d.L2.Hits, d.L2.Hits+d.L2.Misses),
			DBQueriesPerRequest: ratio(d.DBQueries, d.Requests),
		})
	}
	return res
}

// WriteJSON writes the result, indented, to path.
func (res *Result) WriteJSON(path string) error {
	b, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

func pct(p *float64) string {
	if p == nil {
		return "n/a"
	}
	return fmt.Sprintf("%.1f%%", 100**p)
}

// Describe is a one-line account of the settings.
func (res *Result) Describe() string {
	s := res.Settings
	rate := fmt.Sprintf("flat out, %d workers", s.Concurrency)
	if s.Rate > 0 {
		rate = fmt.Sprintf("%.0f req/s target, %d workers", s.Rate, s.Concurrency)
	}
	warm := ""
	if res.WarmupSeconds > 0 {
		warm = fmt.Sprintf(" after a %.1fs warm-up", res.WarmupSeconds)
	}
	dur := s.Duration
	if d, err := time.ParseDuration(s.Duration); err == nil && res.ElapsedSeconds < d.Seconds()*0.95 {
		dur = fmt.Sprintf("%.1fs of %s (stopped early)", res.ElapsedSeconds, s.Duration)
	}
	if s.Requests > 0 {
		dur = fmt.Sprintf("%.1fs (at least %s and %d requests)", res.ElapsedSeconds, s.Duration, s.Requests)
	}
	return fmt.Sprintf("%d instances (cache %s), %s%s, %s; %s; Zipf %.2f over %d users",
		len(res.Targets), res.CacheType, dur, warm, rate, s.Mix, s.Zipf, s.Users)
}

// WriteSummary prints the figures a person reads first.
func (res *Result) WriteSummary(w io.Writer) {
	c := res.Coherence
	fmt.Fprintf(w, "tiercache load: %s\n", res.Describe())
	fmt.Fprintf(w, "  throughput   %.0f req/s (%d requests in %.1fs), %d errors\n", res.Throughput, res.Requests, res.ElapsedSeconds, res.Errors)
	fmt.Fprintf(w, "  latency      p50 %.2f ms   p95 %.2f ms   p99 %.2f ms   max %.1f ms\n", res.Latency.P50, res.Latency.P95, res.Latency.P99, res.Latency.Max)
	for _, name := range opNames {
		op := res.Ops[name]
		fmt.Fprintf(w, "    %-6s %8d requests, %d errors, p50 %.2f ms, p99 %.2f ms\n", name, op.Requests, op.Errors, op.Latency.P50, op.Latency.P99)
	}
	if res.Cache.Available {
		fmt.Fprintf(w, "  hit ratio    L1 %s   L2 %s   (scraped from the instances)\n", pct(res.Cache.L1HitRatio), pct(res.Cache.L2HitRatio))
		dbq := "n/a"
		if res.Cache.DBQueriesPerRequest != nil {
			dbq = fmt.Sprintf("%.3f", *res.Cache.DBQueriesPerRequest)
		}
		fmt.Fprintf(w, "  database     %s queries per request (%d queries, %d requests)\n", dbq, res.Cache.DBQueries, res.Cache.ServerRequests)
	} else {
		fmt.Fprintf(w, "  hit ratio    not available (%d scrapes of the instances failed)\n", res.ScrapeErrors)
	}
	verdict := "OK"
	if c.Stale() {
		verdict = "STALE READS"
	}
	fmt.Fprintf(w, "  coherence    %s: %d stale reads of %d checked against %d writes (δ = %.0f ms); %d late within δ, worst lag %.1f ms\n",
		verdict, c.StaleReads, c.Reads, c.Writes, c.DeltaMs, c.LateReads, c.WorstLagMs)
	for _, e := range c.Examples[:min(3, len(c.Examples))] {
		fmt.Fprintf(w, "    user %d on %s at %.0f ms saw v%d, v%d had returned %.0f ms before\n", e.User, e.Instance, e.StartMs, e.Saw, e.Newer, e.LagMs)
	}
	fmt.Fprintf(w, "  read-back    %d stale of %d reads of every written user on every instance after the load (%d failed)\n",
		len(c.FinalStale), c.FinalReads, c.FinalErrors)
	for _, e := range c.FinalStale[:min(3, len(c.FinalStale))] {
		fmt.Fprintf(w, "    user %d on %s saw v%d after v%d had been seen\n", e.User, e.Instance, e.Saw, e.Newest)
	}
	if len(res.ErrorKinds) > 0 {
		for _, k := range slices.Sorted(maps.Keys(res.ErrorKinds)) {
			fmt.Fprintf(w, "  error        %s ×%d, e.g. %s\n", k, res.ErrorKinds[k], strings.TrimSpace(res.ErrorExamples[k]))
		}
	}
}
