package load

import (
	"cmp"
	"slices"
	"sort"
	"time"
)

// Coherence is what the check of every read against the writes found.
//
// The rule: a read of user u that began at s and saw version v is stale if
// a write of u that returned a version above v had returned more than Delta
// before s. Versions come from the database, so they grow with every
// committed write whatever instance served it; a write that returned had
// committed and invalidated the cache before it returned. A read's lag is
// s minus the earliest return of a newer write: reads with a lag of at most
// Delta are counted as late (a pub/sub hop in flight), not stale.
type Coherence struct {
	Reads      int     `json:"reads"`
	Writes     int     `json:"writes"`
	DeltaMs    float64 `json:"deltaMs"`
	StaleReads int     `json:"staleReads"`
	// LateReads saw an older version with a lag within Delta.
	LateReads int `json:"lateReads"`
	// WorstLagMs is the largest lag of any read (late or stale).
	WorstLagMs float64 `json:"worstLagMs"`
	// Examples are the first stale reads found (at most 10).
	Examples []StaleRead `json:"examples,omitempty"`
	// The read-back after the load (see readBack): its reads, those that
	// failed, and those that were stale, which a coherent fleet has none
	// of.
	FinalReads  int          `json:"finalReads"`
	FinalErrors int          `json:"finalErrors"`
	FinalStale  []FinalStale `json:"finalStale,omitempty"`
}

// Stale reports whether any read, during the load or in the read-back
// after it, was stale.
func (c Coherence) Stale() bool { return c.StaleReads > 0 || len(c.FinalStale) > 0 }

// StaleRead is one read that failed the check.
type StaleRead struct {
	User     int     `json:"user"`
	Instance string  `json:"instance"`
	StartMs  float64 `json:"startMs"`
	Saw      int64   `json:"saw"`
	// Newer is the version of the earliest write, newer than Saw, that had
	// returned: the lag runs from its return.
	Newer int64   `json:"newer"`
	LagMs float64 `json:"lagMs"`
}

// check judges every read against the writes of its user.
func check(reads []readRec, writes []writeRec, delta time.Duration, targets []string) Coherence {
	c := Coherence{Reads: len(reads), Writes: len(writes), DeltaMs: ms(delta)}
	byUser := map[int32][]writeRec{}
	for _, w := range writes {
		byUser[w.user] = append(byUser[w.user], w)
	}
	// Per user: writes by return time, and the running maximum version, so
	// the earliest write that returned a version above v is a binary search.
	runMax := map[int32][]int64{}
	for u, ws := range byUser {
		slices.SortFunc(ws, func(a, b writeRec) int { return cmp.Compare(a.end, b.end) })
		m := make([]int64, len(ws))
		for i, w := range ws {
			m[i] = w.version
			if i > 0 {
				m[i] = max(m[i], m[i-1])
			}
		}
		runMax[u] = m
	}
	slices.SortFunc(reads, func(a, b readRec) int { return cmp.Compare(a.start, b.start) })
	for _, r := range reads {
		ws := byUser[r.user]
		// Writes that returned before the read began.
		n := sort.Search(len(ws), func(i int) bool { return ws[i].end >= r.start })
		if n == 0 || runMax[r.user][n-1] <= r.version {
			continue
		}
		first := sort.Search(n, func(i int) bool { return runMax[r.user][i] > r.version })
		lag := time.Duration(r.start - ws[first].end)
		c.WorstLagMs = max(c.WorstLagMs, ms(lag))
		if lag <= delta {
			c.LateReads++
			continue
		}
		c.StaleReads++
		if len(c.Examples) < 10 {
			c.Examples = append(c.Examples, StaleRead{
				User: int(r.user), Instance: targets[r.inst], StartMs: ms(time.Duration(r.start)),
				Saw: r.version, Newer: ws[first].version, LagMs: ms(lag),
			})
		}
	}
	return c
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
