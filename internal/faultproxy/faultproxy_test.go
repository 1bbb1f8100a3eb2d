package faultproxy

import (
	"context"
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/tiercache/tiercache/internal/redistest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// setup starts a private redis-server and a Proxy in front of it; both are closed by t.Cleanup.
func setup(t *testing.T) (*redistest.Server, *Proxy) {
	t.Helper()
	srv := redistest.Start(t)
	p, err := Start(srv.Addr())
	if err != nil {
		t.Fatalf("Start(%q) error = %v", srv.Addr(), err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("Close() = %v, want nil", err)
		}
	})
	return srv, p
}

// proxied returns a client of srv that connects through p; closed by t.Cleanup.
func proxied(t *testing.T, srv *redistest.Server, p *Proxy) *redis.Client {
	t.Helper()
	opt := srv.Options()
	opt.Addr = p.Addr()
	c := redis.NewClient(opt)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// isTimeout reports whether err is a deadline or network timeout.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

// subscribe subscribes c to channel through a PubSub and waits for the confirmation.
func subscribe(t *testing.T, c *redis.Client, channel string) *redis.PubSub {
	t.Helper()
	ctx := t.Context()
	ps := c.Subscribe(ctx, channel)
	t.Cleanup(func() { _ = ps.Close() })
	msg, err := ps.ReceiveTimeout(ctx, 2*time.Second)
	if err != nil {
		t.Fatalf("ReceiveTimeout() error = %v, want subscription confirmation", err)
	}
	if _, ok := msg.(*redis.Subscription); !ok {
		t.Fatalf("ReceiveTimeout() = %T, want *redis.Subscription", msg)
	}
	return ps
}

func TestForward(t *testing.T) {
	srv, p := setup(t)
	c := proxied(t, srv, p)
	ctx := t.Context()

	if err := c.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatalf("Set() error = %v, want nil", err)
	}
	if got, err := c.Get(ctx, "k").Result(); err != nil || got != "v" {
		t.Fatalf("Get() = %q, %v, want %q, nil", got, err, "v")
	}
	// The value really reached the server behind the proxy.
	if got, err := srv.Client(t).Get(ctx, "k").Result(); err != nil || got != "v" {
		t.Fatalf("direct Get() = %q, %v, want %q, nil", got, err, "v")
	}
	if n := p.Conns(); n < 1 {
		t.Errorf("Conns() = %d, want >= 1", n)
	}
}

func TestLatency(t *testing.T) {
	srv, p := setup(t)
	c := proxied(t, srv, p)
	ctx := t.Context()
	if err := c.Ping(ctx).Err(); err != nil { // establish the connection before timing
		t.Fatalf("Ping() error = %v, want nil", err)
	}

	p.SetLatency(50 * time.Millisecond)
	start := time.Now()
	if err := c.Ping(ctx).Err(); err != nil {
		t.Fatalf("Ping() with latency error = %v, want nil", err)
	}
	if d := time.Since(start); d < 100*time.Millisecond || d >= 2*time.Second {
		t.Errorf("Ping() with 50ms latency took %v, want in [100ms, 2s)", d)
	}

	p.SetLatency(0)
	start = time.Now()
	if err := c.Ping(ctx).Err(); err != nil {
		t.Fatalf("Ping() without latency error = %v, want nil", err)
	}
	if d := time.Since(start); d >= 100*time.Millisecond {
		t.Errorf("Ping() without latency took %v, want < 100ms", d)
	}
}

func TestLatencyStopsOnClose(t *testing.T) {
	srv, p := setup(t)
	raw, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatalf("Dial() error = %v", err)
	}
	defer raw.Close()
	p.SetLatency(time.Hour)
	if _, err := raw.Write([]byte("PING\r\n")); err != nil {
		t.Fatalf("Write() error = %v", err)
	}
	// The reply is held back by the latency (this read is expected to time out; it also gives the
	// proxy time to read the request and start its delay).
	_ = raw.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	buf := make([]byte, 64)
	if n, err := raw.Read(buf); !isTimeout(err) {
		t.Fatalf("Read() = %q, %v, want a timeout", buf[:n], err)
	}
	_ = srv // keep the server alive until the end

	start := time.Now()
	if err := p.Close(); err != nil {
		t.Fatalf("Close() = %v, want nil", err)
	}
	if d := time.Since(start); d >= time.Second {
		t.Errorf("Close() during a 1h delay took %v, want < 1s", d)
	}
	_ = raw.SetReadDeadline(time.Now().Add(2 * time.Second))
	if n, err := raw.Read(buf); err == nil || isTimeout(err) {
		t.Errorf("Read() after Close = %q, %v, want EOF or reset", buf[:n], err)
	}
}

func TestBlackhole(t *testing.T) {
	srv, p := setup(t)
	c := proxied(t, srv, p)
	direct := srv.Client(t)
	ctx := t.Context()

	if err := c.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatalf("Set() error = %v, want nil", err)
	}
	ps := subscribe(t, c, "news")

	p.Blackhole(true)
	start := time.Now()
	gctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	got, err := c.Get(gctx, "k").Result()
	cancel()
	if !isTimeout(err) {
		t.Fatalf("Get() in blackhole = %q, %v, want a timeout error", got, err)
	}
	if d := time.Since(start); d >= 2*time.Second {
		t.Errorf("Get() in blackhole took %v, want about 200ms", d)
	}
	if n := p.Conns(); n < 1 {
		t.Errorf("Conns() in blackhole = %d, want >= 1 (sockets stay open)", n)
	}

	// The subscription reached the server before the blackhole, so the server does deliver the
	// message to the proxy, which drops it.
	if n, err := direct.Publish(ctx, "news", "lost").Result(); err != nil || n != 1 {
		t.Fatalf("Publish() = %d, %v, want 1, nil", n, err)
	}
	if msg, err := ps.ReceiveTimeout(ctx, 300*time.Millisecond); !isTimeout(err) {
		t.Fatalf("ReceiveTimeout() in blackhole = %v, %v, want a timeout error", msg, err)
	}

	p.Blackhole(false)
	// go-redis discarded the connection that timed out, so this uses a fresh one.
	if got, err := c.Get(ctx, "k").Result(); err != nil || got != "v" {
		t.Fatalf("Get() after blackhole = %q, %v, want %q, nil", got, err, "v")
	}
	if got, err := proxied(t, srv, p).Get(ctx, "k").Result(); err != nil || got != "v" {
		t.Fatalf("new client Get() after blackhole = %q, %v, want %q, nil", got, err, "v")
	}
	// The dropped message is never delivered later.
	if msg, err := ps.ReceiveTimeout(ctx, 100*time.Millisecond); !isTimeout(err) {
		t.Fatalf("ReceiveTimeout() after blackhole = %v, %v, want a timeout error (no stale bytes)", msg, err)
	}
}

func TestCut(t *testing.T) {
	srv, p := setup(t)
	c := proxied(t, srv, p)
	direct := srv.Client(t)
	ctx := t.Context()

	if err := c.Ping(ctx).Err(); err != nil {
		t.Fatalf("Ping() error = %v, want nil", err)
	}
	ps := subscribe(t, c, "news")
	if n := p.Conns(); n < 2 {
		t.Fatalf("Conns() = %d, want >= 2 (command + pubsub)", n)
	}

	p.Cut()
	if n := p.Conns(); n != 0 {
		t.Errorf("Conns() after Cut = %d, want 0", n)
	}
	msg, err := ps.ReceiveTimeout(ctx, 2*time.Second)
	if err == nil || isTimeout(err) {
		t.Fatalf("ReceiveTimeout() after Cut = %v, %v, want EOF or reset", msg, err)
	}

	// The command client reconnects through the proxy.
	if err := c.Ping(ctx).Err(); err != nil {
		t.Fatalf("Ping() after Cut error = %v, want nil", err)
	}
	// The PubSub reconnects and resubscribes on its next receive; then it gets new messages.
	for i := 0; ; i++ {
		if i == 10 {
			t.Fatalf("PubSub did not receive the message after Cut")
		}
		msg, err := ps.ReceiveTimeout(ctx, 2*time.Second)
		if err != nil {
			t.Fatalf("ReceiveTimeout() after reconnect = %v, %v, want nil error", msg, err)
		}
		if _, ok := msg.(*redis.Subscription); ok {
			// Resubscribed: the server now knows the new subscriber.
			if n, err := direct.Publish(ctx, "news", "hello").Result(); err != nil || n != 1 {
				t.Fatalf("Publish() = %d, %v, want 1, nil", n, err)
			}
			continue
		}
		m, ok := msg.(*redis.Message)
		if !ok {
			t.Fatalf("ReceiveTimeout() = %T, want *redis.Message", msg)
		}
		if m.Payload != "hello" {
			t.Fatalf("Message.Payload = %q, want %q", m.Payload, "hello")
		}
		break
	}
	if n := p.Conns(); n < 1 {
		t.Errorf("Conns() after reconnect = %d, want >= 1", n)
	}
}

func TestRefuse(t *testing.T) {
	srv, p := setup(t)
	ctx := t.Context()
	old := proxied(t, srv, p)
	if err := old.Ping(ctx).Err(); err != nil {
		t.Fatalf("Ping() error = %v, want nil", err)
	}

	p.Refuse(true)
	if err := proxied(t, srv, p).Ping(ctx).Err(); err == nil {
		t.Fatalf("new client Ping() while refusing = nil, want an error")
	}
	// Existing connections are not affected.
	if err := old.Ping(ctx).Err(); err != nil {
		t.Errorf("existing client Ping() while refusing = %v, want nil", err)
	}

	p.Refuse(false)
	if err := proxied(t, srv, p).Ping(ctx).Err(); err != nil {
		t.Fatalf("new client Ping() after Refuse(false) = %v, want nil", err)
	}
}

func TestClose(t *testing.T) {
	srv, p := setup(t)
	c := proxied(t, srv, p)
	ctx := t.Context()
	if err := c.Ping(ctx).Err(); err != nil {
		t.Fatalf("Ping() error = %v, want nil", err)
	}

	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Go(func() { errs[i] = p.Close() })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("concurrent Close() #%d = %v, want nil", i, err)
		}
	}
	if err := p.Close(); err != nil {
		t.Errorf("second Close() = %v, want nil", err)
	}
	if n := p.Conns(); n != 0 {
		t.Errorf("Conns() after Close = %d, want 0", n)
	}
	if err := c.Ping(ctx).Err(); err == nil {
		t.Errorf("Ping() after Close = nil, want an error")
	}
	if conn, err := net.DialTimeout("tcp", p.Addr(), time.Second); err == nil {
		conn.Close()
		t.Errorf("Dial(%s) after Close succeeded, want an error", p.Addr())
	}
	// Setters after Close are harmless.
	p.SetLatency(time.Second)
	p.Blackhole(true)
	p.Refuse(true)
	p.Cut()
}

func TestDialFailure(t *testing.T) {
	// Reserve a port, then free it, so nothing listens there.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	target := ln.Addr().String()
	ln.Close()

	p, err := Start(target)
	if err != nil {
		t.Fatalf("Start(%q) error = %v", target, err)
	}
	defer p.Close()
	conn, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatalf("Dial() error = %v", err)
	}
	defer conn.Close()
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := conn.Read(make([]byte, 1)); err == nil || isTimeout(err) {
		t.Errorf("Read() with unreachable target = %d, %v, want EOF or reset", n, err)
	}
}
