package server

import (
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tiercache/tiercache/tiered"
)

// CacheOff is the Config.CacheType that bypasses the cache entirely: every
// read is a database query. It exists for comparison runs.
const CacheOff = "off"

// Config is the app's configuration, read from the environment by
// LoadConfig. Every field names its variable.
type Config struct {
	// Port is PORT: where the HTTP API listens. Default 8080.
	Port int
	// Host is HOST: the address to listen on. Default: every interface.
	Host string
	// InstanceID is INSTANCE_ID: names this instance in logs, responses
	// (the X-Instance header) and stats. Default: host name and port.
	InstanceID string

	// CacheType is CACHE_TYPE: "redis" (the default, also "tiered": L1 in
	// process memory in front of Redis), "memory" (L1 only: no Redis, no
	// coherence between instances), "redis-only" (L2 only) or "off" (no
	// cache: every read goes to the database).
	CacheType string
	// Mode is the tiered.Mode CacheType selects (unused when it is "off").
	Mode tiered.Mode

	// Redis holds the client options built from REDIS_URL (redis:// or
	// rediss://, with user, password and database; default
	// redis://localhost:6379/0), REDIS_DB and REDIS_PASSWORD (which override
	// the URL's), and REDIS_CONNECT_TIMEOUT (default 1s). Nil when the cache
	// does not use Redis.
	Redis *redis.Options
	// RedisURL is REDIS_URL with its password removed, for logs.
	RedisURL string
	// CommandTimeout is REDIS_COMMAND_TIMEOUT: the bound on each Redis
	// round trip the cache makes. Default 500ms.
	CommandTimeout time.Duration
	// BusSecret is CACHE_BUS_SECRET: when set (at least 16 bytes, the same
	// on every instance), invalidation messages are authenticated.
	BusSecret []byte

	// L1Size is CACHE_L1_SIZE: each cache's L1 budget in bytes ("64MiB",
	// "100MB" or a number of bytes). Default 64MiB.
	L1Size int64
	// TTL is CACHE_TTL: how long values live in Redis. Default 10m.
	TTL time.Duration
	// L1TTL is CACHE_L1_TTL: the longest an entry lives in process memory.
	// Default 1m.
	L1TTL time.Duration

	// DatabaseURL is DATABASE_URL: a postgres:// URL. When empty the app
	// uses SQLite at SQLitePath.
	DatabaseURL string
	// SQLitePath is SQLITE_PATH: the SQLite database file, created and
	// seeded on first start. Default tiercache-example.db.
	SQLitePath string
	// DBLatency is DB_LATENCY: an artificial delay added to every database
	// query, to show what the cache saves. Default 0.
	DBLatency time.Duration
	// SeedUsers and SeedLicenses are SEED_USERS and SEED_LICENSES: how many
	// rows a fresh database is seeded with. Defaults 10000 and 2000.
	SeedUsers, SeedLicenses int

	// ShutdownTimeout is SHUTDOWN_TIMEOUT: how long a graceful shutdown may
	// wait for requests in flight. Default 10s.
	ShutdownTimeout time.Duration

	// LogLevel and LogFormat are LOG_LEVEL (debug, info, warn, error;
	// default info) and LOG_FORMAT (json or text; default json).
	LogLevel  slog.Level
	LogFormat string

	// OTLPEndpoint is OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else
	// OTEL_EXPORTER_OTLP_ENDPOINT: when set, traces are exported over OTLP
	// (HTTP); the exporter reads the other OTEL_* variables itself.
	OTLPEndpoint string
}

// Defaults for Config.
const (
	DefaultPort            = 8080
	DefaultRedisURL        = "redis://localhost:6379/0"
	DefaultConnectTimeout  = time.Second
	DefaultCommandTimeout  = 500 * time.Millisecond
	DefaultL1Size          = 64 << 20
	DefaultTTL             = 10 * time.Minute
	DefaultL1TTL           = time.Minute
	DefaultSQLitePath      = "tiercache-example.db"
	DefaultSeedUsers       = 10000
	DefaultSeedLicenses    = 2000
	DefaultShutdownTimeout = 10 * time.Second
)

// LoadConfig reads the configuration from getenv (os.Getenv in main). It
// reports every bad variable at once, each error naming its variable, and
// never echoes a password.
func LoadConfig(getenv func(string) string) (Config, error) {
	e := env{get: getenv}
	c := Config{
		Port:            e.int("PORT", DefaultPort, 1, 65535),
		Host:            e.str("HOST", ""),
		CacheType:       strings.ToLower(e.str("CACHE_TYPE", "redis")),
		CommandTimeout:  e.duration("REDIS_COMMAND_TIMEOUT", DefaultCommandTimeout),
		L1Size:          e.size("CACHE_L1_SIZE", DefaultL1Size),
		TTL:             e.duration("CACHE_TTL", DefaultTTL),
		L1TTL:           e.duration("CACHE_L1_TTL", DefaultL1TTL),
		DatabaseURL:     e.str("DATABASE_URL", ""),
		SQLitePath:      e.str("SQLITE_PATH", DefaultSQLitePath),
		DBLatency:       e.duration("DB_LATENCY", 0),
		SeedUsers:       e.int("SEED_USERS", DefaultSeedUsers, 1, 10_000_000),
		SeedLicenses:    e.int("SEED_LICENSES", DefaultSeedLicenses, 1, 10_000_000),
		ShutdownTimeout: e.duration("SHUTDOWN_TIMEOUT", DefaultShutdownTimeout),
		LogFormat:       strings.ToLower(e.str("LOG_FORMAT", "json")),
		OTLPEndpoint:    e.str("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", e.str("OTEL_EXPORTER_OTLP_ENDPOINT", "")),
	}
	c.InstanceID = e.str("INSTANCE_ID", "")
	if c.InstanceID == "" {
		host, _ := os.Hostname()
		c.InstanceID = fmt.Sprintf("%s:%d", host, c.Port)
	}
	switch lvl := strings.ToLower(e.str("LOG_LEVEL", "info")); lvl {
	case "debug":
		c.LogLevel = slog.LevelDebug
	case "info":
		c.LogLevel = slog.LevelInfo
	case "warn", "warning":
		c.LogLevel = slog.LevelWarn
	case "error":
		c.LogLevel = slog.LevelError
	default:
		e.fail("LOG_LEVEL", fmt.Sprintf("%q: want debug, info, warn or error", lvl))
	}
	if c.LogFormat != "json" && c.LogFormat != "text" {
		e.fail("LOG_FORMAT", fmt.Sprintf("%q: want json or text", c.LogFormat))
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"REDIS_COMMAND_TIMEOUT", c.CommandTimeout}, {"CACHE_TTL", c.TTL}, {"CACHE_L1_TTL", c.L1TTL}, {"SHUTDOWN_TIMEOUT", c.ShutdownTimeout}} {
		if d.v <= 0 && e.get(d.name) != "" {
			e.fail(d.name, "must be positive")
		}
	}
	if c.DBLatency < 0 {
		e.fail("DB_LATENCY", "must not be negative")
	}
	if c.L1TTL > c.TTL {
		e.fail("CACHE_L1_TTL", fmt.Sprintf("%v is longer than CACHE_TTL %v: an L1 entry never outlives Redis", c.L1TTL, c.TTL))
	}
	if c.DatabaseURL != "" {
		u, err := url.Parse(c.DatabaseURL)
		if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
			e.fail("DATABASE_URL", "want a postgres://user:password@host:port/db URL")
		}
	} else if c.SQLitePath == "" {
		e.fail("SQLITE_PATH", "must not be empty when DATABASE_URL is unset")
	}

	if c.CacheType == CacheOff {
		return c, e.err()
	}
	mode, err := tiered.ParseMode(c.CacheType)
	if err != nil {
		e.fail("CACHE_TYPE", fmt.Sprintf("%q: want redis, memory, redis-only or off", c.CacheType))
		return c, e.err()
	}
	c.Mode = mode
	if secret := e.get("CACHE_BUS_SECRET"); secret != "" {
		if len(secret) < 16 {
			e.fail("CACHE_BUS_SECRET", "must be at least 16 bytes")
		}
		c.BusSecret = []byte(secret)
	}
	if mode == tiered.ModeMemory {
		return c, e.err()
	}
	c.Redis, c.RedisURL = e.redis()
	return c, e.err()
}

// redis builds the client options from REDIS_URL and its companions.
func (e *env) redis() (*redis.Options, string) {
	raw := e.str("REDIS_URL", DefaultRedisURL)
	connect := e.duration("REDIS_CONNECT_TIMEOUT", DefaultConnectTimeout)
	if connect <= 0 && e.get("REDIS_CONNECT_TIMEOUT") != "" {
		e.fail("REDIS_CONNECT_TIMEOUT", "must be positive")
	}
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "redis" && u.Scheme != "rediss") || u.Host == "" {
		// url.Parse's error quotes the URL, password and all: never show it.
		e.fail("REDIS_URL", "want redis://[user:password@]host:port[/db] or rediss://...")
		return nil, ""
	}
	redacted := u.Redacted()
	o, err := tiered.RedisOptions(raw, connect)
	if err != nil {
		e.fail("REDIS_URL", err.Error()) // RedisOptions never echoes the password
		return nil, redacted
	}
	if db := e.get("REDIS_DB"); db != "" {
		o.DB = e.int("REDIS_DB", 0, 0, 1<<20)
	}
	if pw := e.get("REDIS_PASSWORD"); pw != "" {
		o.Password = pw
	}
	return o, redacted
}

// env reads variables and collects what is wrong with them.
type env struct {
	get  func(string) string
	errs []error
}

func (e *env) fail(name, msg string) {
	e.errs = append(e.errs, fmt.Errorf("%s: %s", name, msg))
}

func (e *env) err() error { return errors.Join(e.errs...) }

func (e *env) str(name, def string) string {
	if v := strings.TrimSpace(e.get(name)); v != "" {
		return v
	}
	return def
}

func (e *env) int(name string, def, lo, hi int) int {
	s := e.str(name, "")
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < lo || n > hi {
		e.fail(name, fmt.Sprintf("%q: want an integer from %d to %d", s, lo, hi))
		return def
	}
	return n
}

// duration accepts a Go duration ("500ms", "2s") or a number of
// milliseconds ("500"), as the Node.js service's variables were.
func (e *env) duration(name string, def time.Duration) time.Duration {
	s := e.str(name, "")
	if s == "" {
		return def
	}
	if ms, err := strconv.ParseInt(s, 10, 64); err == nil && ms >= 0 && ms < 1<<40 {
		return time.Duration(ms) * time.Millisecond
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		e.fail(name, fmt.Sprintf("%q: want a duration such as 500ms or 2s, or a number of milliseconds", s))
		return def
	}
	return d
}

// size accepts a number of bytes or one with a unit: KB, MB, GB (powers of
// 1000) or KiB, MiB, GiB (powers of 1024).
func (e *env) size(name string, def int64) int64 {
	s := e.str(name, "")
	if s == "" {
		return def
	}
	num := strings.TrimRightFunc(s, func(r rune) bool { return r < '0' || r > '9' })
	unit := strings.ToLower(strings.TrimSpace(s[len(num):]))
	mult, ok := map[string]int64{"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}[unit]
	n, err := strconv.ParseInt(strings.TrimSpace(num), 10, 64)
	if !ok || err != nil || n <= 0 || n > (1<<40)/mult {
		e.fail(name, fmt.Sprintf("%q: want a size such as 64MiB, 100MB or a number of bytes", s))
		return def
	}
	return n * mult
}
