package redistest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// fakeTB records Fatal calls instead of failing the real test; everything else goes to the real one.
type fakeTB struct {
	testing.TB
	mu     sync.Mutex
	fatals []string
}

func (f *fakeTB) Helper() {}

func (f *fakeTB) Fatal(args ...any) { f.record(fmt.Sprint(args...)) }

func (f *fakeTB) Fatalf(format string, args ...any) { f.record(fmt.Sprintf(format, args...)) }

func (f *fakeTB) FailNow() { f.record("FailNow") }

func (f *fakeTB) record(msg string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fatals = append(f.fatals, msg)
}

// take returns and clears the recorded Fatal messages.
func (f *fakeTB) take() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := f.fatals
	f.fatals = nil
	return out
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func isTimeout(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func mustSet(t *testing.T, c *redis.Client, key, val string) {
	t.Helper()
	if err := c.Set(ctxT(t, 2*time.Second), key, val, 0).Err(); err != nil {
		t.Fatalf("Set(%q) = %v, want nil", key, err)
	}
}

func wantGet(t *testing.T, c *redis.Client, key, want string) {
	t.Helper()
	got, err := c.Get(ctxT(t, 2*time.Second), key).Result()
	if err != nil || got != want {
		t.Fatalf("Get(%q) = %q, %v, want %q, nil", key, got, err, want)
	}
}

func wantMissing(t *testing.T, c *redis.Client, key string) {
	t.Helper()
	got, err := c.Get(ctxT(t, 2*time.Second), key).Result()
	if !errors.Is(err, redis.Nil) {
		t.Fatalf("Get(%q) = %q, %v, want redis.Nil", key, got, err)
	}
}

func TestStartSetGet(t *testing.T) {
	t.Parallel()
	s := Start(t)
	if s.External() {
		t.Fatalf("External() = true, want false")
	}
	if want := fmt.Sprintf("127.0.0.1:%d", s.Port()); s.Addr() != want {
		t.Fatalf("Addr() = %q, want %q", s.Addr(), want)
	}
	if !strings.HasPrefix(s.Prefix(), "rt") || !strings.HasSuffix(s.Prefix(), ":") {
		t.Fatalf("Prefix() = %q, want rt...:", s.Prefix())
	}
	c := s.Client(t)
	key := s.Prefix() + "k"
	mustSet(t, c, key, "v")
	wantGet(t, c, key, "v")
}

func TestOptions(t *testing.T) {
	t.Parallel()
	s := Start(t)
	o := s.Options()
	if o.Addr != s.Addr() || !o.ContextTimeoutEnabled || o.DialTimeout != time.Second ||
		o.ReadTimeout != time.Second || o.WriteTimeout != time.Second || o.PoolTimeout != time.Second ||
		o.MaxRetries != -1 || !o.DisableIdentity || o.MaintNotificationsConfig == nil ||
		o.MaintNotificationsConfig.Mode != "disabled" {
		t.Fatalf("Options() = %+v, want test-friendly settings", o)
	}
	o.Addr = "changed"
	if s.Options().Addr != s.Addr() {
		t.Fatalf("Options() shares state between calls")
	}
}

func TestTwoServersAreIndependent(t *testing.T) {
	t.Parallel()
	a, b := Start(t), Start(t)
	if a.Port() == b.Port() {
		t.Fatalf("Port() = %d for both servers, want different ports", a.Port())
	}
	if a.Prefix() == b.Prefix() {
		t.Fatalf("Prefix() = %q for both servers, want different prefixes", a.Prefix())
	}
	ca, cb := a.Client(t), b.Client(t)
	mustSet(t, ca, "k", "a")
	wantMissing(t, cb, "k")
}

func TestStopRestart(t *testing.T) {
	t.Parallel()
	s := Start(t)
	c := s.Client(t)
	addr := s.Addr()
	mustSet(t, c, "k", "v")

	s.Stop(t)
	s.Stop(t) // stopping a stopped server is a no-op
	if err := c.Ping(ctxT(t, 2*time.Second)).Err(); err == nil {
		t.Fatalf("Ping after Stop = nil, want an error")
	}

	s.Restart(t)
	if s.Addr() != addr {
		t.Fatalf("Addr() after Restart = %q, want %q", s.Addr(), addr)
	}
	if err := c.Ping(ctxT(t, 2*time.Second)).Err(); err != nil {
		t.Fatalf("Ping after Restart = %v, want nil", err)
	}
	wantMissing(t, c, "k")
}

func TestRestartRunningServer(t *testing.T) {
	t.Parallel()
	s := Start(t)
	c := s.Client(t)
	mustSet(t, c, "k", "v")
	s.Restart(t) // stops first
	// The client's pooled connection died with the old process; go-redis notices and redials.
	wantMissing(t, c, "k")
}

func TestKillRestart(t *testing.T) {
	t.Parallel()
	s := Start(t)
	c := s.Client(t)
	mustSet(t, c, "k", "v")

	s.Kill(t)
	if got, err := c.Get(ctxT(t, 5*time.Second), "k").Result(); err == nil || errors.Is(err, redis.Nil) {
		t.Fatalf("Get(%q) after Kill = %q, %v, want a connection error", "k", got, err)
	} else {
		t.Logf("Get after Kill: %v", err)
	}
	s.Kill(t) // killing a dead server is a no-op

	s.Restart(t)
	wantMissing(t, c, "k")
	mustSet(t, c, "k", "v2")
	wantGet(t, c, "k", "v2")
}

func TestFreezeThaw(t *testing.T) {
	t.Parallel()
	s := Start(t)
	c := s.Client(t)
	mustSet(t, c, "k", "v")

	s.Freeze(t)
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	got, err := c.Get(ctx, "k").Result()
	cancel()
	if !isTimeout(err) {
		t.Fatalf("Get(%q) on frozen server = %q, %v, want a deadline error", "k", got, err)
	}
	// About 200ms; the bound is loose because parallel -race runs on 2 cores can starve the test.
	if el := time.Since(start); el > 3*time.Second {
		t.Fatalf("Get on frozen server took %v, want about 200ms", el)
	}
	t.Logf("Get on frozen server: %v after %v", err, time.Since(start))
	// A brand-new connection is accepted by the kernel but its handshake is never answered.
	c2 := s.Client(t)
	if err := c2.Ping(ctxT(t, 200*time.Millisecond)).Err(); !isTimeout(err) {
		t.Fatalf("Ping on frozen server with new client = %v, want a deadline error", err)
	}

	s.Thaw(t)
	wantGet(t, c, "k", "v")
	wantGet(t, c2, "k", "v")
}

func TestStopFrozen(t *testing.T) {
	t.Parallel()
	s := Start(t)
	s.Freeze(t)
	s.Stop(t)
	s.Restart(t)
	if err := s.Client(t).Ping(ctxT(t, 2*time.Second)).Err(); err != nil {
		t.Fatalf("Ping after Freeze, Stop, Restart = %v, want nil", err)
	}
	s.Freeze(t) // left frozen: Close must still end it
}

func TestPauseWriteOnly(t *testing.T) {
	t.Parallel()
	s := Start(t)
	c := s.Client(t)
	mustSet(t, c, "k", "v")

	s.Pause(t, 2*time.Second, true)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	err := c.Set(ctx, "k", "w", 0).Err()
	cancel()
	if !isTimeout(err) {
		t.Fatalf("Set(%q) during write pause = %v, want a deadline error", "k", err)
	}
	wantGet(t, c, "k", "v")
}

func TestPauseAll(t *testing.T) {
	t.Parallel()
	s := Start(t)
	c := s.Client(t)
	mustSet(t, c, "k", "v")

	s.Pause(t, 400*time.Millisecond, false)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	got, err := c.Get(ctx, "k").Result()
	cancel()
	if !isTimeout(err) {
		t.Fatalf("Get(%q) during pause = %q, %v, want a deadline error", "k", got, err)
	}
	// The pause ends by itself.
	wantGet(t, c, "k", "v")
}

func TestPauseRejectsNonPositive(t *testing.T) {
	t.Parallel()
	s := Start(t)
	f := &fakeTB{TB: t}
	s.Pause(f, 0, false)
	if got := f.take(); len(got) != 1 || !strings.Contains(got[0], "positive") {
		t.Fatalf("Pause(0) fatals = %q, want one about a positive duration", got)
	}
}

func TestKillPubSub(t *testing.T) {
	t.Parallel()
	s := Start(t)
	c := s.Client(t)
	ctx := ctxT(t, 5*time.Second)
	ps := c.Subscribe(ctx, s.Prefix()+"ch")
	defer ps.Close()
	if _, err := ps.Receive(ctx); err != nil {
		t.Fatalf("Receive(subscription) = %v, want nil", err)
	}

	if n := s.KillPubSub(t); n < 1 {
		t.Fatalf("KillPubSub() = %d, want >= 1", n)
	}
	msg, err := ps.ReceiveTimeout(ctx, 2*time.Second)
	if err == nil {
		t.Fatalf("ReceiveTimeout after KillPubSub = %v, nil, want an error", msg)
	}
	if isTimeout(err) {
		t.Fatalf("ReceiveTimeout after KillPubSub = %v, want a connection error, not a timeout", err)
	}
	t.Logf("ReceiveTimeout after KillPubSub: %v", err)

	// Regular clients survive. (go-redis's PubSub reconnects and resubscribes right after that
	// error, so it would be killed again: close it before counting.)
	mustSet(t, c, "k", "v")
	if err := ps.Close(); err != nil {
		t.Fatalf("PubSub.Close() = %v, want nil", err)
	}
	if n := s.KillPubSub(t); n != 0 {
		t.Fatalf("KillPubSub() with no subscriber = %d, want 0", n)
	}
}

func TestRequirePass(t *testing.T) {
	t.Parallel()
	s := Start(t, Config{Args: []string{"--requirepass", "sekret"}})
	if got := s.Options().Password; got != "sekret" {
		t.Fatalf("Options().Password = %q, want %q", got, "sekret")
	}
	c := s.Client(t)
	mustSet(t, c, "k", "v")
	opt := s.Options()
	opt.Password = ""
	anon := redis.NewClient(opt)
	defer anon.Close()
	if err := anon.Ping(ctxT(t, 2*time.Second)).Err(); err == nil {
		t.Fatalf("Ping without password = nil, want NOAUTH")
	}
	if n := s.KillPubSub(t); n != 0 { // admin commands authenticate
		t.Fatalf("KillPubSub() = %d, want 0", n)
	}
	s.Restart(t) // readiness check accepts -NOAUTH
	wantMissing(t, c, "k")
}

func TestConfigDir(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "data")
	s, err := New(Config{Dir: dir})
	if err != nil {
		t.Fatalf("New(Dir) = %v, want nil", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close() = %v, want nil", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "redis-server.log")); err != nil {
		t.Fatalf("Stat(log) after Close = %v, want the caller's dir kept with the log", err)
	}
}

func TestStartupFailureShowsLog(t *testing.T) {
	t.Parallel()
	s, err := New(Config{Args: []string{"--no-such-directive", "x"}})
	if err == nil {
		s.Close()
		t.Fatalf("New(bad args) = nil error, want one")
	}
	if !strings.Contains(err.Error(), "no-such-directive") {
		t.Fatalf("New(bad args) = %v, want the log lines naming the bad directive", err)
	}
}

func TestRestartPortTaken(t *testing.T) {
	t.Parallel()
	s := Start(t)
	s.Stop(t)
	l, err := net.Listen("tcp", s.Addr())
	if err != nil {
		t.Fatalf("Listen(%q) = %v, want nil", s.Addr(), err)
	}
	defer l.Close()
	f := &fakeTB{TB: t}
	s.Restart(f)
	got := f.take()
	if len(got) != 1 || !strings.Contains(got[0], "Address already in use") {
		t.Fatalf("Restart on a taken port fatals = %q, want one quoting the log", got)
	}
}

func TestCloseIdempotentConcurrent(t *testing.T) {
	t.Parallel()
	s, err := New(Config{})
	if err != nil {
		t.Fatalf("New() = %v, want nil", err)
	}
	dir := s.dir
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Go(func() { errs[i] = s.Close() })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("Close() #%d = %v, want nil", i, err)
		}
	}
	if answersPing(s.Addr()) {
		t.Fatalf("server on %s answers after Close", s.Addr())
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("Stat(temp dir) after Close = %v, want not exist", err)
	}
	f := &fakeTB{TB: t}
	s.Stop(f)
	s.Restart(f)
	s.Freeze(f)
	if got := f.take(); len(got) != 3 {
		t.Fatalf("faults after Close fatals = %q, want 3", got)
	}
}

func TestMissingBinary(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	s, err := New(Config{})
	if err == nil {
		s.Close()
		t.Fatalf("New() with empty PATH = nil error, want one")
	}
	const want = "redis-server not found in PATH: install it (e.g. apt-get install redis-server) or set REDIS_ADDR to a server the tests may use"
	if err.Error() != want {
		t.Fatalf("New() error = %q, want %q", err, want)
	}
}

func TestSharedExternal(t *testing.T) {
	priv := Start(t)
	privClient := priv.Client(t)
	t.Setenv("REDIS_ADDR", priv.Addr())

	s := Shared(t)
	if !s.External() {
		t.Fatalf("External() = false, want true")
	}
	if s.Addr() != priv.Addr() || s.Port() != priv.Port() {
		t.Fatalf("Addr(), Port() = %q, %d, want %q, %d", s.Addr(), s.Port(), priv.Addr(), priv.Port())
	}
	if s.Prefix() == priv.Prefix() || s.Prefix() == Shared(t).Prefix() {
		t.Fatalf("Prefix() = %q repeats, want a new prefix per Server", s.Prefix())
	}
	c := s.Client(t)
	key := s.Prefix() + "k"
	mustSet(t, c, key, "v")
	wantGet(t, privClient, key, "v")

	f := &fakeTB{TB: t}
	s.Stop(f)
	s.Kill(f)
	s.Restart(f)
	s.Freeze(f)
	s.Thaw(f)
	s.Pause(f, time.Second, true)
	if n := s.KillPubSub(f); n != 0 {
		t.Fatalf("KillPubSub() on external = %d, want 0", n)
	}
	got := f.take()
	if len(got) != 7 {
		t.Fatalf("fault methods on external fataled %d times (%q), want 7", len(got), got)
	}
	for _, m := range got {
		if m != "redistest: fault injection needs a private redis-server; unset REDIS_ADDR" {
			t.Fatalf("fatal message = %q, want the REDIS_ADDR hint", m)
		}
	}
	// The external server is untouched.
	wantGet(t, c, key, "v")
	if err := s.Close(); err != nil {
		t.Fatalf("Close() on external = %v, want nil", err)
	}
	wantGet(t, privClient, key, "v")
}

func TestSharedExternalURL(t *testing.T) {
	priv := Start(t, Config{Args: []string{"--requirepass", "sekret"}})
	t.Setenv("REDIS_ADDR", "redis://:sekret@"+priv.Addr()+"/3")
	s := Shared(t)
	if o := s.Options(); !s.External() || o.Addr != priv.Addr() || o.Password != "sekret" || o.DB != 3 {
		t.Fatalf("Shared() from URL: External() = %v, Options() = %+v, want external db 3 with password", s.External(), o)
	}
	c := s.Client(t)
	mustSet(t, c, s.Prefix()+"k", "v")
	wantMissing(t, priv.Client(t), s.Prefix()+"k") // it went to DB 3, not 0
}

func TestSharedExternalUnreachable(t *testing.T) {
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("REDIS_ADDR", fmt.Sprintf("127.0.0.1:%d", port))
	_, cleanup, err := NewShared()
	cleanup()
	if err == nil || !strings.Contains(err.Error(), "does not answer PING") {
		t.Fatalf("NewShared() with a dead REDIS_ADDR = %v, want a PING error", err)
	}
}

func TestSharedPrivate(t *testing.T) {
	t.Setenv("REDIS_ADDR", "")
	s := Shared(t)
	if s.External() {
		t.Fatalf("External() = true with REDIS_ADDR empty, want false")
	}
	s.Kill(t)
	s.Restart(t)
	if err := s.Client(t).Ping(ctxT(t, 2*time.Second)).Err(); err != nil {
		t.Fatalf("Ping = %v, want nil", err)
	}
}

func TestNewShared(t *testing.T) {
	t.Setenv("REDIS_ADDR", "")
	s, cleanup, err := NewShared()
	if err != nil {
		t.Fatalf("NewShared() = %v, want nil", err)
	}
	if s.External() {
		t.Fatalf("External() = true, want false")
	}
	if !answersPing(s.Addr()) {
		t.Fatalf("server on %s does not answer", s.Addr())
	}

	t.Setenv("REDIS_ADDR", s.Addr())
	ext, extCleanup, err := NewShared()
	if err != nil {
		t.Fatalf("NewShared() with REDIS_ADDR = %v, want nil", err)
	}
	if !ext.External() || ext.Addr() != s.Addr() {
		t.Fatalf("NewShared() with REDIS_ADDR: External() = %v, Addr() = %q, want true, %q", ext.External(), ext.Addr(), s.Addr())
	}
	extCleanup()
	if !answersPing(s.Addr()) {
		t.Fatalf("external cleanup stopped the server")
	}

	cleanup()
	cleanup()
	if answersPing(s.Addr()) {
		t.Fatalf("server on %s answers after cleanup", s.Addr())
	}
}

func TestStartTooManyConfigs(t *testing.T) {
	t.Parallel()
	f := &fakeTB{TB: t}
	func() {
		defer func() { _ = recover() }()
		Start(f, Config{}, Config{})
	}()
	if got := f.take(); len(got) == 0 || !strings.Contains(got[0], "at most one Config") {
		t.Fatalf("Start(two configs) fatals = %q, want one about at most one Config", got)
	}
}

// TestLaunchRejectsAnotherServersAnswer reproduces a port collision: a
// process is launched for a port that a running redis-server already holds.
// The running server answers the readiness probe; launch must see that it
// is not the process it started and report errAddrInUse (so New retries on
// another port), not a server that is not its own. A CI run once got two
// cluster nodes on one port this way: a PING alone passed for both.
//
// The launched process is a sleep, which neither binds nor exits, so the
// probe, not the startup-exit check, has to catch it.
func TestLaunchRejectsAnotherServersAnswer(t *testing.T) {
	const pw = "sekret"
	a := Start(t, Config{Args: []string{"--requirepass", pw}})
	if got, want := serverPID(a.adminAddr, pw), a.proc.cmd.Process.Pid; got != want {
		t.Fatalf("serverPID(%s) = %d, want the server's pid %d", a.adminAddr, got, want)
	}
	if got := serverPID(a.adminAddr, ""); got != 0 {
		t.Fatalf("serverPID without the password = %d, want 0 (answers, will not tell)", got)
	}
	sleep, err := exec.LookPath("sleep")
	if err != nil {
		t.Fatalf("no sleep binary: %v", err)
	}
	b := &Server{bin: sleep, password: pw, dir: t.TempDir()}
	b.logPath = filepath.Join(b.dir, "redis-server.log")
	b.port, b.addr, b.adminAddr = a.port, a.addr, a.adminAddr
	b.args = []string{"30"}
	p, err := b.launch()
	if err == nil {
		_ = p.kill(exitTimeout)
		t.Fatalf("launch reported ready on %s, which another process answers", b.adminAddr)
	}
	if !errors.Is(err, errAddrInUse) {
		t.Fatalf("launch = %v, want errAddrInUse", err)
	}
}
