package redistest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// writeTLSFiles makes a throwaway CA and a server certificate for 127.0.0.1 and returns the file
// paths and a pool trusting the CA.
func writeTLSFiles(t *testing.T) (caFile, certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	dir := t.TempDir()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "redistest CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name, typ string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: b}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	pool = x509.NewCertPool()
	pool.AddCert(caCert)
	return write("ca.pem", "CERTIFICATE", caDER), write("server.pem", "CERTIFICATE", der),
		write("server.key", "PRIVATE KEY", keyDER), pool
}

func TestTLS(t *testing.T) {
	t.Parallel()
	ca, cert, key, pool := writeTLSFiles(t)
	s := Start(t, Config{Args: []string{
		"--tls-port", "0", // value ignored: the TLS port becomes Addr()
		"--tls-cert-file", cert,
		"--tls-key-file", key,
		"--tls-ca-cert-file", ca,
		"--tls-auth-clients", "no",
	}})

	opt := s.Options()
	opt.TLSConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
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
