// Package server is the example app: an HTTP API over a real database
// (SQLite, or PostgreSQL) whose reads go through tiercache's Remember and
// whose writes update the database and then invalidate the cache.
//
// Run it as several instances over one Redis and one database; the load
// generator (example/loadgen) checks that a write on one instance is seen by
// reads on every other.
//
// # Lifecycle
//
// [New] opens the database (creating and seeding it on first use), the
// Redis client, the invalidation Bus and the caches. [Server.Serve] serves
// until its context ends and then shuts down in order: stop accepting and
// drain the requests in flight, close the caches, the Bus, the Redis client
// and the database.
package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"

	"github.com/tiercache/tiercache/invalidate"
	"github.com/tiercache/tiercache/metrics"
	"github.com/tiercache/tiercache/metrics/redistrace"
	"github.com/tiercache/tiercache/tiered"
)

// Deps are the collaborators New does not build from Config. The zero
// value works: no logs, the global OpenTelemetry providers, no /metrics.
type Deps struct {
	Logger         *slog.Logger
	MeterProvider  metric.MeterProvider
	TracerProvider trace.TracerProvider
	// Metrics serves GET /metrics (the Prometheus exporter's handler).
	Metrics http.Handler
	// Bus adjusts the invalidation Bus (tests shorten its heartbeat).
	Bus invalidate.Options
}

// Server is one instance of the app. Its handler is safe for concurrent
// use; Close (or Serve's shutdown) releases everything New opened.
type Server struct {
	cfg     Config
	log     *slog.Logger
	store   *Store
	rdb     *redis.Client
	bus     *invalidate.Bus
	started time.Time

	// users and licenses are nil when CACHE_TYPE is off.
	users    *tiered.Cache[User]
	licenses *tiered.Cache[LicensePage]

	seededUsers int
	requests    atomic.Uint64 // API requests (not health, stats or metrics)
	handler     http.Handler
	closeOnce   sync.Once
	// writes counts PUTs between their database write and their
	// invalidation; Close waits for them before closing the caches.
	writesMu sync.Mutex
	closing  bool
	writes   sync.WaitGroup
	closeErr error
}

// New opens the database, Redis, the Bus and the caches cfg asks for. A
// Redis that does not answer yet is no error: the caches serve from the
// database meanwhile and the health endpoint says so.
func New(ctx context.Context, cfg Config, d Deps) (_ *Server, err error) {
	if d.Logger == nil {
		d.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if d.MeterProvider == nil {
		d.MeterProvider = otel.GetMeterProvider()
	}
	if d.TracerProvider == nil {
		d.TracerProvider = otel.GetTracerProvider()
	}
	tel := metrics.Providers{Meter: d.MeterProvider, Tracer: d.TracerProvider}
	s := &Server{cfg: cfg, log: d.Logger, started: time.Now()}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	if s.store, err = OpenStore(ctx, cfg, d.MeterProvider); err != nil {
		return nil, err
	}
	if s.seededUsers, _, err = s.store.Count(ctx); err != nil {
		return nil, fmt.Errorf("count rows: %w", err)
	}
	if cfg.CacheType != CacheOff {
		if cfg.Mode != tiered.ModeMemory {
			s.rdb = redis.NewClient(cfg.Redis)
			// Redis command spans and pool metrics, never a command's
			// arguments (they hold the cached values).
			if err = redistrace.Instrument(s.rdb, tel); err != nil {
				return nil, fmt.Errorf("redis telemetry: %w", err)
			}
			bo := d.Bus
			bo.Logger = s.log.With("component", "invalidate")
			bo.Secret = cfg.BusSecret
			bo.MeterProvider, bo.TracerProvider = d.MeterProvider, d.TracerProvider
			if s.bus, err = invalidate.New(s.rdb, bo); err != nil {
				return nil, fmt.Errorf("invalidation bus: %w", err)
			}
		}
		opts := tiered.Options{
			Mode:           cfg.Mode,
			TTL:            cfg.TTL,
			L1TTL:          cfg.L1TTL,
			L1MaxCost:      cfg.L1Size,
			CommandTimeout: cfg.CommandTimeout,
			MeterProvider:  d.MeterProvider,
			TracerProvider: d.TracerProvider,
		}
		if s.users, err = tiered.New[User]("users", s.rdb, s.bus, opts); err != nil {
			return nil, fmt.Errorf("users cache: %w", err)
		}
		if s.licenses, err = tiered.New[LicensePage]("licenses", s.rdb, s.bus, opts); err != nil {
			return nil, fmt.Errorf("licenses cache: %w", err)
		}
	}
	s.handler = s.routes(d)
	return s, nil
}

// Handler is the app's HTTP handler.
func (s *Server) Handler() http.Handler { return s.handler }

// Serve serves the API on ln until ctx ends, then shuts down in order: stop
// accepting and drain the requests in flight (at most ShutdownTimeout),
// close the caches, the Bus, the Redis client, the database. It returns
// the first error of all that.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	hs := &http.Server{
		Handler:           s.handler,
		ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
	served := make(chan error, 1)
	go func() { served <- hs.Serve(ln) }()
	s.log.Info("listening", "addr", ln.Addr().String(),
		"cache", s.cacheType(), "database", s.store.Driver(), "redis", s.cfg.RedisURL)

	var serveErr error
	select {
	case serveErr = <-served:
	case <-ctx.Done():
		s.log.Info("shutting down: draining requests")
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.ShutdownTimeout)
		serveErr = hs.Shutdown(sctx)
		cancel()
		if err := <-served; !errors.Is(err, http.ErrServerClosed) && serveErr == nil {
			serveErr = err
		}
	}
	if errors.Is(serveErr, http.ErrServerClosed) {
		serveErr = nil
	}
	err := errors.Join(serveErr, s.Close())
	s.log.Info("stopped", "error", err)
	return err
}

// Close closes the caches, then the Bus, the Redis client and the
// database. Stop serving requests first (Serve does). Idempotent.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.writesMu.Lock()
		s.closing = true
		s.writesMu.Unlock()
		s.writes.Wait() // each is bounded by its own timeouts
		var errs []error
		if s.users != nil {
			errs = append(errs, s.users.Close())
		}
		if s.licenses != nil {
			errs = append(errs, s.licenses.Close())
		}
		if s.bus != nil {
			errs = append(errs, s.bus.Close())
		}
		if s.rdb != nil {
			errs = append(errs, s.rdb.Close())
		}
		if s.store != nil {
			errs = append(errs, s.store.Close())
		}
		s.closeErr = errors.Join(errs...)
	})
	return s.closeErr
}

func (s *Server) cacheType() string {
	if s.users == nil {
		return CacheOff
	}
	return s.users.CurrentMode().String()
}

// routes builds the handler: the API behind OpenTelemetry's HTTP
// instrumentation (spans named by route, request metrics).
func (s *Server) routes(d Deps) http.Handler {
	mux := http.NewServeMux()
	api := func(pattern string, h http.HandlerFunc) {
		mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			s.requests.Add(1)
			h(w, r)
		})
	}
	api("GET /api/v1/users/{id}", s.getUser)
	api("PUT /api/v1/users/{id}", s.putUser)
	api("GET /api/v1/licenses", s.listLicenses)
	mux.HandleFunc("GET /api/v1/health", s.health)
	mux.HandleFunc("GET /api/v1/stats", s.stats)
	if d.Metrics != nil {
		mux.Handle("GET /metrics", d.Metrics)
	}
	// Method-less patterns catch what the ones above leave: a known path
	// with another method (405), or an unknown path (404).
	for path, allow := range map[string]string{"/api/v1/users/{id}": "GET, PUT", "/api/v1/licenses": "GET", "/api/v1/health": "GET", "/api/v1/stats": "GET"} {
		mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Allow", allow)
			writeError(w, http.StatusMethodNotAllowed, fmt.Sprintf("%s %s: want %s", r.Method, r.URL.Path, allow))
		})
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no route for %s %s", r.Method, r.URL.Path))
	})
	instance := s.cfg.InstanceID
	h := http.Handler(mux)
	h = otelhttp.NewHandler(h, "http",
		otelhttp.WithMeterProvider(d.MeterProvider),
		otelhttp.WithTracerProvider(d.TracerProvider),
		otelhttp.WithSpanNameFormatter(func(_ string, r *http.Request) string {
			if r.Pattern != "" {
				return r.Pattern
			}
			return r.Method
		}),
		otelhttp.WithFilter(func(r *http.Request) bool { return r.URL.Path != "/metrics" }),
	)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Instance", instance)
		h.ServeHTTP(w, r)
	})
}

// remember reads key through the cache, or straight from load when the
// cache is off.
func remember[V any](ctx context.Context, c *tiered.Cache[V], key string, load tiered.Loader[V]) (V, error) {
	if c == nil {
		return load(ctx, key)
	}
	return c.Remember(ctx, key, load)
}

// loadUser is the users cache's Loader: the key is the user's ID.
func (s *Server) loadUser(ctx context.Context, key string) (User, error) {
	id, err := strconv.ParseInt(key, 10, 64)
	if err != nil {
		return User{}, fmt.Errorf("bad user key %q", key)
	}
	u, err := s.store.User(ctx, id)
	if errors.Is(err, ErrNotFound) {
		return u, tiered.ErrNotFound
	}
	return u, err
}

// Stats is what GET /api/v1/stats returns: this instance's counters, which
// the load generator scrapes. Hit figures add up both caches.
type Stats struct {
	Instance string `json:"instance"`
	// CacheType is the cache mode ("tiered", "memory", "redis") or "off".
	CacheType string `json:"cacheType"`
	// Requests counts API requests; DBQueries, database queries.
	Requests  uint64 `json:"requests"`
	DBQueries uint64 `json:"dbQueries"`
	// Users is how many users the database held at start: the key space.
	Users int              `json:"users"`
	L1    tiered.TierStats `json:"l1"`
	L2    tiered.TierStats `json:"l2"`
	Loads uint64           `json:"loads"`
	// Caches has each cache's own figures, by namespace.
	Caches map[string]tiered.Stats `json:"caches,omitempty"`
}

// Stats returns this instance's counters.
func (s *Server) Stats() Stats {
	st := Stats{
		Instance:  s.cfg.InstanceID,
		CacheType: s.cacheType(),
		Requests:  s.requests.Load(),
		DBQueries: s.store.Queries(),
		Users:     s.seededUsers,
	}
	if s.users == nil {
		return st
	}
	st.Caches = map[string]tiered.Stats{"users": s.users.Stats(), "licenses": s.licenses.Stats()}
	var l1h, l1m, l2h, l2m uint64
	for _, c := range st.Caches {
		l1h, l1m, l2h, l2m = l1h+c.L1.Hits, l1m+c.L1.Misses, l2h+c.L2.Hits, l2m+c.L2.Misses
		st.Loads += c.Loads
	}
	st.L1, st.L2 = tierStats(l1h, l1m), tierStats(l2h, l2m)
	return st
}

func tierStats(hits, misses uint64) tiered.TierStats {
	t := tiered.TierStats{Hits: hits, Misses: misses}
	if hits+misses > 0 {
		t.HitRatio = float64(hits) / float64(hits+misses)
	}
	return t
}

func (s *Server) beginWrite() bool {
	s.writesMu.Lock()
	defer s.writesMu.Unlock()
	if s.closing {
		return false
	}
	s.writes.Add(1)
	return true
}
