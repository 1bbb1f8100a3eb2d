package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/mail"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/tiercache/tiercache/tiered"
)

// Limits of the API's input.
const (
	MaxLimit     = 100     // licenses per page
	MaxPage      = 100_000 // pages
	DefaultLimit = 20
	maxBody      = 64 << 10
	maxName      = 100
	maxEmail     = 254
)

// Plans a user may be on.
var Plans = []string{"free", "pro", "team", "enterprise"}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// writeError answers {"error": msg}.
func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"error": msg})
}

// userID parses the {id} path segment.
func userID(w http.ResponseWriter, r *http.Request) (int64, bool) {
	raw := r.PathValue("id")
	id, err := strconv.ParseInt(raw, 10, 64)
	if err != nil || id < 1 {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("user id %q: want a positive integer", raw))
		return 0, false
	}
	return id, true
}

// failed answers a read or write that could not be served.
func (s *Server) failed(w http.ResponseWriter, r *http.Request, what string, err error) {
	if errors.Is(err, context.Canceled) && r.Context().Err() != nil {
		return // the client went away
	}
	s.log.Warn(what+" failed", "path", r.URL.Path, "error", err)
	writeError(w, http.StatusServiceUnavailable, what+" failed; try again")
}

// getUser: GET /api/v1/users/{id}, through the cache.
func (s *Server) getUser(w http.ResponseWriter, r *http.Request) {
	id, ok := userID(w, r)
	if !ok {
		return
	}
	u, err := remember(r.Context(), s.users, strconv.FormatInt(id, 10), s.loadUser)
	switch {
	case errors.Is(err, tiered.ErrNotFound):
		writeError(w, http.StatusNotFound, fmt.Sprintf("user %d not found", id))
	case err != nil:
		s.failed(w, r, "reading the user", err)
	default:
		writeJSON(w, http.StatusOK, u)
	}
}

// putUser: PUT /api/v1/users/{id}. It updates the database, then deletes
// the cached user: every instance's next read loads the new row. The
// response carries the new version.
func (s *Server) putUser(w http.ResponseWriter, r *http.Request) {
	id, ok := userID(w, r)
	if !ok {
		return
	}
	if ct := r.Header.Get("Content-Type"); ct != "" {
		if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != "application/json" {
			writeError(w, http.StatusUnsupportedMediaType, fmt.Sprintf("Content-Type %q: want application/json", ct))
			return
		}
	}
	var p UserPatch
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	dec.DisallowUnknownFields()
	err := dec.Decode(&p)
	if err == nil {
		if _, extra := dec.Token(); extra != io.EOF {
			err = errors.New("data after the JSON object")
		}
	}
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("body larger than %d bytes", maxBody))
			return
		}
		var typeErr *json.UnmarshalTypeError
		switch {
		case errors.Is(err, io.EOF):
			err = errors.New("empty body")
		case errors.As(err, &typeErr) && typeErr.Field == "":
			err = fmt.Errorf("want a JSON object, got %s", typeErr.Value)
		case errors.As(err, &typeErr):
			err = fmt.Errorf("field %q: want a %s, got %s", typeErr.Field, typeErr.Type.Kind(), typeErr.Value)
		}
		writeError(w, http.StatusBadRequest, "malformed JSON body: "+err.Error())
		return
	}
	if msg := p.validate(); msg != "" {
		writeError(w, http.StatusUnprocessableEntity, msg)
		return
	}
	if !s.beginWrite() {
		writeError(w, http.StatusServiceUnavailable, "shutting down; try again")
		return
	}
	defer s.writes.Done()
	// The write runs to its end whatever the client does: once the
	// statement is sent, its outcome is unknown until the driver answers.
	wctx, wcancel := context.WithTimeout(context.WithoutCancel(r.Context()), 5*time.Second)
	u, err := s.store.UpdateUser(wctx, id, p)
	wcancel()
	if err != nil && !errors.Is(err, ErrNotFound) && s.users != nil {
		// The UPDATE may have committed although it failed to answer:
		// invalidate anyway (it costs one round trip, and a miss).
		s.invalidateUser(r, id)
	}
	if errors.Is(err, ErrNotFound) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("user %d not found", id))
		return
	}
	if err != nil {
		s.failed(w, r, "updating the user", err)
		return
	}
	if s.users != nil {
		s.invalidateUser(r, id)
	}
	writeJSON(w, http.StatusOK, u)
}

// validate returns what is wrong with p, or "".
func (p UserPatch) validate() string {
	if p.Name == nil && p.Email == nil && p.Plan == nil {
		return "nothing to update: give name, email or plan"
	}
	if p.Name != nil {
		if n := strings.TrimSpace(*p.Name); n == "" || len(*p.Name) > maxName {
			return fmt.Sprintf("name must be 1 to %d characters", maxName)
		}
	}
	if p.Email != nil {
		a, err := mail.ParseAddress(*p.Email)
		if err != nil || a.Address != *p.Email || len(*p.Email) > maxEmail {
			return fmt.Sprintf("email %q is not an address like name@example.com", *p.Email)
		}
	}
	if p.Plan != nil && !slices.Contains(Plans, *p.Plan) {
		return fmt.Sprintf("plan %q: want one of %s", *p.Plan, strings.Join(Plans, ", "))
	}
	return ""
}

// listLicenses: GET /api/v1/licenses?page=&limit=, through the cache.
// Licenses do not change through the API, so pages live for CACHE_TTL.
func (s *Server) listLicenses(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	page, ok := queryInt(w, q.Get("page"), "page", 1, 1, MaxPage)
	if !ok {
		return
	}
	limit, ok := queryInt(w, q.Get("limit"), "limit", DefaultLimit, 1, MaxLimit)
	if !ok {
		return
	}
	key := strconv.Itoa(page) + ":" + strconv.Itoa(limit)
	lp, err := remember(r.Context(), s.licenses, key, func(ctx context.Context, _ string) (LicensePage, error) {
		return s.store.Licenses(ctx, page, limit)
	})
	if err != nil {
		s.failed(w, r, "listing licenses", err)
		return
	}
	writeJSON(w, http.StatusOK, lp)
}

func queryInt(w http.ResponseWriter, raw, name string, def, lo, hi int) (int, bool) {
	if raw == "" {
		return def, true
	}
	n, err := strconv.Atoi(raw)
	if err != nil || n < lo || n > hi {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("%s must be an integer from %d to %d, got %q", name, lo, hi, raw))
		return 0, false
	}
	return n, true
}

// Health is what GET /api/v1/health returns.
type Health struct {
	// Status is "ok"; "degraded" when the cache is (the app still serves,
	// from the database); "down" when the database does not answer (HTTP
	// 503).
	Status   string         `json:"status"`
	Instance string         `json:"instance"`
	Uptime   string         `json:"uptime"`
	Database DatabaseHealth `json:"database"`
	Cache    CacheHealth    `json:"cache"`
}

// DatabaseHealth reports the database.
type DatabaseHealth struct {
	Status string `json:"status"` // "ok" or "down"
	Driver string `json:"driver"`
	Error  string `json:"error,omitempty"`
}

// CacheHealth reports the caches: L1 figures add up both; Redis and the
// Bus are shared.
type CacheHealth struct {
	// Type is "tiered", "memory", "redis" or "off".
	Type string `json:"type"`
	// Status is "ok", "degraded" (Redis unreachable, circuit open,
	// invalidation stream not live: L1 bypassed or bounded, reads from the
	// database) or "disabled".
	Status   string  `json:"status"`
	Keys     uint64  `json:"keys"`
	Memory   uint64  `json:"memory"`
	HitRatio float64 `json:"hitRatio"`
	// Redis and Bus are absent in memory mode and with the cache off.
	Redis *RedisHealth `json:"redis,omitempty"`
	Bus   *BusHealth   `json:"bus,omitempty"`
}

// RedisHealth says whether Redis answered a PING.
type RedisHealth struct {
	Reachable bool   `json:"reachable"`
	Error     string `json:"error,omitempty"`
}

// BusHealth reports the invalidation stream and the outbox of
// invalidations waiting for Redis.
type BusHealth struct {
	Live        bool      `json:"live"`
	LastHeard   time.Time `json:"lastHeard,omitzero"`
	CircuitOpen bool      `json:"circuitOpen"`
	Outbox      int       `json:"outbox"`
}

// Health checks the database and the cache, each within a second.
func (s *Server) Health(ctx context.Context) Health {
	h := Health{
		Status:   "ok",
		Instance: s.cfg.InstanceID,
		Uptime:   time.Since(s.started).Round(time.Second).String(),
		Database: DatabaseHealth{Status: "ok", Driver: s.store.Driver()},
		Cache:    CacheHealth{Type: s.cacheType(), Status: "disabled"},
	}
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	if err := s.store.Ping(ctx); err != nil {
		h.Status, h.Database.Status, h.Database.Error = "down", "down", err.Error()
	}
	if s.users == nil {
		return h
	}
	uh := s.users.Health(ctx)
	lh := s.licenses.Health(ctx)
	st := s.Stats()
	h.Cache.Status, h.Cache.Keys, h.Cache.Memory = "ok", uh.Keys+lh.Keys, uh.Memory+lh.Memory
	if total := st.L1.Hits + st.L1.Misses; total > 0 {
		h.Cache.HitRatio = float64(st.L1.Hits+st.L2.Hits) / float64(total)
	} else if total := st.L2.Hits + st.L2.Misses; total > 0 {
		h.Cache.HitRatio = float64(st.L2.Hits) / float64(total)
	}
	if s.rdb != nil {
		h.Cache.Redis = &RedisHealth{Reachable: uh.Redis && lh.Redis, Error: uh.RedisError}
		h.Cache.Bus = &BusHealth{Live: uh.BusLive, LastHeard: uh.LastHeard, CircuitOpen: uh.CircuitOpen, Outbox: uh.OutboxDepth}
	}
	if uh.Status != "ok" || lh.Status != "ok" {
		h.Cache.Status = "degraded"
		if h.Status == "ok" {
			h.Status = "degraded"
		}
	}
	return h
}

// health: GET /api/v1/health. 200 unless the database is down.
func (s *Server) health(w http.ResponseWriter, r *http.Request) {
	h := s.Health(r.Context())
	status := http.StatusOK
	if h.Status == "down" {
		status = http.StatusServiceUnavailable
	}
	writeJSON(w, status, h)
}

// stats: GET /api/v1/stats.
func (s *Server) stats(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, s.Stats())
}

// invalidateUser deletes the cached user on a context the client cannot
// cancel halfway. A failure is kept in the Bus's outbox and replayed.
func (s *Server) invalidateUser(r *http.Request, id int64) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), 2*time.Second)
	defer cancel()
	if err := s.users.Delete(ctx, strconv.FormatInt(id, 10)); err != nil {
		s.log.Warn("invalidating a user failed", "error", err)
	}
}
