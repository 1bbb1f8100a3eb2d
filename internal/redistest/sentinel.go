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
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

const (
	// DefaultSentinelMasterName is the monitored master's name when SentinelConfig.MasterName is empty.
	DefaultSentinelMasterName = "mymaster"
	// DefaultSentinelDownAfter is down-after-milliseconds when SentinelConfig.DownAfter is zero.
	DefaultSentinelDownAfter = time.Second
	// DefaultSentinelFailoverTimeout is failover-timeout when SentinelConfig.FailoverTimeout is zero. A
	// failed election is retried after twice this.
	DefaultSentinelFailoverTimeout = 3 * time.Second

	// sentinelCount is how many sentinels watch the master; quorum is sentinelQuorum.
	sentinelCount  = 3
	sentinelQuorum = 2
	// sentinelReadyTimeout bounds how long NewSentinel waits for the set-up to settle.
	sentinelReadyTimeout = 30 * time.Second
)

// SentinelConfig for NewSentinel and StartSentinel. The zero value works.
//
// A SentinelConfig is only read by NewSentinel; the caller keeps ownership and may reuse it.
type SentinelConfig struct {
	// Args are extra redis-server args for the master and the replica (not the sentinels), as in
	// Config.Args. "--requirepass P" also sets masterauth and the sentinels' auth-pass, and
	// FailoverOptions carries it. TLS (--tls-port) is not supported.
	Args []string
	// MasterName is the name the sentinels monitor the master under. "" means
	// DefaultSentinelMasterName.
	MasterName string
	// DownAfter is down-after-milliseconds: how long the master may be unreachable before a sentinel
	// considers it down. Zero means DefaultSentinelDownAfter. Rounded to milliseconds.
	DownAfter time.Duration
	// FailoverTimeout is the sentinels' failover-timeout. Zero means DefaultSentinelFailoverTimeout.
	// Rounded to milliseconds.
	FailoverTimeout time.Duration
}

// Sentinel is a private Redis Sentinel set-up: a master and one replica (redis-server processes,
// as [Server]) and three sentinels (redis-server --sentinel, quorum 2), all on free 127.0.0.1 ports
// with their own temporary directories.
//
// Ownership: the Sentinel owns all five processes and its admin connections; Close releases them.
// The accessors (MasterName, SentinelAddrs, Servers, Sentinels, FailoverOptions, FailoverClient)
// are safe for concurrent use. The methods that take a testing.TB are meant for the test goroutine.
// Close is idempotent and safe to call concurrently with anything.
type Sentinel struct {
	// Immutable after construction.
	name      string
	password  string
	data      []*Server       // the initial master, then the initial replica
	sentinels []*Server       // redis-server --sentinel
	dataAdm   []*redis.Client // admin clients, index-aligned with data
	sentAdm   []*redis.Client // admin clients, index-aligned with sentinels
	probeKey  string          // written and deleted by WaitFailover to prove the new master takes writes

	mu     sync.Mutex
	killed string // address of the master last killed by KillMaster

	closeOnce sync.Once
	closeErr  error
}

// NewSentinel starts a Sentinel set-up and waits (at most 30s) until the replica is in sync, every
// sentinel reports the master, knows the replica and the two other sentinels, and SENTINEL CKQUORUM
// succeeds. It works outside tests (TestMain). The caller owns the returned Sentinel and must Close it.
//
// When redis-server is missing the error says so and how to install it. NewSentinel never reads
// REDIS_ADDR. It is safe for concurrent use.
func NewSentinel(cfg SentinelConfig) (*Sentinel, error) {
	bin, err := lookRedisServer()
	if err != nil {
		return nil, errors.New(errClusterNotFoundText)
	}
	if _, tlsMode := stripTLSPort(cfg.Args); tlsMode {
		return nil, errors.New("redistest: NewSentinel: TLS (--tls-port) is not supported")
	}
	downAfter, failoverTimeout := cfg.DownAfter, cfg.FailoverTimeout
	if downAfter == 0 {
		downAfter = DefaultSentinelDownAfter
	}
	if failoverTimeout == 0 {
		failoverTimeout = DefaultSentinelFailoverTimeout
	}
	if downAfter < time.Millisecond || failoverTimeout < time.Millisecond {
		return nil, fmt.Errorf("redistest: NewSentinel: DownAfter %v and FailoverTimeout %v must be at least 1ms",
			cfg.DownAfter, cfg.FailoverTimeout)
	}
	prefix, err := newPrefix()
	if err != nil {
		return nil, err
	}
	s := &Sentinel{
		name:     cfg.MasterName,
		password: passwordFromArgs(cfg.Args),
		probeKey: prefix + "failover-probe",
	}
	if s.name == "" {
		s.name = DefaultSentinelMasterName
	}
	if strings.ContainsAny(s.name, " \t\r\n\"'") {
		return nil, fmt.Errorf("redistest: NewSentinel: MasterName %q must not contain spaces or quotes", s.name)
	}
	if err := s.start(bin, cfg.Args, downAfter, failoverTimeout); err != nil {
		return nil, errors.Join(err, s.Close())
	}
	return s, nil
}

// StartSentinel is NewSentinel for a test: it fails the test on error (never skips, also when
// redis-server is missing) and registers Close with tb.Cleanup. The Sentinel belongs to the test.
func StartSentinel(tb testing.TB, cfg SentinelConfig) *Sentinel {
	tb.Helper()
	s, err := NewSentinel(cfg)
	if err != nil {
		tb.Fatal(err)
		return nil
	}
	tb.Cleanup(func() {
		if err := s.Close(); err != nil {
			tb.Errorf("redistest: close sentinel: %v", err)
		}
	})
	return s
}

func (s *Sentinel) start(bin string, extra []string, downAfter, failoverTimeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), sentinelReadyTimeout)
	defer cancel()

	// A full sync starts at once instead of after the default 5s wait for more replicas. Defaults
	// come first, so that Args override them.
	args := []string{"--repl-diskless-sync-delay", "0"}
	if s.password != "" {
		args = append(args, "--masterauth", s.password)
	}
	args = append(args, extra...)
	s.data = make([]*Server, 2)
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for i := range s.data {
		wg.Go(func() { s.data[i], errs[i] = New(Config{Args: args}) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	for _, d := range s.data {
		s.dataAdm = append(s.dataAdm, adminClient(d))
	}
	// The replica is attached before the sentinels start, so their first INFO of the master lists it.
	master := s.data[0]
	if err := s.dataAdm[1].Do(ctx, "REPLICAOF", "127.0.0.1", master.Port()).Err(); err != nil {
		return fmt.Errorf("redistest: REPLICAOF on %s: %w", s.data[1].Addr(), err)
	}
	err := poll(ctx, func() (bool, string) {
		repl, err := s.dataAdm[1].Info(ctx, "replication").Result()
		if err != nil {
			return false, err.Error()
		}
		return strings.Contains(repl, "master_link_status:up"), "replica not in sync"
	})
	if err != nil {
		return fmt.Errorf("redistest: replica %s did not sync: %w\nreplica log:\n%s\nmaster log:\n%s",
			s.data[1].Addr(), err, s.data[1].logTail(0), master.logTail(0))
	}

	if err := s.startSentinels(bin, downAfter, failoverTimeout); err != nil {
		return err
	}
	for _, sn := range s.sentinels {
		s.sentAdm = append(s.sentAdm, adminClient(sn))
	}
	if err := poll(ctx, func() (bool, string) { return s.ready(ctx, master.Addr()) }); err != nil {
		return fmt.Errorf("redistest: sentinels did not settle: %w", err)
	}
	return nil
}

// startSentinels starts the three sentinels. Each one's config already names the replica and the
// other sentinels (with IDs chosen here), so they need not discover each other through hello
// messages (every 2s) before a failover can be authorized. Their ports must be known before any
// starts; if one turns out to be taken, all are started again on new ports.
func (s *Sentinel) startSentinels(bin string, downAfter, failoverTimeout time.Duration) error {
	master, replica := s.data[0], s.data[1]
	for attempt := 1; ; attempt++ {
		ports := make([]int, sentinelCount)
		ids := make([]string, sentinelCount)
		for i := range ports {
			p, err := freePort()
			if err != nil {
				return err
			}
			ports[i] = p
			var b [20]byte
			if _, err := rand.Read(b[:]); err != nil {
				return fmt.Errorf("redistest: random sentinel id: %w", err)
			}
			ids[i] = hex.EncodeToString(b[:])
		}
		s.sentinels = make([]*Server, sentinelCount)
		errs := make([]error, sentinelCount)
		var wg sync.WaitGroup
		for i := range sentinelCount {
			var conf strings.Builder
			fmt.Fprintf(&conf, "sentinel myid %s\n", ids[i])
			fmt.Fprintf(&conf, "sentinel monitor %s 127.0.0.1 %d %d\n", s.name, master.Port(), sentinelQuorum)
			fmt.Fprintf(&conf, "sentinel down-after-milliseconds %s %d\n", s.name, downAfter.Milliseconds())
			fmt.Fprintf(&conf, "sentinel failover-timeout %s %d\n", s.name, failoverTimeout.Milliseconds())
			fmt.Fprintf(&conf, "sentinel parallel-syncs %s 1\n", s.name)
			if s.password != "" {
				fmt.Fprintf(&conf, "sentinel auth-pass %s %s\n", s.name, s.password)
			}
			fmt.Fprintf(&conf, "sentinel known-replica %s 127.0.0.1 %d\n", s.name, replica.Port())
			for j := range sentinelCount {
				if j != i {
					fmt.Fprintf(&conf, "sentinel known-sentinel %s 127.0.0.1 %d %s\n", s.name, ports[j], ids[j])
				}
			}
			wg.Go(func() { s.sentinels[i], errs[i] = newSentinelProcess(bin, ports[i], conf.String()) })
		}
		wg.Wait()
		err := errors.Join(errs...)
		if err == nil {
			return nil
		}
		for _, sn := range s.sentinels {
			if sn != nil {
				_ = sn.Close()
			}
		}
		s.sentinels = nil
		if !errors.Is(err, errAddrInUse) || attempt == bindAttempts {
			return err
		}
	}
}

// newSentinelProcess starts redis-server CONF --sentinel on port, with conf written to a new temporary
// directory (sentinels rewrite their config file, so it must be theirs). The Server's Restart works
// and keeps the rewritten config.
func newSentinelProcess(bin string, port int, conf string) (*Server, error) {
	prefix, err := newPrefix()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "redistest-sentinel-")
	if err != nil {
		return nil, fmt.Errorf("redistest: create temp dir: %w", err)
	}
	confPath := filepath.Join(dir, "sentinel.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("redistest: write sentinel config: %w", err)
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	s := &Server{
		addr:      addr,
		port:      port,
		prefix:    prefix,
		bin:       bin,
		adminAddr: addr,
		dir:       dir,
		tempDir:   true,
		logPath:   filepath.Join(dir, "redis-sentinel.log"),
		// The config file must be the first argument.
		args: []string{
			confPath, "--sentinel",
			"--port", strconv.Itoa(port),
			"--bind", "127.0.0.1",
			"--dir", dir,
			"--daemonize", "no",
			"--protected-mode", "no",
		},
	}
	p, err := s.launch()
	if err != nil {
		_ = s.removeDir()
		return nil, err
	}
	s.proc = p
	return s, nil
}

// adminClient is a small client over s's plain port with a long read timeout, for this package's own
// queries (wait loops bound each query with their own context).
func adminClient(s *Server) *redis.Client {
	opt := s.Options()
	opt.Addr = s.adminAddr
	opt.TLSConfig = nil
	opt.PoolSize = 2
	opt.ReadTimeout = adminTimeout
	opt.WriteTimeout = adminTimeout
	return redis.NewClient(opt)
}

// ready reports whether every running sentinel names master, knows a working replica and two other
// working sentinels, and has its quorum.
func (s *Sentinel) ready(ctx context.Context, master string) (bool, string) {
	n := 0
	for i, sn := range s.sentinels {
		if !sn.running() {
			continue
		}
		n++
		qctx, cancel := context.WithTimeout(ctx, pollQueryTimeout)
		why := s.sentinelReady(qctx, i, master)
		cancel()
		if why != "" {
			return false, fmt.Sprintf("sentinel %s: %s", sn.Addr(), why)
		}
	}
	if n == 0 {
		return false, "no sentinel is running"
	}
	return true, ""
}

func (s *Sentinel) sentinelReady(ctx context.Context, i int, master string) string {
	adm := s.sentAdm[i]
	addr, err := adm.Do(ctx, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", s.name).StringSlice()
	if err != nil || len(addr) != 2 {
		return fmt.Sprintf("GET-MASTER-ADDR-BY-NAME = %v, %v", addr, err)
	}
	if got := net.JoinHostPort(addr[0], addr[1]); got != master {
		return fmt.Sprintf("master is %s, want %s", got, master)
	}
	replicas, err := adm.Do(ctx, "SENTINEL", "REPLICAS", s.name).Slice()
	if err != nil {
		return fmt.Sprintf("SENTINEL REPLICAS: %v", err)
	}
	if ok := slices.ContainsFunc(replicas, func(r any) bool {
		f := fieldMap(r)
		return f["flags"] == "slave" && f["master-link-status"] == "ok"
	}); !ok {
		return fmt.Sprintf("no working replica in %v", replicas)
	}
	sentinels, err := adm.Do(ctx, "SENTINEL", "SENTINELS", s.name).Slice()
	if err != nil {
		return fmt.Sprintf("SENTINEL SENTINELS: %v", err)
	}
	working := 0
	for _, o := range sentinels {
		if fieldMap(o)["flags"] == "sentinel" {
			working++
		}
	}
	if working != sentinelCount-1 {
		return fmt.Sprintf("knows %d working sentinels, want %d", working, sentinelCount-1)
	}
	if err := adm.Do(ctx, "SENTINEL", "CKQUORUM", s.name).Err(); err != nil {
		return fmt.Sprintf("CKQUORUM: %v", err)
	}
	return ""
}

// fieldMap turns a sentinel reply entry (a RESP2 flat list or a RESP3 map) into a map.
func fieldMap(v any) map[string]string {
	out := map[string]string{}
	switch v := v.(type) {
	case []any:
		for i := 0; i+1 < len(v); i += 2 {
			out[fmt.Sprint(v[i])] = fmt.Sprint(v[i+1])
		}
	case map[any]any:
		for k, x := range v {
			out[fmt.Sprint(k)] = fmt.Sprint(x)
		}
	case map[string]any:
		for k, x := range v {
			out[k] = fmt.Sprint(x)
		}
	}
	return out
}

// MasterName returns the name the sentinels monitor the master under. Safe for concurrent use.
func (s *Sentinel) MasterName() string { return s.name }

// SentinelAddrs returns the three sentinels' addresses ("127.0.0.1:PORT"), for
// redis.FailoverOptions.SentinelAddrs. The caller owns the slice. Safe for concurrent use.
func (s *Sentinel) SentinelAddrs() []string {
	out := make([]string, len(s.sentinels))
	for i, sn := range s.sentinels {
		out[i] = sn.Addr()
	}
	return out
}

// Servers returns the handles of the two data nodes: the initial master, then the initial replica.
// Roles change with failovers; use Master for the current one. A data node that is restarted comes
// back as an empty master until the sentinels reconfigure it as a replica. The caller owns the slice,
// not the Servers. Safe for concurrent use.
func (s *Sentinel) Servers() []*Server { return slices.Clone(s.data) }

// Sentinels returns the handles of the three sentinel processes (Kill, Freeze, Restart, ... work on
// them; a restarted sentinel keeps its rewritten config). The caller owns the slice, not the
// Servers. Safe for concurrent use.
func (s *Sentinel) Sentinels() []*Server { return slices.Clone(s.sentinels) }

// FailoverOptions returns *redis.FailoverOptions for this set-up with the same test-friendly settings
// as Server.Options (ContextTimeoutEnabled true, DialTimeout, ReadTimeout, WriteTimeout and
// PoolTimeout 1s, MaxRetries -1, DisableIdentity true; go-redis always disables maint notifications
// for failover clients), the master name, the sentinel addresses and the password from
// SentinelConfig.Args. Every call returns a fresh value the caller owns. Safe for concurrent use.
func (s *Sentinel) FailoverOptions() *redis.FailoverOptions {
	return &redis.FailoverOptions{
		MasterName:            s.name,
		SentinelAddrs:         s.SentinelAddrs(),
		Password:              s.password,
		ContextTimeoutEnabled: true,
		DialTimeout:           time.Second,
		ReadTimeout:           time.Second,
		WriteTimeout:          time.Second,
		PoolTimeout:           time.Second,
		MaxRetries:            -1,
		DisableIdentity:       true,
	}
}

// FailoverClient returns redis.NewFailoverClient(FailoverOptions()), closed by tb.Cleanup. The client
// belongs to the test; it may be used from any goroutine.
func (s *Sentinel) FailoverClient(tb testing.TB) *redis.Client {
	tb.Helper()
	c := redis.NewFailoverClient(s.FailoverOptions())
	tb.Cleanup(func() { _ = c.Close() })
	return c
}

// Master returns the master's address as the running sentinels report it; it fails the test if they
// disagree (e.g. during a failover) or none answers.
func (s *Sentinel) Master(tb testing.TB) string {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), adminTimeout)
	defer cancel()
	addr, why := s.agreedMaster(ctx)
	if addr == "" {
		tb.Fatalf("redistest: Sentinel.Master: %s", why)
	}
	return addr
}

// agreedMaster returns the master all running sentinels report, or "" and why not.
func (s *Sentinel) agreedMaster(ctx context.Context) (string, string) {
	var agreed string
	for i, sn := range s.sentinels {
		if !sn.running() {
			continue
		}
		qctx, cancel := context.WithTimeout(ctx, pollQueryTimeout)
		addr, err := s.sentAdm[i].Do(qctx, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", s.name).StringSlice()
		cancel()
		if err != nil || len(addr) != 2 {
			return "", fmt.Sprintf("sentinel %s: GET-MASTER-ADDR-BY-NAME = %v, %v", sn.Addr(), addr, err)
		}
		a := net.JoinHostPort(addr[0], addr[1])
		if agreed != "" && a != agreed {
			return "", fmt.Sprintf("sentinels disagree: %s vs %s", agreed, a)
		}
		agreed = a
	}
	if agreed == "" {
		return "", "no sentinel is running"
	}
	return agreed, ""
}

// KillMaster sends SIGKILL to the current master (as the sentinels report it), waits for the process
// to exit, and returns its address. The sentinels fail over after DownAfter plus an election (a few
// seconds); WaitFailover waits for that. Test goroutine only.
func (s *Sentinel) KillMaster(tb testing.TB) string {
	tb.Helper()
	addr := s.Master(tb)
	i := slices.IndexFunc(s.data, func(d *Server) bool { return d.Addr() == addr })
	if i < 0 {
		tb.Fatalf("redistest: KillMaster: sentinels report master %s, which is not one of %v", addr, s.data)
		return ""
	}
	s.mu.Lock()
	s.killed = addr
	s.mu.Unlock()
	s.data[i].Kill(tb)
	return addr
}

// WaitFailover waits at most timeout until every running sentinel reports the same master, other
// than the one KillMaster last killed, and that master is running, has role master and takes a write
// (a key under a prefix of its own, deleted again). It returns the new master's address and fails
// the test on timeout or when KillMaster was not called. Test goroutine only.
func (s *Sentinel) WaitFailover(tb testing.TB, timeout time.Duration) string {
	tb.Helper()
	s.mu.Lock()
	killed := s.killed
	s.mu.Unlock()
	if killed == "" {
		tb.Fatal("redistest: WaitFailover: call KillMaster first")
		return ""
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var master string
	err := poll(ctx, func() (bool, string) {
		addr, why := s.agreedMaster(ctx)
		if addr == "" {
			return false, why
		}
		if addr == killed {
			return false, "sentinels still report the killed master " + killed
		}
		i := slices.IndexFunc(s.data, func(d *Server) bool { return d.Addr() == addr })
		if i < 0 || !s.data[i].running() {
			return false, fmt.Sprintf("reported master %s is not running", addr)
		}
		qctx, qcancel := context.WithTimeout(ctx, pollQueryTimeout)
		defer qcancel()
		if err := s.dataAdm[i].Set(qctx, s.probeKey, "1", 0).Err(); err != nil {
			return false, fmt.Sprintf("SET on %s: %v", addr, err)
		}
		if err := s.dataAdm[i].Del(qctx, s.probeKey).Err(); err != nil {
			return false, fmt.Sprintf("DEL on %s: %v", addr, err)
		}
		master = addr
		return true, ""
	})
	if err != nil {
		tb.Fatalf("redistest: no failover from %s within %v: %v", killed, timeout, err)
		return ""
	}
	return master
}

// Close kills all five processes, waits for them and removes their directories. It is idempotent and
// safe to call concurrently with anything.
func (s *Sentinel) Close() error {
	s.closeOnce.Do(func() {
		for _, a := range slices.Concat(s.dataAdm, s.sentAdm) {
			_ = a.Close()
		}
		var (
			mu   sync.Mutex
			errs []error
			wg   sync.WaitGroup
		)
		for _, p := range slices.Concat(s.sentinels, s.data) {
			if p == nil {
				continue
			}
			wg.Go(func() {
				if err := p.Close(); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		s.closeErr = errors.Join(errs...)
	})
	return s.closeErr
}
