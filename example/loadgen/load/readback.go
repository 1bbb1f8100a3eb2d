package load

import (
	"cmp"
	"context"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"
)

// FinalStale is one read of the read-back that failed it.
type FinalStale struct {
	User     int    `json:"user"`
	Instance string `json:"instance"`
	Saw      int64  `json:"saw"`
	// Newest is the newest version seen of the user, anywhere, before the
	// read began.
	Newest int64 `json:"newest"`
}

// readBack reads every user a write was sent for (whether or not it
// returned) from every instance, in two passes Delta apart, once Delta has
// passed since the load ended. A read of the second pass that saw a
// version older than the newest one seen of its user before that pass
// began (during the load, or in the first pass) is stale, and not late:
// that version had committed at least Delta before. The check of the load
// cannot see such a read: it judges reads against writes that returned,
// while a write whose answer was lost (a timeout, the run's end) may still
// have committed, and a cache that never hears of it stays stale after the
// load.
func (r *run) readBack(ctx context.Context, seen map[int32]int64) (reads, errs int, stale []FinalStale) {
	users := make([]int32, 0, len(seen))
	for u := range seen {
		users = append(users, u)
	}
	slices.SortFunc(users, func(a, b int32) int { return cmp.Compare(a, b) })
	type answer struct {
		user    int32
		inst    int
		version int64
		err     error
	}
	pass := func() []answer {
		out := make([]answer, 0, len(users)*len(r.cfg.Targets))
		var mu sync.Mutex
		var wg sync.WaitGroup
		next := make(chan int32)
		for range min(8, len(users)) {
			wg.Go(func() {
				for u := range next {
					for i, target := range r.cfg.Targets {
						req, _ := http.NewRequestWithContext(ctx, http.MethodGet, target+"/api/v1/users/"+strconv.Itoa(int(u)), nil)
						v, err := r.do(req, opRead)
						mu.Lock()
						out = append(out, answer{u, i, v, err})
						mu.Unlock()
					}
				}
			})
		}
		for _, u := range users {
			next <- u
		}
		close(next)
		wg.Wait()
		return out
	}
	wait := func() bool {
		t := time.NewTimer(r.cfg.Delta)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return false
		case <-t.C:
			return true
		}
	}
	if len(users) == 0 || !wait() {
		return 0, 0, nil
	}
	for _, a := range pass() {
		reads++
		if a.err != nil {
			errs++
			continue
		}
		seen[a.user] = max(seen[a.user], a.version)
	}
	if !wait() {
		return reads, errs, nil
	}
	for _, a := range pass() {
		reads++
		switch {
		case a.err != nil:
			errs++
		case a.version < seen[a.user]:
			stale = append(stale, FinalStale{User: int(a.user), Instance: r.cfg.Targets[a.inst], Saw: a.version, Newest: seen[a.user]})
		}
	}
	slices.SortFunc(stale, func(a, b FinalStale) int {
		return cmp.Or(cmp.Compare(a.User, b.User), cmp.Compare(a.Instance, b.Instance))
	})
	return reads, errs, stale
}
