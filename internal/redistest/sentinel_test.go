package redistest

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

func TestSentinel_Failover(t *testing.T) {
	t.Parallel()
	start := time.Now()
	s := StartSentinel(t, SentinelConfig{})
	t.Logf("timing: StartSentinel took %v", time.Since(start))

	if got := s.MasterName(); got != DefaultSentinelMasterName {
		t.Fatalf("MasterName() = %q, want %q", got, DefaultSentinelMasterName)
	}
	if got := len(s.SentinelAddrs()); got != 3 {
		t.Fatalf("len(SentinelAddrs()) = %d, want 3", got)
	}
	old := s.Master(t)
	if old != s.Servers()[0].Addr() {
		t.Fatalf("Master() = %s, want the first server %s", old, s.Servers()[0].Addr())
	}

	fc := s.FailoverClient(t)
	ctx := ctxT(t, 30*time.Second)
	if err := fc.Set(ctx, "k", "before", 0).Err(); err != nil {
		t.Fatalf("Set(k) = %v, want nil", err)
	}
	if n, err := s.Servers()[0].Client(t).Wait(ctx, 1, time.Second).Result(); err != nil || n != 1 {
		t.Fatalf("WAIT 1 = %d, %v, want 1, nil", n, err)
	}

	start = time.Now()
	if got := s.KillMaster(t); got != old {
		t.Fatalf("KillMaster() = %s, want %s", got, old)
	}
	newMaster := s.WaitFailover(t, 20*time.Second)
	t.Logf("timing: KillMaster to WaitFailover took %v", time.Since(start))
	if want := s.Servers()[1].Addr(); newMaster != want {
		t.Fatalf("WaitFailover() = %s, want the replica %s", newMaster, want)
	}
	if got := s.Master(t); got != newMaster {
		t.Fatalf("Master() = %s after failover, want %s", got, newMaster)
	}

	// The failover client follows the sentinels. Its pooled connections to the old master are
	// broken, and with MaxRetries -1 the command that finds one fails; count those.
	failed := 0
	deadline := time.Now().Add(5 * time.Second)
	for {
		got, err := fc.Get(ctx, "k").Result()
		if err == nil {
			if got != "before" {
				t.Fatalf("Get(k) after failover = %q, want %q", got, "before")
			}
			break
		}
		failed++
		if time.Now().After(deadline) {
			t.Fatalf("Get(k) after failover = %v, want nil", err)
		}
	}
	t.Logf("go-redis: %d failed commands before the failover client reached the new master", failed)
	if err := fc.Set(ctx, "k", "after", 0).Err(); err != nil {
		t.Fatalf("Set(k) after failover = %v, want nil", err)
	}
	if got, err := s.Servers()[1].Client(t).Get(ctx, "k").Result(); err != nil || got != "after" {
		t.Fatalf("Get(k) on the new master = %q, %v, want %q, nil", got, err, "after")
	}
}

func TestSentinel_WaitFailoverWithoutKill(t *testing.T) {
	// Not parallel: it checks that REDIS_ADDR, even when set, is not used.
	t.Setenv(envAddr, "127.0.0.1:1")
	s := StartSentinel(t, SentinelConfig{MasterName: "other"})
	if got := s.MasterName(); got != "other" {
		t.Fatalf("MasterName() = %q, want %q", got, "other")
	}
	if got := s.Master(t); got != s.Servers()[0].Addr() {
		t.Fatalf("Master() = %s, want %s", got, s.Servers()[0].Addr())
	}
	f := &fakeTB{TB: t}
	if got := s.WaitFailover(f, time.Second); got != "" {
		t.Fatalf("WaitFailover without KillMaster = %q, want \"\"", got)
	}
	if got := f.take(); len(got) != 1 {
		t.Fatalf("WaitFailover without KillMaster fatals = %q, want 1", got)
	}
}

func TestSentinel_MissingBinary(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	s, err := NewSentinel(SentinelConfig{})
	if err == nil {
		s.Close()
		t.Fatalf("NewSentinel() with empty PATH = nil error, want one")
	}
	if err.Error() != errClusterNotFoundText {
		t.Fatalf("NewSentinel() error = %q, want %q", err, errClusterNotFoundText)
	}
	f := &fakeTB{TB: t}
	if s := StartSentinel(f, SentinelConfig{}); s != nil {
		t.Fatalf("StartSentinel() with empty PATH = %v, want nil", s)
	}
	if got := f.take(); len(got) == 0 || got[0] != errClusterNotFoundText {
		t.Fatalf("StartSentinel() fatals = %q, want [%q]", got, errClusterNotFoundText)
	}
}

func TestSentinel_BadConfig(t *testing.T) {
	t.Parallel()
	for _, cfg := range []SentinelConfig{
		{Args: []string{"--tls-port", "0"}},
		{MasterName: "a b"},
		{DownAfter: time.Microsecond},
	} {
		if s, err := NewSentinel(cfg); err == nil {
			s.Close()
			t.Errorf("NewSentinel(%+v) = nil error, want one", cfg)
		}
	}
}

func TestSentinel_Password(t *testing.T) {
	t.Parallel()
	s := StartSentinel(t, SentinelConfig{Args: []string{"--requirepass", "s3cret"}})
	ctx := ctxT(t, 10*time.Second)
	fc := s.FailoverClient(t)
	if err := fc.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatalf("Set(k) = %v, want nil", err)
	}
	opt := s.FailoverOptions()
	opt.Password = ""
	noAuth := redis.NewFailoverClient(opt)
	defer noAuth.Close()
	if err := noAuth.Get(ctx, "k").Err(); err == nil || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Get without password = %v, want an auth error", err)
	}
}
