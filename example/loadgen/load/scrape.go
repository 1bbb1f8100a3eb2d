package load

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"
)

// InstanceStats is the part of an instance's GET /api/v1/stats that the
// load generator reads.
type InstanceStats struct {
	Instance  string `json:"instance"`
	CacheType string `json:"cacheType"`
	Requests  uint64 `json:"requests"`
	DBQueries uint64 `json:"dbQueries"`
	Users     int    `json:"users"`
	L1        Tier   `json:"l1"`
	L2        Tier   `json:"l2"`
}

// Tier counts reads one cache tier answered, and those it did not.
type Tier struct {
	Hits   uint64 `json:"hits"`
	Misses uint64 `json:"misses"`
}

func scrapeOne(ctx context.Context, c *http.Client, target string) (InstanceStats, error) {
	var st InstanceStats
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, target+"/api/v1/stats", nil)
	if err != nil {
		return st, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return st, err
	}
	if resp.StatusCode != http.StatusOK {
		return st, fmt.Errorf("GET /api/v1/stats: %s", resp.Status)
	}
	if err := json.Unmarshal(body, &st); err != nil {
		return st, fmt.Errorf("GET /api/v1/stats: %w", err)
	}
	return st, nil
}

// snapshot is every instance's counters at one time since the run's base.
type snapshot struct {
	at   time.Duration
	inst []InstanceStats
}

// sum adds up the instances' counters.
func (s snapshot) sum() InstanceStats {
	var t InstanceStats
	for _, st := range s.inst {
		t.Requests += st.Requests
		t.DBQueries += st.DBQueries
		t.L1.Hits += st.L1.Hits
		t.L1.Misses += st.L1.Misses
		t.L2.Hits += st.L2.Hits
		t.L2.Misses += st.L2.Misses
	}
	return t
}

// scraper collects snapshots. Its methods are called from one goroutine
// at a time (Run, then the run's controller, then Run again).
type scraper struct {
	client  *http.Client
	targets []string
	snaps   []snapshot
	errors  int // scrapes that failed
	lastErr error
	// baseline is the index of the snapshot taken at the warm-up's end.
	baseline int
}

func newScraper(c *http.Client, targets []string) *scraper {
	return &scraper{client: c, targets: targets}
}

// take scrapes every target at once and keeps the snapshot if all answered.
func (s *scraper) take(ctx context.Context, at time.Duration) error {
	snap := snapshot{at: at, inst: make([]InstanceStats, len(s.targets))}
	errs := make([]error, len(s.targets))
	var wg sync.WaitGroup
	for i, t := range s.targets {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			snap.inst[i], errs[i] = scrapeOne(ctx, s.client, t)
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			s.errors++
			s.lastErr = fmt.Errorf("%s: %w", s.targets[i], err)
			return s.lastErr
		}
	}
	s.snaps = append(s.snaps, snap)
	return nil
}
