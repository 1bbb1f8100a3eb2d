package invalidate

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"fmt"
	"hash"
	"sync"
)

// minSecretLen is the shortest Options.Secret New accepts.
const minSecretLen = 16

// auth signs and verifies the messages of a Bus with Options.Secret. A nil
// *auth stands for "no secret": marshal encodes without a tag.
type auth struct {
	key  []byte    // a private copy of the secret
	sign sync.Pool // of HMAC-SHA256 hashes keyed with key, for any goroutine
}

// newAuth returns the auth for secret, or nil for an empty one. The error
// never contains the secret.
func newAuth(secret []byte) (*auth, error) {
	if len(secret) == 0 {
		return nil, nil
	}
	if len(secret) < minSecretLen {
		return nil, fmt.Errorf("invalidate: Secret has %d bytes, want at least %d", len(secret), minSecretLen)
	}
	a := &auth{key: bytes.Clone(secret)}
	a.sign.New = func() any { return hmac.New(sha256.New, a.key) }
	return a, nil
}

// marshal encodes m, with its tag when a is not nil (overwriting m.Tag).
// Safe for concurrent use.
func (a *auth) marshal(m *Message) ([]byte, error) {
	if a == nil {
		return m.MarshalBinary()
	}
	var tag [TagSize]byte
	m.Tag = tag[:] // a placeholder, so that the encoding has room for it
	p, err := m.MarshalBinary()
	if err != nil {
		return nil, err
	}
	off := tagOffset(m.Kind, m.Gen, len(p))
	h := a.sign.Get().(hash.Hash)
	h.Reset()
	h.Write(p[:off])
	var sum [sha256.Size]byte
	copy(p[off:off+TagSize], h.Sum(sum[:0]))
	a.sign.Put(h)
	m.Tag = p[off : off+TagSize : off+TagSize]
	return p, nil
}

// verify reports whether data, which decoded as m, carries a valid tag.
// It works on the received bytes, without encoding m again. Safe for
// concurrent use: a sharded Bus verifies on one goroutine per channel.
func (a *auth) verify(data []byte, m *Message) bool {
	if len(m.Tag) != TagSize {
		return false
	}
	off := tagOffset(m.Kind, m.Gen, len(data))
	h := a.sign.Get().(hash.Hash)
	defer a.sign.Put(h)
	h.Reset()
	h.Write(data[:off])
	var sum [sha256.Size]byte
	return hmac.Equal(h.Sum(sum[:0])[:TagSize], data[off:off+TagSize])
}
