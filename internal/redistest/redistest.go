// Package redistest starts and controls real redis-server processes for tests.
//
// Tests in this module talk to a real Redis, never to a mock. [Start] (or [New] outside a test) runs
// a private redis-server on a free 127.0.0.1 port with no persistence; the fault-injection methods
// ([Server.Stop], [Server.Kill], [Server.Restart], [Server.Freeze], [Server.Thaw], [Server.Pause],
// [Server.KillPubSub]) let tests break it in controlled ways. [Shared] and [NewShared] instead use an
// external server named by the REDIS_ADDR environment variable when it is set; on such a server
// tests must keep to keys under [Server.Prefix] and must never flush.
//
// Every process this package starts is owned by exactly one [Server] and ends by [Server.Close]
// (registered with t.Cleanup by [Start] and [Shared]); no goroutine of this package outlives Close.
// On Linux the child also receives SIGKILL if the test binary dies without running Close.
package redistest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
)

// envAddr is the environment variable read by Shared and NewShared (and nothing else).
const envAddr = "REDIS_ADDR"

// errNotFoundText is the exact text callers (and CI logs) see when redis-server is not installed.
const errNotFoundText = "redis-server not found in PATH: install it (e.g. apt-get install redis-server) or set REDIS_ADDR to a server the tests may use"

// faultOnExternal is the tb.Fatal message of every fault-injection method on an external server.
const faultOnExternal = "redistest: fault injection needs a private redis-server; unset REDIS_ADDR"

const (
	// readyTimeout bounds how long New and Restart wait for a new process to answer.
	readyTimeout = 10 * time.Second
	// exitTimeout bounds how long Stop, Kill and Close wait for a signalled process to exit.
	exitTimeout = 10 * time.Second
	// bindAttempts is how many fresh ports New tries when redis-server cannot bind.
	bindAttempts = 5
	// adminTimeout bounds one admin command (CLIENT PAUSE, CLIENT KILL).
	adminTimeout = 5 * time.Second
)

// Server is a redis-server used by tests: either a private process this package started, or an external
// server named by REDIS_ADDR (External()==true).
//
// Ownership: the Server owns its process, its log file and, when Config.Dir was empty, its temporary
// directory; Close releases all of them. The accessors (Addr, Port, External, Prefix, Options, Client)
// are safe for concurrent use. The fault-injection methods are meant to be called from the test
// goroutine; calls are serialized by an internal lock, so overlapping calls do not corrupt state, but
// overlapping faults (say Kill from one goroutine while another Restarts) have no defined order and
// tests should not rely on one. Close is idempotent and safe to call concurrently with anything.
type Server struct {
	// Immutable after construction.
	addr     string // the address clients use: 127.0.0.1:PORT (the TLS port in TLS mode)
	port     int
	external bool
	prefix   string
	extOpt   *redis.Options // for external servers: auth, DB and TLS parsed from REDIS_ADDR
	password string         // from --requirepass in Config.Args (private servers)

	// Private servers only; immutable after construction.
	bin       string   // absolute path of redis-server
	args      []string // full argument list (ports included) used for every (re)start
	adminAddr string   // plain-TCP address used for readiness checks and admin commands
	dir       string
	tempDir   bool // dir was created by New and is removed by Close
	logPath   string

	mu     sync.Mutex
	proc   *process // the current process; nil after Close; may have exited (see proc.done)
	frozen bool     // proc was sent SIGSTOP and not yet SIGCONT
	closed bool
}

// Config for New. Zero value works.
//
// A Config is only read by New and Start; the caller keeps ownership and may reuse it.
type Config struct {
	// Args are extra redis-server args, e.g. {"--requirepass","x"} or TLS args. They come after the
	// defaults, so they override them; do not override --port, --bind or --dir. When Args contain
	// "--requirepass P", Options carries that password. When Args contain "--tls-port" (its value is
	// ignored), the server listens for TLS on Addr() and for plain TCP on a second, internal port used
	// only by this package for readiness checks and admin commands; callers then set Options().TLSConfig.
	Args []string
	// Dir is the working dir for the process (created if missing, kept by Close); "" = a new temp dir
	// removed by Close. The process log, redis-server.log, is written there.
	Dir string
}

// New starts a private redis-server on a free 127.0.0.1 port and waits until it answers PING (timeout ~10s).
// Works outside tests (TestMain, examples). Error text when the binary is missing must say:
// `redis-server not found in PATH: install it (e.g. apt-get install redis-server) or set REDIS_ADDR to a server the tests may use`.
//
// New never reads REDIS_ADDR. The caller owns the returned Server and must Close it. New is safe for
// concurrent use.
func New(cfg Config) (*Server, error) {
	bin, err := lookRedisServer()
	if err != nil {
		return nil, err
	}
	prefix, err := newPrefix()
	if err != nil {
		return nil, err
	}
	s := &Server{bin: bin, prefix: prefix}
	s.password = passwordFromArgs(cfg.Args)
	extra, tlsMode := stripTLSPort(cfg.Args)

	if cfg.Dir == "" {
		dir, err := os.MkdirTemp("", "redistest-")
		if err != nil {
			return nil, fmt.Errorf("redistest: create temp dir: %w", err)
		}
		s.dir, s.tempDir = dir, true
	} else {
		dir, err := filepath.Abs(cfg.Dir)
		if err != nil {
			return nil, fmt.Errorf("redistest: dir %q: %w", cfg.Dir, err)
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("redistest: create dir: %w", err)
		}
		s.dir = dir
	}
	s.logPath = filepath.Join(s.dir, "redis-server.log")

	for attempt := 1; ; attempt++ {
		port, err := freePort()
		if err != nil {
			s.removeDir()
			return nil, err
		}
		adminPort := port
		if tlsMode {
			if adminPort, err = freePort(); err != nil {
				s.removeDir()
				return nil, err
			}
		}
		s.port = port
		s.addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		s.adminAddr = net.JoinHostPort("127.0.0.1", strconv.Itoa(adminPort))
		s.args = buildArgs(port, adminPort, tlsMode, s.dir, extra)

		p, err := s.launch()
		if err == nil {
			s.proc = p
			return s, nil
		}
		if errors.Is(err, errAddrInUse) && attempt < bindAttempts {
			continue
		}
		s.removeDir()
		return nil, err
	}
}

// Start is New for a test: t.Fatal on error (NEVER t.Skip), registers Close with t.Cleanup.
//
// At most one Config may be given. The Server belongs to the test and is closed when it ends.
func Start(tb testing.TB, cfg ...Config) *Server {
	tb.Helper()
	if len(cfg) > 1 {
		tb.Fatalf("redistest: Start takes at most one Config, got %d", len(cfg))
	}
	var c Config
	if len(cfg) == 1 {
		c = cfg[0]
	}
	s, err := New(c)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := s.Close(); err != nil {
			tb.Errorf("redistest: close: %v", err)
		}
	})
	return s
}

// Shared returns the external server from REDIS_ADDR (host:port, optionally redis://... URL) when set,
// else Start(tb). With an external server callers must only use keys under Prefix() and never flush.
//
// Each call returns a new Server value with its own Prefix. An external server must answer PING
// within a few seconds or the test fails (it is never skipped). The Server belongs to the test.
func Shared(tb testing.TB) *Server {
	tb.Helper()
	addr := os.Getenv(envAddr)
	if addr == "" {
		return Start(tb)
	}
	s, err := newExternal(addr)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = s.Close() })
	return s
}

// NewShared is Shared for TestMain (no testing.TB); returns a cleanup func.
//
// The cleanup func closes the Server (a no-op for an external one); it is idempotent and safe for
// concurrent use. On error the returned Server is nil and the cleanup func is a harmless no-op.
func NewShared() (*Server, func(), error) {
	var (
		s   *Server
		err error
	)
	if addr := os.Getenv(envAddr); addr != "" {
		s, err = newExternal(addr)
	} else {
		s, err = New(Config{})
	}
	if err != nil {
		return nil, func() {}, err
	}
	return s, func() { _ = s.Close() }, nil
}

// newExternal describes the server named by REDIS_ADDR and checks that it answers PING.
func newExternal(raw string) (*Server, error) {
	opt := &redis.Options{}
	if strings.Contains(raw, "://") {
		u, err := redis.ParseURL(raw)
		if err != nil {
			return nil, fmt.Errorf("redistest: %s=%q: %w", envAddr, raw, err)
		}
		if u.Network != "tcp" {
			return nil, fmt.Errorf("redistest: %s=%q: only redis:// and rediss:// URLs are supported", envAddr, raw)
		}
		opt.Addr, opt.Username, opt.Password, opt.DB, opt.TLSConfig = u.Addr, u.Username, u.Password, u.DB, u.TLSConfig
	} else {
		opt.Addr = raw
	}
	_, portStr, err := net.SplitHostPort(opt.Addr)
	if err != nil {
		return nil, fmt.Errorf("redistest: %s=%q: want host:port or a redis:// URL: %w", envAddr, raw, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return nil, fmt.Errorf("redistest: %s=%q: bad port: %w", envAddr, raw, err)
	}
	prefix, err := newPrefix()
	if err != nil {
		return nil, err
	}
	s := &Server{addr: opt.Addr, port: port, external: true, prefix: prefix, extOpt: opt}

	c := redis.NewClient(s.Options())
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), adminTimeout)
	defer cancel()
	if err := c.Ping(ctx).Err(); err != nil {
		return nil, fmt.Errorf("redistest: %s=%q does not answer PING: %w", envAddr, raw, err)
	}
	return s, nil
}

// Addr returns the address clients dial: "127.0.0.1:PORT" for a private server, the host:port from
// REDIS_ADDR for an external one. It never changes, not even across Restart. Safe for concurrent use.
func (s *Server) Addr() string { return s.addr }

// Port returns the port of Addr. Safe for concurrent use.
func (s *Server) Port() int { return s.port }

// External reports whether the server came from REDIS_ADDR (so fault injection is unavailable and
// only keys under Prefix may be touched). Safe for concurrent use.
func (s *Server) External() bool { return s.external }

// Prefix is a key prefix unique to this Server value (random, e.g. "rt3f9a1c:"), so tests sharing an
// external server never collide. Private servers also get one.
//
// It never changes and is safe for concurrent use.
func (s *Server) Prefix() string { return s.prefix }

// Options returns *redis.Options for this server with test-friendly settings:
// ContextTimeoutEnabled true, DialTimeout 1s, ReadTimeout/WriteTimeout 1s, PoolTimeout 1s, MaxRetries 0,
// DisableIdentity true (Redis 7.0 rejects CLIENT SETINFO), and go-redis maint notifications disabled
// (look up `MaintNotificationsConfig` / `maintnotifications.ModeDisabled` in go-redis v9.23.0 source).
//
// "MaxRetries 0" means no retries: the field is set to -1, since go-redis reads 0 as "default (3)".
// The password from --requirepass (private) or the credentials, DB and TLS settings of a REDIS_ADDR
// URL (external) are filled in. Every call returns a fresh value the caller owns and may modify
// (in TLS mode set TLSConfig). Safe for concurrent use.
func (s *Server) Options() *redis.Options {
	opt := &redis.Options{
		Addr:                  s.addr,
		Password:              s.password,
		ContextTimeoutEnabled: true,
		DialTimeout:           time.Second,
		ReadTimeout:           time.Second,
		WriteTimeout:          time.Second,
		PoolTimeout:           time.Second,
		MaxRetries:            -1,
		DisableIdentity:       true,
		MaintNotificationsConfig: &maintnotifications.Config{
			Mode: maintnotifications.ModeDisabled,
		},
	}
	if e := s.extOpt; e != nil {
		opt.Username, opt.Password, opt.DB = e.Username, e.Password, e.DB
		if e.TLSConfig != nil {
			opt.TLSConfig = e.TLSConfig.Clone()
		}
	}
	return opt
}

// Client returns a new client from Options() closed via tb.Cleanup.
//
// The client belongs to the test; it may be used from any goroutine, as any go-redis client.
func (s *Server) Client(tb testing.TB) *redis.Client {
	tb.Helper()
	c := redis.NewClient(s.Options())
	tb.Cleanup(func() { _ = c.Close() })
	return c
}

// Close kills the process if private & running, waits for it, and removes the temp dir; it is
// idempotent and concurrency-safe. For an external server it does nothing. After Close the
// fault-injection methods fail the test.
func (s *Server) Close() error {
	if s.external {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	var errs []error
	if p := s.proc; p != nil {
		s.proc = nil
		if err := p.kill(exitTimeout); err != nil {
			errs = append(errs, err)
		}
	}
	if err := s.removeDir(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// removeDir removes the directory when New created it.
func (s *Server) removeDir() error {
	if !s.tempDir {
		return nil
	}
	if err := os.RemoveAll(s.dir); err != nil {
		return fmt.Errorf("redistest: remove %s: %w", s.dir, err)
	}
	return nil
}

// newPrefix returns "rt" + 8 random hex digits + ":".
func newPrefix() (string, error) {
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("redistest: random prefix: %w", err)
	}
	return "rt" + hex.EncodeToString(b[:]) + ":", nil
}

// passwordFromArgs returns the value of the last "--requirepass" in args.
func passwordFromArgs(args []string) (password string) {
	for i := 0; i+1 < len(args); i++ {
		if args[i] == "--requirepass" {
			password = args[i+1]
		}
	}
	return password
}

// stripTLSPort removes every "--tls-port VALUE" pair and reports whether there was one.
func stripTLSPort(args []string) (rest []string, tlsMode bool) {
	for i := 0; i < len(args); i++ {
		if args[i] == "--tls-port" {
			tlsMode = true
			i++ // skip the value
			continue
		}
		rest = append(rest, args[i])
	}
	return rest, tlsMode
}

// buildArgs is the full redis-server command line.
func buildArgs(port, adminPort int, tlsMode bool, dir string, extra []string) []string {
	args := []string{
		"--port", strconv.Itoa(adminPort),
		"--bind", "127.0.0.1",
		"--save", "",
		"--appendonly", "no",
		"--dir", dir,
		"--daemonize", "no",
		"--protected-mode", "no",
	}
	if tlsMode {
		args = append(args, "--tls-port", strconv.Itoa(port))
	}
	return append(args, extra...)
}
