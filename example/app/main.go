// Command app is tiercache's example HTTP API: users and licenses in a real
// database (SQLite by default, PostgreSQL with DATABASE_URL), read through a
// two-tier cache kept coherent across instances. Run several behind a load
// balancer, or let `make demo` run three and load them.
//
// Configuration comes from the environment (see server.Config): PORT, HOST,
// REDIS_URL, REDIS_DB, REDIS_PASSWORD, REDIS_CONNECT_TIMEOUT,
// REDIS_COMMAND_TIMEOUT, CACHE_TYPE (redis, memory, redis-only, off),
// CACHE_L1_SIZE, CACHE_TTL, CACHE_L1_TTL, CACHE_BUS_SECRET, DATABASE_URL,
// SQLITE_PATH, DB_LATENCY, SEED_USERS, SEED_LICENSES, INSTANCE_ID,
// SHUTDOWN_TIMEOUT, LOG_LEVEL, LOG_FORMAT and OTEL_EXPORTER_OTLP_ENDPOINT.
//
// Endpoints: GET /api/v1/licenses?page=&limit=, GET and PUT
// /api/v1/users/{id}, GET /api/v1/health, GET /api/v1/stats, GET /metrics.
//
// With -healthcheck it asks a running instance on PORT for its health and
// exits 0 if it answers 200 (for container health checks).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tiercache/tiercache/example/app/server"
)

func main() {
	healthcheck := flag.Bool("healthcheck", false, "ask the instance on PORT for its health; exit 0 if it answers 200")
	flag.Parse()
	cfg, err := server.LoadConfig(os.Getenv)
	if err != nil {
		fmt.Fprintf(os.Stderr, "app: bad configuration:\n%v\n", err)
		os.Exit(2)
	}
	if *healthcheck {
		os.Exit(checkHealth(cfg.Port))
	}
	if err := run(cfg); err != nil {
		fmt.Fprintf(os.Stderr, "app: %v\n", err)
		os.Exit(1)
	}
}

func run(cfg server.Config) error {
	var h slog.Handler
	opts := &slog.HandlerOptions{Level: cfg.LogLevel}
	if cfg.LogFormat == "text" {
		h = slog.NewTextHandler(os.Stderr, opts)
	} else {
		h = slog.NewJSONHandler(os.Stderr, opts)
	}
	log := slog.New(h).With("instance", cfg.InstanceID)
	redis.SetLogger(redisLogger{log.With("component", "go-redis")})

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	// The SDK goes first: tiercache's caches take their instruments from
	// the global providers when they are created.
	tel, err := server.NewTelemetry(ctx, cfg)
	if err != nil {
		return fmt.Errorf("telemetry: %w", err)
	}
	tel.Install()
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := tel.Shutdown(sctx); err != nil {
			log.Warn("telemetry shutdown", "error", err)
		}
	}()

	sctx, cancel := context.WithTimeout(ctx, time.Minute)
	srv, err := server.New(sctx, cfg, server.Deps{Logger: log, Metrics: tel.Metrics})
	cancel()
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(cfg.Host, strconv.Itoa(cfg.Port)))
	if err != nil {
		return errors.Join(fmt.Errorf("HOST %q, PORT %d: %w", cfg.Host, cfg.Port, err), srv.Close())
	}
	return srv.Serve(ctx, ln)
}

// checkHealth is the container health check.
func checkHealth(port int) int {
	c := http.Client{Timeout: 3 * time.Second}
	resp, err := c.Get("http://127.0.0.1:" + strconv.Itoa(port) + "/api/v1/health")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintln(os.Stderr, resp.Status)
		return 1
	}
	return 0
}

// redisLogger sends go-redis's own log lines (reconnects, pool errors) to
// slog. They carry addresses, never passwords.
type redisLogger struct{ log *slog.Logger }

func (l redisLogger) Printf(ctx context.Context, format string, v ...any) {
	l.log.WarnContext(ctx, fmt.Sprintf(format, v...))
}
