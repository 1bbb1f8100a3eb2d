package redistest

import (
	"crypto/tls"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

func TestTLS(t *testing.T) {
	t.Parallel()
	certs := NewTLSCerts(t)
	s := Start(t, Config{Args: certs.Args()})

	opt := s.Options()
	opt.TLSConfig = &tls.Config{RootCAs: certs.Pool, MinVersion: tls.VersionTLS12}
	c := redis.NewClient(opt)
	defer c.Close()
	mustSet(t, c, "k", "v")
	wantGet(t, c, "k", "v")

	plain := s.Client(t) // no TLSConfig: the TLS port does not speak plain RESP
	if err := plain.Ping(ctxT(t, 2*time.Second)).Err(); err == nil {
		t.Fatalf("plain Ping on TLS Addr() = nil, want an error")
	}

	// Admin commands and restarts go over the internal plain port.
	ps := c.Subscribe(ctxT(t, 2*time.Second), "ch")
	defer ps.Close()
	if _, err := ps.Receive(ctxT(t, 2*time.Second)); err != nil {
		t.Fatalf("Receive(subscription) = %v, want nil", err)
	}
	if n := s.KillPubSub(t); n < 1 {
		t.Fatalf("KillPubSub() = %d, want >= 1", n)
	}
	s.Restart(t)
	// go-redis v9.23.0 health-checks only plain TCP pooled connections, so with TLS the stale
	// connection is found only by using it: with MaxRetries off, one command fails with EOF.
	if err := c.Ping(ctxT(t, 2*time.Second)).Err(); err != nil {
		t.Logf("first Ping after Restart over TLS: %v", err)
	}
	wantMissing(t, c, "k")
}
