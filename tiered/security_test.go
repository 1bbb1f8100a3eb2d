package tiered

import (
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"

	"github.com/tiercache/tiercache/internal/redistest"
	"github.com/tiercache/tiercache/invalidate"
)

// aclCommands is the least privilege a Cache and its Bus need, with the
// keys and channel of their prefix (~<prefix>* &<prefix>*). It was found by
// running every operation as a user allowed nothing and adding what Redis
// refused (ACL LOG), until it refused nothing; TestSecurity_ACL checks that
// it is enough and that each command is needed. Commands that Lua scripts
// call are checked by Redis too: INCR is only called from one, and EXISTS,
// GETRANGE, DEL, SET, GET and PUBLISH also are. The README lists the same.
var aclCommands = []string{
	"get", "set", "pttl", "exists", "getrange", "del", "unlink", "scan", "incr",
	"multi", "exec", "publish", "subscribe", "ping", "eval", "evalsha",
}

// urlClient is a client configured the way an application would, from a
// URL through redis.ParseURL, plus the settings every test client has. A
// rediss:// URL gets roots (nil: the system roots) as its trusted CAs.
func urlClient(t testing.TB, rawURL string, roots *x509.CertPool) *redis.Client {
	t.Helper()
	o, err := redis.ParseURL(rawURL)
	if err != nil {
		t.Fatalf("redis.ParseURL: %v", err)
	}
	o.ContextTimeoutEnabled = true
	o.DialTimeout, o.ReadTimeout, o.WriteTimeout, o.PoolTimeout = time.Second, time.Second, time.Second, time.Second
	o.MaxRetries = -1
	o.DisableIdentity = true // Redis 7.0 has no CLIENT SETINFO
	o.MaintNotificationsConfig = &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}
	if o.TLSConfig != nil {
		o.TLSConfig.RootCAs = roots
	}
	rdb := redis.NewClient(o)
	t.Cleanup(func() { rdb.Close() })
	return rdb
}

// urlInstance starts a Bus (with the server's prefix), waits for it to go
// live, and starts a Cache of namespace ns on rdb.
func urlInstance(t testing.TB, s *redistest.Server, rdb *redis.Client, ns string, opts Options, bo invalidate.Options) *instance[string] {
	t.Helper()
	bus := newBus(t, standalone{s}, rdb, bo)
	opts.KeyPrefix = s.Prefix()
	c, err := New[string](ns, rdb, bus, opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return &instance[string]{rdb: rdb, bus: bus, c: c}
}

// tryInstance is urlInstance without waiting for the Bus, and returning
// New's error.
func tryInstance(t testing.TB, s *redistest.Server, rdb *redis.Client, ns string, opts Options) (*Cache[string], error) {
	t.Helper()
	bus, err := invalidate.New(rdb, invalidate.Options{Prefix: s.Prefix()})
	if err != nil {
		t.Fatalf("invalidate.New: %v", err)
	}
	t.Cleanup(func() { bus.Close() })
	opts.KeyPrefix = s.Prefix()
	c, err := New[string](ns, rdb, bus, opts)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Close() })
	return c, nil
}

// checkPropagation checks that a's writes reach b's L1 through b's
// subscription: b serves v1 from L1, a writes v2, and once b has applied
// the invalidation b returns v2.
func checkPropagation(t *testing.T, a, b *instance[string], v1, v2 string) {
	t.Helper()
	ctx := ctxT(t)
	got := applied(b.c)
	if err := a.c.Set(ctx, "k", v1, 0); err != nil {
		t.Fatalf("A: Set: %v", err)
	}
	await(t, got, "B: the invalidation of A's first Set")
	mustGet(t, b.c, "k", v1, "B, from Redis")
	hits := b.c.Stats().L1.Hits
	mustGet(t, b.c, "k", v1, "B, from L1")
	if h := b.c.Stats().L1.Hits; h != hits+1 {
		t.Fatalf("B: L1 hits %d after a second Get, want %d: the value was not served from L1", h, hits+1)
	}
	if err := a.c.Set(ctx, "k", v2, 0); err != nil {
		t.Fatalf("A: Set: %v", err)
	}
	await(t, got, "B: the invalidation of A's second Set")
	mustGet(t, b.c, "k", v2, "B, after A's write")
}

// exercise runs every Redis-backed operation of the Cache once (a and b
// share a namespace) and returns what failed. Each operation is bounded, so
// a refused command cannot stall it. With contend, two instances also
// compete for one fleet lease (Options.Lease), so that one waits for the
// other's result.
func exercise(t *testing.T, a, b *Cache[string], contend bool) []error {
	t.Helper()
	var errs []error
	do := func(what string, f func(ctx context.Context) error) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := f(ctx); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", what, err))
		}
	}
	do("Ping", a.Ping)
	do("Set", func(ctx context.Context) error { return a.Set(ctx, "x", "1", 0) })
	do("Get", func(ctx context.Context) error { return errOf(b.GetMany(ctx, []string{"x"})) })
	do("Exists", func(ctx context.Context) error { return errOf(b.Exists(ctx, "never-read")) }) // not in L1: asks Redis
	do("SetMany", func(ctx context.Context) error { return a.SetMany(ctx, map[string]string{"m1": "1", "m2": "2"}, 0) })
	do("GetMany", func(ctx context.Context) error { return errOf(b.GetMany(ctx, []string{"m1", "m2", "none"})) })
	do("Remember", func(ctx context.Context) error {
		return errOf(a.Remember(ctx, "r", func(context.Context, string) (string, error) { return "loaded", nil }))
	})
	do("Remember of an absent key", func(ctx context.Context) error {
		_, err := a.Remember(ctx, "absent", func(context.Context, string) (string, error) { return "", ErrNotFound })
		if errors.Is(err, ErrNotFound) {
			return nil
		}
		return err
	})
	do("RememberMany", func(ctx context.Context) error {
		return errOf(b.RememberMany(ctx, []string{"rm1", "rm2"}, func(_ context.Context, keys []string) (map[string]string, error) {
			out := make(map[string]string, len(keys))
			for _, k := range keys {
				out[k] = "loaded"
			}
			return out, nil
		}))
	})
	do("Delete", func(ctx context.Context) error { return a.Delete(ctx, "x") })
	do("Remember over a tombstone", func(ctx context.Context) error {
		return errOf(b.Remember(ctx, "x", func(context.Context, string) (string, error) { return "reloaded", nil }))
	})
	do("DeleteMany", func(ctx context.Context) error { return a.DeleteMany(ctx, "m1", "m2") })
	do("DeletePattern", func(ctx context.Context) error { return errOf(a.DeletePattern(ctx, "rm*")) })
	if contend {
		do("Remember under a contended lease", func(ctx context.Context) error {
			started, release := make(chan struct{}), make(chan struct{})
			var wg sync.WaitGroup
			var errA error
			wg.Go(func() {
				_, errA = a.Remember(ctx, "lease", func(context.Context, string) (string, error) {
					close(started)
					<-release
					return "leased", nil
				})
			})
			<-started
			waits := b.Stats().LeaseWaits
			var errB error
			wg.Go(func() {
				var v string
				v, errB = b.Remember(ctx, "lease", func(context.Context, string) (string, error) {
					return "", errors.New("B loaded although A held the lease")
				})
				if errB == nil && v != "leased" {
					errB = fmt.Errorf("B: Remember = %q, want A's %q", v, "leased")
				}
			})
			eventually(t, time.Second, "B waiting for A's lease", func() bool { return b.Stats().LeaseWaits > waits })
			close(release)
			wg.Wait()
			return errors.Join(errA, errB)
		})
	}
	do("Clear", a.Clear)
	return errs
}

// aclDenied returns the commands Redis refused to user since the last
// ACL LOG RESET.
func aclDenied(t *testing.T, admin *redis.Client, user string) []string {
	t.Helper()
	entries, err := admin.Do(ctxT(t), "ACL", "LOG", "1000").Slice()
	if err != nil {
		t.Fatalf("ACL LOG: %v", err)
	}
	var out []string
	for _, e := range entries {
		f := map[string]string{}
		switch e := e.(type) {
		case map[any]any: // RESP3
			for k, v := range e {
				f[fmt.Sprint(k)] = fmt.Sprint(v)
			}
		case []any: // RESP2
			for i := 0; i+1 < len(e); i += 2 {
				f[fmt.Sprint(e[i])] = fmt.Sprint(e[i+1])
			}
		}
		if f["username"] == user && f["reason"] == "command" && !slices.Contains(out, f["object"]) {
			out = append(out, f["object"])
		}
	}
	slices.Sort(out)
	return out
}

// TestSecurity_ACL runs two instances as an ACL user limited to the cache's
// keys and channel and to aclCommands, connected through
// redis://user:password@host:port/0 URLs: writes propagate through the
// restricted subscription, every operation works and Redis refuses
// nothing; without any one of the commands, Redis refuses it; and a wrong
// password fails New with Redis's error.
func TestSecurity_ACL(t *testing.T) {
	const adminPassword = "admin-password-for-tests"
	s := redistest.Start(t, redistest.Config{Args: []string{"--requirepass", adminPassword}})
	admin := s.Client(t) // the default user, with the --requirepass password
	setUser := func(t *testing.T, user, password string, cmds []string) {
		t.Helper()
		args := []any{"ACL", "SETUSER", user, "reset", "on", ">" + password, "~" + s.Prefix() + "*", "&" + s.Prefix() + "*", "-@all"}
		for _, c := range cmds {
			args = append(args, "+"+c)
		}
		if err := admin.Do(ctxT(t), args...).Err(); err != nil {
			t.Fatalf("ACL SETUSER: %v", err)
		}
	}
	userURL := func(user, password string) string {
		return "redis://" + user + ":" + password + "@" + s.Addr() + "/0"
	}
	if err := admin.Do(ctxT(t), "ACL", "LOG", "RESET").Err(); err != nil {
		t.Fatal(err)
	}

	t.Run("least privilege", func(t *testing.T) {
		setUser(t, "app", "app-password", aclCommands)
		ns := namespace(t)
		opts := Options{Lease: true}
		a := urlInstance(t, s, urlClient(t, userURL("app", "app-password"), nil), ns, opts, invalidate.Options{})
		b := urlInstance(t, s, urlClient(t, userURL("app", "app-password"), nil), ns, opts, invalidate.Options{})
		checkPropagation(t, a, b, "v1", "v2")
		for _, err := range exercise(t, a.c, b.c, true) {
			t.Errorf("as the ACL user: %v", err)
		}
		if d := aclDenied(t, admin, "app"); len(d) > 0 {
			t.Errorf("Redis refused %q to the ACL user: add them to aclCommands (and the README)", d)
		}
	})

	// Each without one command, as its own user, so that they can run at
	// once on one server; EVAL first and alone, after SCRIPT FLUSH, since it
	// is only needed for scripts Redis has not cached yet.
	without := func(t *testing.T, cmd string) {
		user := "app-without-" + cmd
		setUser(t, user, "pw", slices.DeleteFunc(slices.Clone(aclCommands), func(c string) bool { return c == cmd }))
		ns := namespace(t)
		opts := Options{Lease: true}
		a, errA := tryInstance(t, s, urlClient(t, userURL(user, "pw"), nil), ns, opts)
		b, errB := tryInstance(t, s, urlClient(t, userURL(user, "pw"), nil), ns, opts)
		if errA == nil && errB == nil {
			exercise(t, a, b, false)
		}
		if d := aclDenied(t, admin, user); !slices.Contains(d, cmd) {
			t.Errorf("without %s, Redis refused %q: it is not needed, drop it from aclCommands (and the README)", cmd, d)
		}
	}
	t.Run("each command is needed", func(t *testing.T) {
		if err := admin.Do(ctxT(t), "SCRIPT", "FLUSH").Err(); err != nil {
			t.Fatal(err)
		}
		t.Run("without eval", func(t *testing.T) { without(t, "eval") })
		for _, cmd := range aclCommands {
			if cmd != "eval" {
				t.Run("without "+cmd, func(t *testing.T) {
					t.Parallel()
					without(t, cmd)
				})
			}
		}
	})

	t.Run("wrong password", func(t *testing.T) {
		rdb := urlClient(t, userURL("app", "not-the-password"), nil)
		bus, err := invalidate.New(rdb, invalidate.Options{Prefix: s.Prefix()})
		if err != nil {
			t.Fatal(err)
		}
		defer bus.Close()
		c, err := New[string](namespace(t), rdb, bus, Options{KeyPrefix: s.Prefix()})
		if err == nil {
			c.Close()
			t.Fatal("New with a wrong password = nil error, want Redis's WRONGPASS")
		}
		if !strings.Contains(err.Error(), "WRONGPASS") || strings.Contains(err.Error(), "not-the-password") {
			t.Errorf("New with a wrong password: %q, want Redis's WRONGPASS error, without the password", err)
		}
	})
}

// TestSecurity_TLS runs two instances over TLS, each from a rediss:// URL
// with the test CA as its root: writes propagate. A client that does not
// trust the CA fails New with the certificate error.
func TestSecurity_TLS(t *testing.T) {
	certs := redistest.NewTLSCerts(t)
	s := redistest.Start(t, redistest.Config{Args: certs.Args()})
	url := "rediss://" + s.Addr() + "/0"
	ns := namespace(t)
	a := urlInstance(t, s, urlClient(t, url, certs.Pool), ns, Options{}, invalidate.Options{})
	b := urlInstance(t, s, urlClient(t, url, certs.Pool), ns, Options{}, invalidate.Options{})
	checkPropagation(t, a, b, "v1", "v2")

	rdb := urlClient(t, url, x509.NewCertPool()) // trusts nothing
	bus, err := invalidate.New(rdb, invalidate.Options{Prefix: s.Prefix()})
	if err != nil {
		t.Fatal(err)
	}
	defer bus.Close()
	c, err := New[string](namespace(t), rdb, bus, Options{KeyPrefix: s.Prefix()})
	if err == nil {
		c.Close()
		t.Fatal("New with a client that does not trust the server's CA = nil error")
	}
	var unknown x509.UnknownAuthorityError
	if !errors.As(err, &unknown) {
		t.Errorf("New with a client that does not trust the server's CA: %q, want an x509.UnknownAuthorityError", err)
	}
}

// TestSecurity_SecretsNotLogged runs two instances with a password in their
// URL, a Bus Secret and a debug logger, puts values through them, drives
// the Bus through lost and regained streams (pub/sub clients killed, Redis
// stopped and restarted, writes failing until the circuit breaker opens)
// and an authenticated flush, and checks that
// neither the password, nor the secret, nor a value reached the log.
// (Caches have no logger of their own, and nothing in the module records
// spans.)
func TestSecurity_SecretsNotLogged(t *testing.T) {
	const (
		password = "password-MARKER-5e1f"
		marker   = "value-MARKER-c0ffee"
	)
	secret := []byte("secret-MARKER-3b7d-0123456789abcdef")
	s := redistest.Start(t, redistest.Config{Args: []string{"--requirepass", password}})
	url := "redis://:" + password + "@" + s.Addr() + "/0"
	logs := &lockedBuffer{}
	bo := invalidate.Options{Secret: secret, Logger: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))}
	ns := namespace(t)
	a := urlInstance(t, s, urlClient(t, url, nil), ns, Options{}, bo)
	b := urlInstance(t, s, urlClient(t, url, nil), ns, Options{}, bo)
	checkPropagation(t, a, b, marker+"-1", marker+"-2")
	ctx := ctxT(t)

	reconnects := func(in *instance[string]) uint64 { return in.bus.Stats().Reconnects }
	s.KillPubSub(t)
	eventually(t, 5*time.Second, "both buses resubscribed", func() bool { return reconnects(a) >= 1 && reconnects(b) >= 1 })
	waitLive := func() {
		for _, in := range []*instance[string]{a, b} {
			wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			err := in.bus.WaitLive(wctx)
			cancel()
			if err != nil {
				t.Fatalf("WaitLive: %v", err)
			}
		}
	}
	waitLive()
	checkPropagation(t, a, b, marker+"-3", marker+"-4")

	// Writes fail until the circuit breaker opens (and logs its cause);
	// after the restart it closes again and the outbox is replayed.
	s.Stop(t)
	for i := 0; !a.bus.CircuitOpen(); i++ {
		if i == 10 {
			t.Fatalf("the circuit did not open after %d failed writes", i)
		}
		if err := a.c.Set(ctx, "k", fmt.Sprintf("%s-down-%d", marker, i), 0); err == nil {
			t.Fatalf("Set with Redis stopped = nil error")
		}
	}
	s.Restart(t)
	eventually(t, 10*time.Second, "both buses resubscribed after Restart", func() bool { return reconnects(a) >= 2 && reconnects(b) >= 2 })
	eventually(t, 10*time.Second, "the circuit closed", func() bool { return !a.bus.CircuitOpen() })
	waitLive()
	checkPropagation(t, a, b, marker+"-5", marker+"-6")
	// An authenticated flush: B does not take its generation from the
	// message but re-reads it, and drops its L1.
	before := b.bus.Stats().Applied
	if err := a.c.Clear(ctx); err != nil {
		t.Fatalf("Clear: %v", err)
	}
	eventually(t, 5*time.Second, "B: the flush applied", func() bool { return b.bus.Stats().Applied > before })
	if v, ok, err := b.c.Get(ctx, "k"); ok || err != nil {
		t.Errorf("B: Get(%q) after Clear = %q, %v, %v; want a miss", "k", v, ok, err)
	}

	out := logs.String()
	if !strings.Contains(out, "lost") || !strings.Contains(out, "regained") || !strings.Contains(out, "circuit open") {
		t.Fatalf("the log lacks the stream's state changes, so this test checks nothing:\n%s", out)
	}
	for what, s := range map[string]string{
		"password":          password,
		"secret":            string(secret),
		"secret (hex)":      hex.EncodeToString(secret),
		"secret (base64)":   base64.StdEncoding.EncodeToString(secret),
		"secret (a prefix)": string(secret[:14]),
		"a value":           marker,
	} {
		if strings.Contains(out, s) {
			t.Errorf("the log contains the %s:\n%s", what, out)
		}
	}
	t.Logf("%d log lines, none with a secret", strings.Count(out, "\n"))
}
