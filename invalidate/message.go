package invalidate

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"unicode/utf8"
)

// Kind says what an invalidation Message invalidates.
type Kind uint8

// Message kinds.
const (
	KindKeys  Kind = 1 // drop the listed keys of a namespace
	KindFlush Kind = 2 // drop the whole namespace; Gen is its new generation
)

// String returns "keys", "flush" or "Kind(n)".
func (k Kind) String() string {
	switch k {
	case KindKeys:
		return "keys"
	case KindFlush:
		return "flush"
	}
	return "Kind(" + strconv.Itoa(int(k)) + ")"
}

// Limits on invalidation messages, enforced when encoding and when decoding.
const (
	MaxKeys        = 10000   // keys in one KindKeys message
	MaxKeyLen      = 4096    // bytes in one key
	MaxMessageSize = 1 << 20 // bytes in one encoded message
)

// Limits on the namespace of a message, in bytes.
const (
	msgMinNamespaceLen = 1
	msgMaxNamespaceLen = 255
)

// TagSize is the length in bytes of a message's authentication tag: an
// HMAC-SHA256 truncated to its first 16 bytes (see Message.Sign).
const TagSize = 16

// Header constants of the binary message format (see docs/wire.md).
const (
	msgMagic   = 'T'
	msgVersion = 1
	// msgVersionTagged is version 1 with an authentication tag: flags bit 0
	// set, and the tag after the last authenticated field.
	msgVersionTagged = 2
	msgFlagTag       = 0x01
	// magic, version, kind, flags, origin, time
	msgFixedSize = 4 + 16 + 8
)

// ErrMalformed is wrapped by every error UnmarshalBinary returns, and by the
// errors MarshalBinary and AppendBinary return for a Message that breaks the
// limits (a message that would not decode is never produced).
var ErrMalformed = errors.New("invalidate: malformed message")

// Message is one invalidation, published on the invalidation channel and
// applied by every instance to its L1.
//
// A valid Message has:
//   - Kind KindKeys or KindFlush;
//   - a Namespace of 1..255 bytes of valid UTF-8;
//   - for KindKeys: 1..MaxKeys Keys, each 1..MaxKeyLen bytes (any bytes), and
//     Gen 0;
//   - for KindFlush: no Keys;
//   - a Tag of 0 or TagSize bytes;
//   - an encoding of at most MaxMessageSize bytes.
//
// Origin, Seq and Time may hold any value. A Message with a Tag encodes as
// format version 2, one without as version 1.
type Message struct {
	Origin    [16]byte // instance ID of the publisher
	Seq       uint64   // per-origin sequence number
	Time      int64    // publisher clock, unix nanoseconds
	Namespace string
	Kind      Kind
	// Keys to invalidate (KindKeys). Keys produced by UnmarshalBinary never
	// alias the input, but they share one backing allocation with each other:
	// use strings.Clone on a key that is retained long-term so that it does
	// not pin the others.
	Keys []string
	Gen  uint64 // the namespace's new generation (KindFlush)
	// Tag authenticates every field but Gen under a shared secret (see
	// Sign and Verify); empty for an unauthenticated message. A decoded Tag
	// never aliases the input.
	Tag []byte
}

var (
	_ encoding.BinaryAppender    = (*Message)(nil)
	_ encoding.BinaryMarshaler   = (*Message)(nil)
	_ encoding.BinaryUnmarshaler = (*Message)(nil)
)

func msgMalformed(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrMalformed}, args...)...)
}

// msgUvarintLen is the length of the (minimal) uvarint encoding of v.
func msgUvarintLen(v uint64) int {
	n := 1
	for v >= 0x80 {
		v >>= 7
		n++
	}
	return n
}

// encodedSize validates m and returns the exact size of its encoding.
func (m *Message) encodedSize() (int, error) {
	if n := len(m.Namespace); n < msgMinNamespaceLen || n > msgMaxNamespaceLen {
		return 0, msgMalformed("namespace length %d, want %d..%d", n, msgMinNamespaceLen, msgMaxNamespaceLen)
	}
	if !utf8.ValidString(m.Namespace) {
		return 0, msgMalformed("namespace is not valid UTF-8")
	}
	size := msgFixedSize + msgUvarintLen(m.Seq) + msgUvarintLen(uint64(len(m.Namespace))) + len(m.Namespace)
	switch len(m.Tag) {
	case 0:
	case TagSize:
		size += TagSize
	default:
		return 0, msgMalformed("tag has length %d, want %d", len(m.Tag), TagSize)
	}
	switch m.Kind {
	case KindKeys:
		if m.Gen != 0 {
			return 0, msgMalformed("kind keys with nonzero gen %d", m.Gen)
		}
		if n := len(m.Keys); n < 1 || n > MaxKeys {
			return 0, msgMalformed("%d keys, want 1..%d", n, MaxKeys)
		}
		size += msgUvarintLen(uint64(len(m.Keys)))
		for i, k := range m.Keys {
			if len(k) < 1 || len(k) > MaxKeyLen {
				return 0, msgMalformed("key %d has length %d, want 1..%d", i, len(k), MaxKeyLen)
			}
			size += msgUvarintLen(uint64(len(k))) + len(k)
			if size > MaxMessageSize {
				return 0, msgMalformed("encoding exceeds %d bytes", MaxMessageSize)
			}
		}
	case KindFlush:
		if len(m.Keys) != 0 {
			return 0, msgMalformed("kind flush with %d keys", len(m.Keys))
		}
		size += msgUvarintLen(m.Gen)
	default:
		return 0, msgMalformed("unknown kind %d", uint8(m.Kind))
	}
	if size > MaxMessageSize {
		return 0, msgMalformed("encoding exceeds %d bytes", MaxMessageSize)
	}
	return size, nil
}

// AppendBinary implements encoding.BinaryAppender. It validates m against
// the rules documented on Message (the same ones UnmarshalBinary enforces)
// and appends its encoding to b. On error b is returned unchanged.
func (m *Message) AppendBinary(b []byte) ([]byte, error) {
	size, err := m.encodedSize()
	if err != nil {
		return b, err
	}
	if cap(b)-len(b) < size {
		nb := make([]byte, len(b), len(b)+size)
		copy(nb, b)
		b = nb
	}
	if len(m.Tag) == 0 {
		b = append(b, msgMagic, msgVersion, byte(m.Kind), 0)
	} else {
		b = append(b, msgMagic, msgVersionTagged, byte(m.Kind), msgFlagTag)
	}
	b = append(b, m.Origin[:]...)
	b = binary.AppendUvarint(b, m.Seq)
	b = binary.BigEndian.AppendUint64(b, uint64(m.Time))
	b = binary.AppendUvarint(b, uint64(len(m.Namespace)))
	b = append(b, m.Namespace...)
	if m.Kind == KindKeys {
		b = binary.AppendUvarint(b, uint64(len(m.Keys)))
		for _, k := range m.Keys {
			b = binary.AppendUvarint(b, uint64(len(k)))
			b = append(b, k...)
		}
		b = append(b, m.Tag...)
	} else {
		b = append(b, m.Tag...)
		b = binary.AppendUvarint(b, m.Gen)
	}
	return b, nil
}

// tagOffset is where the tag starts in the n-byte encoding of a tagged
// message of kind k and generation gen: the tag follows everything it
// authenticates, which is everything but a flush's trailing generation.
func tagOffset(k Kind, gen uint64, n int) int {
	if k == KindFlush {
		return n - TagSize - msgUvarintLen(gen)
	}
	return n - TagSize
}

// computeTag writes to tag the HMAC-SHA256 under secret of the
// authenticated part of the tagged encoding enc of a message of kind k and
// generation gen, truncated to TagSize bytes.
func computeTag(tag, secret, enc []byte, k Kind, gen uint64) {
	h := hmac.New(sha256.New, secret)
	h.Write(enc[:tagOffset(k, gen, len(enc))])
	var sum [sha256.Size]byte
	copy(tag, h.Sum(sum[:0]))
}

// Sign sets m.Tag to m's authentication tag under secret: the first
// TagSize bytes of HMAC-SHA256(secret, E), where E is m's version 2
// encoding up to the tag, which covers every field but Gen (see
// docs/wire.md for why Gen is left out). It fails, leaving m unchanged, if m
// is not valid.
func (m *Message) Sign(secret []byte) error {
	s := *m
	s.Tag = make([]byte, TagSize)
	enc, err := s.MarshalBinary()
	if err != nil {
		return err
	}
	computeTag(s.Tag, secret, enc, s.Kind, s.Gen)
	m.Tag = s.Tag
	return nil
}

// Verify reports whether m carries a valid authentication tag under secret
// (see Sign). It returns false for a message without a Tag or one that is
// not valid.
func (m *Message) Verify(secret []byte) bool {
	if len(m.Tag) != TagSize {
		return false
	}
	enc, err := m.MarshalBinary()
	if err != nil {
		return false
	}
	var want [TagSize]byte
	computeTag(want[:], secret, enc, m.Kind, m.Gen)
	return hmac.Equal(want[:], m.Tag)
}

// MarshalBinary implements encoding.BinaryMarshaler; see AppendBinary.
func (m *Message) MarshalBinary() ([]byte, error) {
	return m.AppendBinary(nil)
}

// msgReader reads the fields of an encoded message, front to back.
type msgReader struct {
	b   []byte
	off int
}

// uvarint reads a minimally encoded uvarint of at most 64 bits. Overlong
// encodings (a final 0x00 byte after a continuation byte) are rejected so
// that every message has exactly one encoding.
func (r *msgReader) uvarint(field string) (uint64, error) {
	var v uint64
	for i := 0; i < binary.MaxVarintLen64; i++ {
		if r.off+i >= len(r.b) {
			return 0, msgMalformed("truncated %s at offset %d", field, r.off)
		}
		c := r.b[r.off+i]
		if i == binary.MaxVarintLen64-1 && c > 1 {
			return 0, msgMalformed("%s at offset %d overflows 64 bits", field, r.off)
		}
		if c < 0x80 {
			if i > 0 && c == 0 {
				return 0, msgMalformed("%s at offset %d is not minimally encoded", field, r.off)
			}
			r.off += i + 1
			return v | uint64(c)<<(7*i), nil
		}
		v |= uint64(c&0x7f) << (7 * i)
	}
	return 0, msgMalformed("%s at offset %d overflows 64 bits", field, r.off)
}

// bytes returns the next n bytes, which alias the input.
func (r *msgReader) bytes(n int, field string) ([]byte, error) {
	if n > len(r.b)-r.off {
		return nil, msgMalformed("truncated %s at offset %d: need %d bytes, have %d", field, r.off, n, len(r.b)-r.off)
	}
	p := r.b[r.off : r.off+n]
	r.off += n
	return p, nil
}

// UnmarshalBinary implements encoding.BinaryUnmarshaler. It accepts exactly
// the encodings AppendBinary produces and rejects everything else with an
// error wrapping ErrMalformed, in which case m is left unchanged. The decoded
// strings never alias data. Allocation is bounded by len(data), which is at
// most MaxMessageSize.
func (m *Message) UnmarshalBinary(data []byte) error {
	if len(data) > MaxMessageSize {
		return msgMalformed("%d bytes, limit %d", len(data), MaxMessageSize)
	}
	r := msgReader{b: data}
	hdr, err := r.bytes(4, "header")
	if err != nil {
		return err
	}
	if hdr[0] != msgMagic {
		return msgMalformed("bad magic byte 0x%02x", hdr[0])
	}
	if hdr[1] != msgVersion && hdr[1] != msgVersionTagged {
		return msgMalformed("unsupported version %d", hdr[1])
	}
	var d Message
	d.Kind = Kind(hdr[2])
	if d.Kind != KindKeys && d.Kind != KindFlush {
		return msgMalformed("unknown kind %d", hdr[2])
	}
	tagged := hdr[1] == msgVersionTagged
	switch {
	case !tagged && hdr[3] != 0:
		return msgMalformed("reserved flags 0x%02x set", hdr[3])
	case tagged && hdr[3] != msgFlagTag:
		return msgMalformed("version 2 with flags 0x%02x, want 0x%02x", hdr[3], msgFlagTag)
	}
	var tag []byte
	if tagged && d.Kind == KindKeys {
		// The tag ends a keys message: parse the rest without it.
		if len(data)-r.off < TagSize {
			return msgMalformed("truncated tag at offset %d", r.off)
		}
		tag = data[len(data)-TagSize:]
		data = data[:len(data)-TagSize]
		r.b = data
	}
	origin, err := r.bytes(16, "origin")
	if err != nil {
		return err
	}
	copy(d.Origin[:], origin)
	if d.Seq, err = r.uvarint("seq"); err != nil {
		return err
	}
	t, err := r.bytes(8, "time")
	if err != nil {
		return err
	}
	d.Time = int64(binary.BigEndian.Uint64(t))

	nsLen, err := r.uvarint("namespace length")
	if err != nil {
		return err
	}
	if nsLen < msgMinNamespaceLen || nsLen > msgMaxNamespaceLen {
		return msgMalformed("namespace length %d, want %d..%d", nsLen, msgMinNamespaceLen, msgMaxNamespaceLen)
	}
	ns, err := r.bytes(int(nsLen), "namespace")
	if err != nil {
		return err
	}
	if !utf8.Valid(ns) {
		return msgMalformed("namespace is not valid UTF-8")
	}

	switch d.Kind {
	case KindKeys:
		count, err := r.uvarint("key count")
		if err != nil {
			return err
		}
		if count < 1 || count > MaxKeys {
			return msgMalformed("key count %d, want 1..%d", count, MaxKeys)
		}
		// Every key takes at least 2 bytes (length and one byte): check the
		// count against what is left before allocating anything from it.
		if rem := uint64(len(data) - r.off); count > rem/2 {
			return msgMalformed("key count %d but only %d bytes left", count, rem)
		}
		// The keys run to the end of a valid message. One copy of that
		// section (lengths included) backs every key: one allocation instead
		// of one per key.
		keysStart := r.off
		region := string(data[keysStart:])
		d.Keys = make([]string, count)
		for i := range d.Keys {
			kLen, err := r.uvarint("key length")
			if err != nil {
				return err
			}
			if kLen < 1 || kLen > MaxKeyLen {
				return msgMalformed("key %d has length %d, want 1..%d", i, kLen, MaxKeyLen)
			}
			if _, err := r.bytes(int(kLen), "key"); err != nil {
				return err
			}
			d.Keys[i] = region[r.off-int(kLen)-keysStart : r.off-keysStart]
		}
	case KindFlush:
		if tagged {
			if tag, err = r.bytes(TagSize, "tag"); err != nil {
				return err
			}
		}
		if d.Gen, err = r.uvarint("gen"); err != nil {
			return err
		}
	}
	if r.off != len(data) {
		return msgMalformed("%d trailing bytes", len(data)-r.off)
	}
	if tag != nil {
		d.Tag = bytes.Clone(tag)
	}
	d.Namespace = string(ns)
	*m = d
	return nil
}
