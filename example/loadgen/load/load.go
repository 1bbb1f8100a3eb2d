// Package load drives several instances of the example app at once and
// checks what they answer.
//
// Workers send a mix of requests (read a user, list a page of licenses,
// update a user) to instances picked at random, over a Zipf distribution of
// users (hot users first), at a target rate or flat out, for a duration.
// Every update returns the version the database gave it, and every read
// the version it saw; afterwards each read is checked against the writes
// that returned before it began (see [Coherence]). Meanwhile the instances'
// counters (hits per cache tier, database queries) are scraped every
// interval, for the hit ratios and the database queries per request.
//
// [Run] returns a [Result]: the summary figures and a time series, which
// [Result.WriteSummary], [Result.WriteJSON] and [Result.WriteHTML] render.
package load

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"
	"github.com/schollz/progressbar/v3"
)

// Defaults for Config.
const (
	DefaultDuration    = 20 * time.Second
	DefaultConcurrency = 32
	DefaultZipf        = 1.1
	DefaultPages       = 50
	DefaultLimit       = 20
	DefaultDelta       = 100 * time.Millisecond
	DefaultTimeout     = 5 * time.Second
	DefaultInterval    = time.Second
)

// DefaultMix is the default request mix of a read-heavy API: 98% reads
// (88% users, 10% pages of licenses) and 2% updates. Every update costs one
// L1 miss on every instance that reads the user next, so with three
// instances each point of writes takes about three points off the L1 hit
// ratio (docs/benchmarks.md shows 5% writes too).
var DefaultMix = Mix{Read: 88, List: 10, Write: 2}

// Config says what load to send where. The zero value of every field but
// Targets means its default.
type Config struct {
	// Targets are the instances' base URLs (http://host:port).
	Targets []string
	// Duration is how long the measured load runs; Warmup how long the
	// load runs before it (its reads are checked too, but its requests
	// are not in the figures).
	Duration, Warmup time.Duration
	// Requests and WarmupRequests, when above zero, are the fewest
	// requests the measured window and the warm-up take: each ends once
	// both its time and its count are reached, so a slow machine still
	// gets a sample of that size. MaxDuration bounds the whole run; zero
	// means Warmup plus Duration when no count is set, else ten minutes.
	Requests, WarmupRequests int64
	MaxDuration              time.Duration
	// Rate is the total requests per second to aim at; zero means flat
	// out (each worker sends its next request as soon as the last one
	// returned).
	Rate float64
	// Concurrency is how many workers send requests.
	Concurrency int
	// Mix weighs the kinds of request.
	Mix Mix
	// Users is the number of users to draw from (IDs 1..Users); zero means
	// what the first target says it holds.
	Users int
	// Zipf is the exponent of the users' Zipf distribution (above 1).
	Zipf float64
	// Pages and Limit: listings draw a page from 1..Pages (Zipf too), of
	// Limit licenses.
	Pages, Limit int
	// Delta is the staleness allowed: a read that began more than Delta
	// after a newer write returned must not see an older version.
	Delta time.Duration
	// Timeout bounds each request.
	Timeout time.Duration
	// Interval is the time series' resolution and how often the
	// instances' counters are scraped.
	Interval time.Duration
	// Seed makes the request sequence repeatable (per worker).
	Seed uint64
	// Progress, when set, receives a progress bar.
	Progress io.Writer
}

// Mix weighs the kinds of request; only the ratios matter.
type Mix struct {
	Read  int `json:"read"`  // GET /api/v1/users/{id}
	List  int `json:"list"`  // GET /api/v1/licenses?page=&limit=
	Write int `json:"write"` // PUT /api/v1/users/{id}
}

// ParseMix reads "read=85,list=10,write=5" (kinds may be left out: zero).
func ParseMix(s string) (Mix, error) {
	var m Mix
	for part := range strings.SplitSeq(s, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		n, err := strconv.Atoi(v)
		if !ok || err != nil || n < 0 {
			return m, fmt.Errorf("mix %q: want kind=weight pairs such as read=85,list=10,write=5", s)
		}
		switch k {
		case "read":
			m.Read = n
		case "list":
			m.List = n
		case "write":
			m.Write = n
		default:
			return m, fmt.Errorf("mix %q: unknown kind %q (want read, list or write)", s, k)
		}
	}
	if m.Read+m.List+m.Write == 0 {
		return m, fmt.Errorf("mix %q: all weights are zero", s)
	}
	return m, nil
}

// Flag is m in ParseMix's form.
func (m Mix) Flag() string { return fmt.Sprintf("read=%d,list=%d,write=%d", m.Read, m.List, m.Write) }

func (m Mix) String() string {
	t := float64(m.Read + m.List + m.Write)
	return fmt.Sprintf("read %.0f%% / list %.0f%% / write %.0f%%", 100*float64(m.Read)/t, 100*float64(m.List)/t, 100*float64(m.Write)/t)
}

func (c Config) withDefaults() (Config, error) {
	if c.Duration == 0 {
		c.Duration = DefaultDuration
	}
	if c.Concurrency == 0 {
		c.Concurrency = DefaultConcurrency
	}
	if c.Mix == (Mix{}) {
		c.Mix = DefaultMix
	}
	if c.Zipf == 0 {
		c.Zipf = DefaultZipf
	}
	if c.Pages == 0 {
		c.Pages = DefaultPages
	}
	if c.Limit == 0 {
		c.Limit = DefaultLimit
	}
	if c.Delta == 0 {
		c.Delta = DefaultDelta
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultTimeout
	}
	if c.Interval == 0 {
		c.Interval = DefaultInterval
	}
	if c.MaxDuration == 0 {
		c.MaxDuration = c.Warmup + c.Duration
		if c.Requests > 0 || c.WarmupRequests > 0 {
			c.MaxDuration = 10 * time.Minute
		}
	}
	var errs []error
	if len(c.Targets) == 0 || len(c.Targets) > 255 {
		errs = append(errs, errors.New("load: want 1 to 255 targets"))
	}
	for i, t := range c.Targets {
		c.Targets[i] = strings.TrimRight(t, "/")
	}
	if c.Duration < 0 || c.Warmup < 0 || c.Delta < 0 || c.Timeout < 0 || c.Interval < 0 || c.Rate < 0 || c.MaxDuration < 0 || c.Requests < 0 || c.WarmupRequests < 0 {
		errs = append(errs, errors.New("load: negative duration or rate"))
	}
	if c.Concurrency < 1 || c.Users < 0 || c.Pages < 1 || c.Limit < 1 {
		errs = append(errs, errors.New("load: Concurrency, Pages and Limit must be positive"))
	}
	if c.Zipf <= 1 {
		errs = append(errs, fmt.Errorf("load: Zipf %v must be above 1", c.Zipf))
	}
	if c.Mix.Read < 0 || c.Mix.List < 0 || c.Mix.Write < 0 {
		errs = append(errs, errors.New("load: negative weight in Mix"))
	}
	return c, errors.Join(errs...)
}

// The kinds of request.
const (
	opRead = iota
	opList
	opWrite
	numOps
)

var opNames = [numOps]string{"read", "list", "write"}

// readRec and writeRec are one user read or write that got a version;
// times are nanoseconds since the run's base.
type readRec struct {
	user       int32
	inst       uint8
	start, end int64
	version    int64
}

type writeRec = readRec

// bucket holds one interval's figures.
type bucket struct {
	mu     sync.Mutex
	hist   *hdrhistogram.Histogram // latency in µs, every kind; nil until used
	count  int64
	errors int64
}

// Latency histograms span 1 µs to a minute with 3 significant digits.
const histMax = int64(time.Minute / time.Microsecond)

func newHist() *hdrhistogram.Histogram { return hdrhistogram.New(1, histMax, 3) }

// notYet is run.warm before the warm-up has ended.
const notYet = math.MaxInt64

// run is one Run's state.
type run struct {
	cfg      Config
	client   *http.Client
	base     time.Time     // t = 0 of every record
	maxEnd   time.Duration // the load's end at the latest, since base
	warm     atomic.Int64  // the warm-up's end in ns since base, or notYet
	pace     atomic.Int64  // rate mode: requests scheduled so far
	interval float64       // rate mode: ns between requests

	buckets []bucket
	opHist  [numOps]*hdrhistogram.Histogram // measured window only, under opMu
	opCount [numOps]int64
	opErrs  [numOps]int64
	opMu    sync.Mutex

	errMu   sync.Mutex
	errKind map[string]int64
	errLast map[string]string // an example of each kind

	sent, measuredN, failed atomic.Int64
}

// Run sends the load, checks the reads and gathers the instances' figures.
// It stops early, with what it has, when ctx ends. Every goroutine it
// starts has ended when it returns.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	tr := &http.Transport{
		MaxIdleConns:        cfg.Concurrency * len(cfg.Targets),
		MaxIdleConnsPerHost: cfg.Concurrency,
		IdleConnTimeout:     30 * time.Second,
		DisableCompression:  true,
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: cfg.Timeout}

	first, err := scrapeOne(ctx, client, cfg.Targets[0])
	if err != nil {
		return nil, fmt.Errorf("load: %s: %w", cfg.Targets[0], err)
	}
	if cfg.Users == 0 {
		cfg.Users = first.Users
	}
	if cfg.Users < 1 || cfg.Users > math.MaxInt32 {
		return nil, fmt.Errorf("load: %d users: want 1 to %d", cfg.Users, math.MaxInt32)
	}

	r := &run{
		cfg:     cfg,
		client:  client,
		maxEnd:  cfg.MaxDuration,
		errKind: map[string]int64{},
		errLast: map[string]string{},
	}
	r.warm.Store(notYet)
	if cfg.Rate > 0 {
		r.interval = float64(time.Second) / cfg.Rate
	}
	r.buckets = make([]bucket, int(r.maxEnd/cfg.Interval)+2)
	for i := range r.opHist {
		r.opHist[i] = newHist()
	}

	// The snapshot at t = 0; the controller takes one at every interval and
	// at the warm-up's end, and Run the last after the last request.
	sc := newScraper(client, cfg.Targets)
	if err := sc.take(ctx, 0); err != nil {
		return nil, err
	}
	r.base = time.Now()
	if cfg.Warmup == 0 && cfg.WarmupRequests == 0 {
		r.warm.Store(0)
		sc.baseline = 0
	}
	runCtx, cancel := context.WithDeadline(ctx, r.base.Add(r.maxEnd))
	defer cancel()
	var wg sync.WaitGroup
	reads := make([][]readRec, cfg.Concurrency)
	writes := make([][]writeRec, cfg.Concurrency)
	lost := make([][]int32, cfg.Concurrency)
	for w := range cfg.Concurrency {
		wg.Go(func() { reads[w], writes[w], lost[w] = r.worker(runCtx, w) })
	}
	stopAux := make(chan struct{})
	var aux sync.WaitGroup
	aux.Go(func() { r.control(runCtx, cancel, sc, stopAux) })
	if cfg.Progress != nil {
		aux.Go(func() { r.progress(stopAux) })
	}
	wg.Wait()
	elapsed := time.Since(r.base)
	close(stopAux)
	aux.Wait()
	_ = sc.take(context.WithoutCancel(ctx), elapsed) // a failure is counted in the result
	allReads, allWrites := slices.Concat(reads...), slices.Concat(writes...)
	// The newest version seen of every user a write was sent for.
	seen := map[int32]int64{}
	for _, w := range allWrites {
		seen[w.user] = max(seen[w.user], w.version)
	}
	for _, u := range slices.Concat(lost...) {
		seen[u] = max(seen[u], 0)
	}
	for _, rd := range allReads {
		if _, ok := seen[rd.user]; ok {
			seen[rd.user] = max(seen[rd.user], rd.version)
		}
	}
	res := r.result(first, sc, allReads, allWrites, min(elapsed, r.maxEnd))
	c := &res.Coherence
	c.FinalReads, c.FinalErrors, c.FinalStale = r.readBack(ctx, seen)
	return res, nil
}

// control ends the warm-up and the run when their time and their count of
// requests have both been reached, and scrapes the instances at every
// interval. It returns when ctx ends or stop is closed.
func (r *run) control(ctx context.Context, cancel context.CancelFunc, sc *scraper, stop <-chan struct{}) {
	cfg := r.cfg
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	next := cfg.Interval
	for {
		select {
		case <-ctx.Done():
			return
		case <-stop:
			return
		case <-tick.C:
		}
		el := time.Since(r.base)
		if r.warm.Load() == notYet && el >= cfg.Warmup && r.sent.Load() >= cfg.WarmupRequests {
			r.warm.Store(int64(el))
			if sc.take(context.WithoutCancel(ctx), el) == nil {
				sc.baseline = len(sc.snaps) - 1
			}
		}
		if w := r.warm.Load(); w != notYet && el-time.Duration(w) >= cfg.Duration && r.measuredN.Load() >= cfg.Requests {
			cancel()
			return
		}
		if el >= next {
			_ = sc.take(context.WithoutCancel(ctx), el) // a failure leaves a gap, counted
			next = (el/cfg.Interval + 1) * cfg.Interval
		}
	}
}

// worker sends requests until ctx ends and returns the versions it saw.
func (r *run) worker(ctx context.Context, w int) (reads []readRec, writes []writeRec, lost []int32) {
	cfg := r.cfg
	rng := rand.New(rand.NewPCG(cfg.Seed, uint64(w)))
	users := rand.NewZipf(rng, cfg.Zipf, 1, uint64(cfg.Users-1))
	pages := rand.NewZipf(rng, cfg.Zipf, 1, uint64(cfg.Pages-1))
	total := cfg.Mix.Read + cfg.Mix.List + cfg.Mix.Write
	var timer *time.Timer
	for n := 0; ; n++ {
		if r.interval > 0 { // rate mode: wait for this request's slot
			slot := r.base.Add(time.Duration(float64(r.pace.Add(1)-1) * r.interval))
			if d := time.Until(slot); d > 0 {
				if timer == nil {
					timer = time.NewTimer(d)
					defer timer.Stop()
				} else {
					timer.Reset(d)
				}
				select {
				case <-ctx.Done():
					return
				case <-timer.C:
				}
			}
		}
		if ctx.Err() != nil {
			return
		}
		op := opWrite
		switch x := rng.IntN(total); {
		case x < cfg.Mix.Read:
			op = opRead
		case x < cfg.Mix.Read+cfg.Mix.List:
			op = opList
		}
		inst := rng.IntN(len(cfg.Targets))
		target := cfg.Targets[inst]
		user := int32(users.Uint64() + 1)
		var req *http.Request
		switch op {
		case opRead:
			req, _ = http.NewRequestWithContext(ctx, http.MethodGet, target+"/api/v1/users/"+strconv.Itoa(int(user)), nil)
		case opList:
			page := pages.Uint64() + 1
			req, _ = http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("%s/api/v1/licenses?page=%d&limit=%d", target, page, cfg.Limit), nil)
		case opWrite:
			body, _ := json.Marshal(map[string]string{"name": fmt.Sprintf("Load %d-%d", w, n)})
			req, _ = http.NewRequestWithContext(ctx, http.MethodPut, target+"/api/v1/users/"+strconv.Itoa(int(user)), bytes.NewReader(body))
			req.Header.Set("Content-Type", "application/json")
		}
		start := time.Since(r.base)
		version, err := r.do(req, op)
		end := time.Since(r.base)
		if err != nil && op == opWrite {
			lost = append(lost, user) // its outcome is unknown: see readBack
		}
		if err != nil && ctx.Err() != nil {
			return // cut off by the end of the run: not an error
		}
		r.record(op, start, end, err)
		if err == nil && op != opList {
			rec := readRec{user: user, inst: uint8(inst), start: int64(start), end: int64(end), version: version}
			if op == opRead {
				reads = append(reads, rec)
			} else {
				writes = append(writes, rec)
			}
		}
	}
}

// errStatus is a response with an unexpected status.
type errStatus struct {
	code int
	body string
}

func (e *errStatus) Error() string { return fmt.Sprintf("HTTP %d: %s", e.code, e.body) }

// do sends req and returns the version in the answer (reads and writes).
func (r *run) do(req *http.Request, op int) (int64, error) {
	resp, err := r.client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return 0, err
	}
	if resp.StatusCode != http.StatusOK {
		return 0, &errStatus{resp.StatusCode, strings.TrimSpace(string(body[:min(len(body), 200)]))}
	}
	if op == opList {
		return 0, nil
	}
	var u struct {
		Version int64 `json:"version"`
	}
	if err := json.Unmarshal(body, &u); err != nil || u.Version < 1 {
		return 0, fmt.Errorf("decode: no version in %.100q", body)
	}
	return u.Version, nil
}

// record counts one request in its interval and, past the warm-up, in the
// figures of its kind.
func (r *run) record(op int, start, end time.Duration, err error) {
	r.sent.Add(1)
	us := max(1, min(int64((end-start)/time.Microsecond), histMax))
	b := &r.buckets[min(int(start/r.cfg.Interval), len(r.buckets)-1)]
	b.mu.Lock()
	b.count++
	if err != nil {
		b.errors++
	} else {
		if b.hist == nil {
			b.hist = newHist()
		}
		_ = b.hist.RecordValue(us)
	}
	b.mu.Unlock()
	if err != nil {
		r.failed.Add(1)
		kind := "transport"
		var st *errStatus
		switch {
		case errors.As(err, &st):
			kind = "HTTP " + strconv.Itoa(st.code)
		case strings.HasPrefix(err.Error(), "decode"):
			kind = "decode"
		}
		r.errMu.Lock()
		r.errKind[opNames[op]+" "+kind]++
		r.errLast[opNames[op]+" "+kind] = err.Error()
		r.errMu.Unlock()
	}
	if int64(start) < r.warm.Load() {
		return
	}
	r.measuredN.Add(1)
	r.opMu.Lock()
	r.opCount[op]++
	if err != nil {
		r.opErrs[op]++
	} else {
		_ = r.opHist[op].RecordValue(us)
	}
	r.opMu.Unlock()
}

// progress draws the progress bar until stop is closed.
func (r *run) progress(stop <-chan struct{}) {
	total := (r.cfg.Warmup + r.cfg.Duration).Milliseconds()
	bar := progressbar.NewOptions64(total,
		progressbar.OptionSetWriter(r.cfg.Progress),
		progressbar.OptionSetWidth(30),
		progressbar.OptionSetPredictTime(false),
		progressbar.OptionSetElapsedTime(false),
		progressbar.OptionThrottle(100*time.Millisecond),
		progressbar.OptionSetRenderBlankState(true),
	)
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	var lastSent int64
	last := r.base
	for {
		select {
		case <-stop:
			_ = bar.Set64(total)
			_ = bar.Finish()
			fmt.Fprintln(r.cfg.Progress)
			return
		case now := <-t.C:
			sent := r.sent.Load()
			rps := float64(sent-lastSent) / now.Sub(last).Seconds()
			lastSent, last = sent, now
			el := now.Sub(r.base)
			phase := "load"
			if int64(el) < r.warm.Load() {
				phase = "warm-up"
			}
			bar.Describe(fmt.Sprintf("%-7s %5.1fs  %7.0f req/s  %d errors", phase, el.Seconds(), rps, r.failed.Load()))
			_ = bar.Set64(min(el.Milliseconds(), total))
		}
	}
}
