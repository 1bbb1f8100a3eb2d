package load

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const msec = int64(time.Millisecond)

func TestCheck(t *testing.T) {
	targets := []string{"http://a", "http://b"}
	// User 1: v2 returned at 10 ms, v3 at 50 ms. User 2: no writes.
	writes := []writeRec{
		{user: 1, start: 5 * msec, end: 10 * msec, version: 2},
		{user: 1, start: 40 * msec, end: 50 * msec, version: 3},
	}
	for _, tc := range []struct {
		name        string
		read        readRec
		stale, late int
		lagMs       float64
		newer       int64
	}{
		{"before any write returned, older is fine", readRec{user: 1, start: 9 * msec, version: 1}, 0, 0, 0, 0},
		{"began as the write returned", readRec{user: 1, start: 10 * msec, version: 1}, 0, 0, 0, 0},
		{"newest version", readRec{user: 1, start: 500 * msec, version: 3}, 0, 0, 0, 0},
		{"newer than any write seen", readRec{user: 1, start: 20 * msec, version: 7}, 0, 0, 0, 0},
		{"late, within delta", readRec{user: 1, start: 60 * msec, version: 1, inst: 1}, 0, 1, 50, 0},
		{"stale: v1 long after v2", readRec{user: 1, start: 200 * msec, version: 1, inst: 1}, 1, 0, 190, 2},
		{"stale against the older write only", readRec{user: 1, start: 140 * msec, version: 2}, 0, 1, 90, 0},
		{"stale: v2 long after v3", readRec{user: 1, start: 151 * msec, version: 2}, 1, 0, 101, 3},
		{"another user", readRec{user: 2, start: 900 * msec, version: 1}, 0, 0, 0, 0},
	} {
		c := check([]readRec{tc.read}, writes, 100*time.Millisecond, targets)
		if c.StaleReads != tc.stale || c.LateReads != tc.late || c.WorstLagMs != tc.lagMs {
			t.Errorf("%s: stale %d late %d worst lag %v ms, want %d %d %v", tc.name, c.StaleReads, c.LateReads, c.WorstLagMs, tc.stale, tc.late, tc.lagMs)
		}
		if tc.stale > 0 && (len(c.Examples) != 1 || c.Examples[0].Instance != targets[tc.read.inst] || c.Examples[0].Newer != tc.newer) {
			t.Errorf("%s: examples %+v", tc.name, c.Examples)
		}
	}
	// Writes arrive in any order (one slice per worker); the check sorts them.
	c := check([]readRec{{user: 1, start: 400 * msec, version: 2}}, []writeRec{writes[1], writes[0]}, 100*time.Millisecond, targets)
	if c.StaleReads != 1 || c.Reads != 1 || c.Writes != 2 {
		t.Errorf("unsorted writes: %+v", c)
	}
}

func TestParseMix(t *testing.T) {
	m, err := ParseMix("read=90, write=10")
	if err != nil || m != (Mix{Read: 90, Write: 10}) {
		t.Errorf("ParseMix = %+v, %v", m, err)
	}
	if m, err := ParseMix(DefaultMix.Flag()); err != nil || m != DefaultMix {
		t.Errorf("ParseMix(DefaultMix.Flag()) = %+v, %v", m, err)
	}
	for _, bad := range []string{"", "read", "read=-1", "read=0,write=0", "delete=5", "read=x"} {
		if _, err := ParseMix(bad); err == nil {
			t.Errorf("ParseMix(%q) = nil error", bad)
		}
	}
}

// The report is one self-contained page: charts as inline SVG, with every
// text escaped, and no script or remote asset.
func TestRenderHTML(t *testing.T) {
	r := 0.9
	res := &Result{
		Targets:       []string{"http://a<b>"},
		CacheType:     "tiered",
		WarmupSeconds: 1,
		Settings:      Settings{Duration: "2s", Warmup: "1s", Interval: "1s", Delta: "100ms", Mix: DefaultMix, Zipf: 1.1, Users: 10},
		Ops:           map[string]Op{},
		Series: []Point{
			{T: 0, Warmup: true, RPS: 10, P50: ptr(1), P95: ptr(2), P99: ptr(3), L1HitRatio: &r},
			{T: 1, RPS: 20, P50: ptr(1), P95: ptr(2), P99: ptr(4)},
			{T: 2, RPS: 30, L1HitRatio: &r},
		},
		Coherence:  Coherence{StaleReads: 2, Examples: []StaleRead{{User: 3, Instance: "http://a<b>"}}},
		ErrorKinds: map[string]int64{"read HTTP 503": 1},
	}
	var b bytes.Buffer
	if err := res.RenderHTML(&b); err != nil {
		t.Fatal(err)
	}
	page := b.String()
	for _, want := range []string{"<svg", "Throughput", "Latency per interval", "Cache hit ratio per tier", "Database queries per request", "warm-up", "L2 (Redis) (no data)", "http://a&lt;b&gt;", "read HTTP 503", `class="card bad"`} {
		if !strings.Contains(page, want) {
			t.Errorf("report lacks %q", want)
		}
	}
	for _, bad := range []string{"<script", "http://a<b>", "src=\"http", "NaN"} {
		if strings.Contains(page, bad) {
			t.Errorf("report contains %q", bad)
		}
	}
	if n := strings.Count(page, "<polyline"); n < 4 {
		t.Errorf("report has %d lines, want at least 4 (rps, p50, p95, p99)", n)
	}
}

func TestChartTicks(t *testing.T) {
	for _, tc := range []struct {
		v, step float64
		want    string
	}{{0.30000000000000004, 0.1, "0.3"}, {0.15, 0.05, "0.15"}, {20, 5, "20"}, {2e-3, 1e-3, "0.002"}, {1500, 500, "1500"}} {
		if got := label(tc.v, tc.step); got != tc.want {
			t.Errorf("label(%v, %v) = %q, want %q", tc.v, tc.step, got, tc.want)
		}
	}
	svg := string(chart{Title: "q", X: []float64{0.5, 1.5}, XMax: 2, Series: []series{{"s", "#000", []*float64{ptr(0.07), ptr(0.31)}}}}.svg())
	if strings.Contains(svg, "0000000") || !strings.Contains(svg, ">0.3<") {
		t.Errorf("axis labels: %s", svg)
	}
}

// TestReadBack: after the load, every written user is read from every
// instance twice; a second-pass read older than the newest version seen
// before it (in the load, or in the first pass) is stale. Instance b lags
// behind a on user 1 (a write returned v4, a serves v5, b v3) and on user 2
// (a write whose answer was lost: a serves v7, b v6); both agree on user 3.
func TestReadBack(t *testing.T) {
	serve := func(versions map[string]int64) *httptest.Server {
		return httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			v, ok := versions[strings.TrimPrefix(r.URL.Path, "/api/v1/users/")]
			if !ok {
				http.NotFound(w, r)
				return
			}
			fmt.Fprintf(w, `{"version": %d}`, v)
		}))
	}
	a := serve(map[string]int64{"1": 5, "2": 7, "3": 2})
	defer a.Close()
	b := serve(map[string]int64{"1": 3, "2": 6, "3": 2})
	defer b.Close()
	r := &run{cfg: Config{Targets: []string{a.URL, b.URL}, Delta: time.Millisecond}, client: &http.Client{}}
	reads, errs, stale := r.readBack(context.Background(), map[int32]int64{1: 4, 2: 0, 3: 2})
	if reads != 12 || errs != 0 {
		t.Errorf("read-back: %d reads, %d failed; want 12 and 0", reads, errs)
	}
	want := []FinalStale{{User: 1, Instance: b.URL, Saw: 3, Newest: 5}, {User: 2, Instance: b.URL, Saw: 6, Newest: 7}}
	if !slices.Equal(stale, want) {
		t.Errorf("stale = %+v, want %+v", stale, want)
	}
}
