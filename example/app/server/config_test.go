package server

import (
	"strings"
	"testing"
	"time"

	"github.com/tiercache/tiercache/tiered"
)

func envOf(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func TestLoadConfig_Defaults(t *testing.T) {
	c, err := LoadConfig(envOf(nil))
	if err != nil {
		t.Fatalf("LoadConfig(empty) = %v", err)
	}
	if c.Port != DefaultPort || c.CacheType != "redis" || c.Mode != tiered.ModeTiered || c.SQLitePath != DefaultSQLitePath ||
		c.CommandTimeout != DefaultCommandTimeout || c.TTL != DefaultTTL || c.L1TTL != DefaultL1TTL || c.L1Size != DefaultL1Size {
		t.Errorf("LoadConfig(empty) = %+v, want the defaults", c)
	}
	if c.Redis == nil || c.Redis.Addr != "localhost:6379" || !c.Redis.ContextTimeoutEnabled || c.Redis.DialTimeout != DefaultConnectTimeout {
		t.Errorf("Redis options = %+v, want localhost:6379 with deadlines honoured and a 1s connect timeout", c.Redis)
	}
}

func TestLoadConfig_Values(t *testing.T) {
	c, err := LoadConfig(envOf(map[string]string{
		"PORT":                  "9000",
		"REDIS_URL":             "rediss://app:s3cret@cache.internal:6380/2",
		"REDIS_DB":              "5",
		"REDIS_PASSWORD":        "override",
		"REDIS_CONNECT_TIMEOUT": "2500", // milliseconds, as the Node.js service had them
		"REDIS_COMMAND_TIMEOUT": "250ms",
		"CACHE_L1_SIZE":         "16MiB",
		"CACHE_TTL":             "5m",
		"CACHE_L1_TTL":          "30s",
		"DB_LATENCY":            "2ms",
		"DATABASE_URL":          "postgres://u:p@db:5432/app",
	}))
	if err != nil {
		t.Fatalf("LoadConfig = %v", err)
	}
	r := c.Redis
	if r.Addr != "cache.internal:6380" || r.Username != "app" || r.Password != "override" || r.DB != 5 || r.TLSConfig == nil || r.DialTimeout != 2500*time.Millisecond {
		t.Errorf("Redis options = addr %s user %s db %d tls %v dial %v", r.Addr, r.Username, r.DB, r.TLSConfig != nil, r.DialTimeout)
	}
	if c.Port != 9000 || c.CommandTimeout != 250*time.Millisecond || c.L1Size != 16<<20 || c.TTL != 5*time.Minute ||
		c.L1TTL != 30*time.Second || c.DBLatency != 2*time.Millisecond || c.DatabaseURL == "" {
		t.Errorf("LoadConfig = %+v", c)
	}
	if strings.Contains(c.RedisURL, "s3cret") {
		t.Errorf("RedisURL %q shows the password", c.RedisURL)
	}
}

func TestLoadConfig_ModesWithoutRedis(t *testing.T) {
	for _, typ := range []string{"memory", "off"} {
		// A bad REDIS_URL does not matter when Redis is not used.
		c, err := LoadConfig(envOf(map[string]string{"CACHE_TYPE": typ, "REDIS_URL": "nonsense"}))
		if err != nil || c.Redis != nil {
			t.Errorf("CACHE_TYPE=%s: LoadConfig = %v, Redis %v; want no error and no Redis", typ, err, c.Redis)
		}
	}
}

// Bad configuration fails at start with a message that names the variable,
// all of them at once, and never echoes a password.
func TestLoadConfig_Errors(t *testing.T) {
	for _, tc := range []struct {
		name, value, want string
	}{
		{"PORT", "http", "PORT: \"http\": want an integer from 1 to 65535"},
		{"PORT", "70000", "PORT"},
		{"CACHE_TYPE", "mongo", "CACHE_TYPE: \"mongo\": want redis, memory, redis-only or off"},
		{"REDIS_URL", "http://localhost:6379", "REDIS_URL: want redis://"},
		{"REDIS_URL", "redis://:hunter2@[bad", "REDIS_URL"},
		{"REDIS_DB", "-1", "REDIS_DB"},
		{"REDIS_CONNECT_TIMEOUT", "soon", "REDIS_CONNECT_TIMEOUT: \"soon\": want a duration"},
		{"REDIS_COMMAND_TIMEOUT", "0", "REDIS_COMMAND_TIMEOUT: must be positive"},
		{"CACHE_L1_SIZE", "lots", "CACHE_L1_SIZE"},
		{"CACHE_L1_TTL", "2h", "CACHE_L1_TTL: 2h0m0s is longer than CACHE_TTL"},
		{"CACHE_BUS_SECRET", "short", "CACHE_BUS_SECRET: must be at least 16 bytes"},
		{"DATABASE_URL", "mysql://x", "DATABASE_URL"},
		{"DB_LATENCY", "-5ms", "DB_LATENCY"},
		{"SEED_USERS", "0", "SEED_USERS"},
		{"LOG_LEVEL", "loud", "LOG_LEVEL"},
		{"LOG_FORMAT", "xml", "LOG_FORMAT"},
	} {
		_, err := LoadConfig(envOf(map[string]string{tc.name: tc.value}))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s=%q: LoadConfig error = %v, want it to contain %q", tc.name, tc.value, err, tc.want)
		}
		if err != nil && strings.Contains(err.Error(), "hunter2") {
			t.Errorf("%s=%q: error %q shows the password", tc.name, tc.value, err)
		}
	}
	_, err := LoadConfig(envOf(map[string]string{"PORT": "x", "CACHE_TTL": "y", "SQLITE_PATH": ""}))
	if err == nil || !strings.Contains(err.Error(), "PORT") || !strings.Contains(err.Error(), "CACHE_TTL") {
		t.Errorf("two bad variables: error = %v, want both named", err)
	}
}

func TestLoadConfig_Sizes(t *testing.T) {
	for in, want := range map[string]int64{"1048576": 1 << 20, "64MiB": 64 << 20, "100MB": 100e6, "2 GiB": 2 << 30, "512kb": 512e3, "7b": 7} {
		c, err := LoadConfig(envOf(map[string]string{"CACHE_L1_SIZE": in}))
		if err != nil || c.L1Size != want {
			t.Errorf("CACHE_L1_SIZE=%q: %d, %v; want %d", in, c.L1Size, err, want)
		}
	}
	for _, bad := range []string{"MiB", "-5MB", "12 parsecs", "1.5GB", "0"} {
		if _, err := LoadConfig(envOf(map[string]string{"CACHE_L1_SIZE": bad})); err == nil {
			t.Errorf("CACHE_L1_SIZE=%q: no error", bad)
		}
	}
}
