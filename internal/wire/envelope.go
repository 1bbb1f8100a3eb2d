// Package wire implements the versioned envelope that tiercache wraps around
// every value it stores in the shared L2 (Redis).
//
// The byte layout is specified language-neutrally in docs/wire.md; this file
// is the reference implementation. An envelope is a fixed 20-byte header
// followed by the payload:
//
//	offset  size  field
//	0       1     magic 0xFE
//	1       1     format version (1)
//	2       1     codec ID
//	3       1     flags (bit0 compressed, bit1 negative, bit2 tombstone)
//	4       8     write ID, uint64 big-endian, nonzero
//	12      8     fresh-until, int64 big-endian unix milliseconds, 0 = none
//	20      n     payload (an S2 block when bit0 is set)
//
// Values written in the plain-JSON compatibility mode do not use this
// package. IsEnvelope tells the two apart: valid JSON (and valid UTF-8) never
// starts with the byte 0xFE.
package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"github.com/klauspost/compress/s2"
)

// Header layout constants.
const (
	// HeaderSize is the size of the fixed envelope header in bytes.
	HeaderSize = 20
	// Magic is the first byte of every envelope.
	Magic = 0xFE
	// Version is the envelope format version this package reads and writes.
	Version = 1
)

// Codec IDs with a fixed meaning. IDs 4..63 are reserved for future built-in
// codecs and 64..255 for user codecs. This package does not check codec IDs
// beyond the rules documented on Envelope; the codec registry does.
const (
	CodecNone    byte = 0 // no payload: tombstones and negative entries
	CodecJSON    byte = 1
	CodecMsgpack byte = 2
	CodecRaw     byte = 3 // raw bytes or string
	// CodecUserMin is the smallest codec ID available to user codecs.
	CodecUserMin byte = 64
)

// Flags is the flags byte of the envelope header.
type Flags uint8

// Flag bits. All other bits are reserved and must be zero.
const (
	// FlagCompressed: the payload is an S2 block. Set only by AppendEnvelope
	// and cleared by DecodeEnvelope; callers never see or set it.
	FlagCompressed Flags = 1 << 0
	// FlagNegative: the loader reported "not found"; the entry caches that.
	FlagNegative Flags = 1 << 1
	// FlagTombstone: the key was deleted (written by Delete so that late
	// fills carrying an older write can be fenced).
	FlagTombstone Flags = 1 << 2

	knownFlags = FlagCompressed | FlagNegative | FlagTombstone
)

// Envelope is the decoded form of an L2 value.
//
// Validity rules, enforced by both AppendEnvelope and DecodeEnvelope:
//   - WriteID is nonzero.
//   - FreshUntil is 0 (no soft expiry) or positive.
//   - Only the bits FlagCompressed, FlagNegative and FlagTombstone may be set,
//     and FlagNegative and FlagTombstone are mutually exclusive.
//   - A negative entry or a tombstone has Codec 0 (CodecNone), an empty
//     payload and is never compressed.
//   - Any other entry (a value) has a nonzero Codec; its payload may be empty
//     (for example an empty raw string).
type Envelope struct {
	Codec      byte
	Flags      Flags
	WriteID    uint64
	FreshUntil int64 // unix milliseconds; 0 = no soft expiry
	Payload    []byte
}

var (
	// ErrCorrupt is wrapped by every error DecodeEnvelope returns.
	ErrCorrupt = errors.New("wire: corrupt envelope")
	// ErrUnsupportedVersion is returned (wrapped) by DecodeEnvelope for an
	// envelope with a format version this package does not know. It wraps
	// ErrCorrupt, so errors.Is(err, ErrCorrupt) also holds; it exists so that
	// callers can count values written by a newer release separately.
	ErrUnsupportedVersion = fmt.Errorf("%w: unsupported version", ErrCorrupt)
	// ErrTooLarge is returned (wrapped) by DecodeEnvelope when the payload,
	// after decompression, would exceed maxPayload. It wraps ErrCorrupt.
	ErrTooLarge = fmt.Errorf("%w: payload too large", ErrCorrupt)
	// ErrInvalid is wrapped by every error AppendEnvelope returns: the
	// Envelope given to it breaks a rule documented on Envelope, or the
	// caller set FlagCompressed.
	ErrInvalid = errors.New("wire: invalid envelope")
)

// IsEnvelope reports whether b looks like an envelope: it is at least
// HeaderSize bytes long and starts with Magic. It does not validate the rest;
// use it to tell envelopes from bare JSON written in compatibility mode.
func IsEnvelope(b []byte) bool {
	return len(b) >= HeaderSize && b[0] == Magic
}

// check applies the rules documented on Envelope, except the ones about
// FlagCompressed, which differ between encoding and decoding.
func check(e *Envelope) string {
	switch {
	case e.Flags&^knownFlags != 0:
		return "reserved flag bits set"
	case e.WriteID == 0:
		return "zero write ID"
	case e.FreshUntil < 0:
		return "negative fresh-until"
	}
	if e.Flags&(FlagNegative|FlagTombstone) != 0 {
		switch {
		case e.Flags&(FlagNegative|FlagTombstone) == FlagNegative|FlagTombstone:
			return "both negative and tombstone flags set"
		case e.Flags&FlagCompressed != 0:
			return "compressed negative entry or tombstone"
		case e.Codec != CodecNone:
			return "negative entry or tombstone with a codec"
		case len(e.Payload) != 0:
			return "negative entry or tombstone with a payload"
		}
	} else if e.Codec == CodecNone {
		return "value with codec 0"
	}
	return ""
}

// AppendEnvelope appends the encoding of e to dst and returns the extended
// slice.
//
// If compressAbove >= 0 and len(e.Payload) > compressAbove, the payload is
// S2-compressed and FlagCompressed is set, but only when the compressed block
// is strictly smaller than the payload; otherwise the payload is stored as is.
// A negative compressAbove disables compression.
//
// The caller must not set FlagCompressed: compression is decided here. An
// Envelope with FlagCompressed set, or one that breaks any rule documented on
// Envelope, is rejected with an error wrapping ErrInvalid and dst is returned
// unchanged.
//
// e.Payload must not overlap the spare capacity of dst (dst[len(dst):cap(dst)]).
func AppendEnvelope(dst []byte, e Envelope, compressAbove int) ([]byte, error) {
	if e.Flags&FlagCompressed != 0 {
		return dst, fmt.Errorf("%w: FlagCompressed is set by AppendEnvelope, not by callers", ErrInvalid)
	}
	if msg := check(&e); msg != "" {
		return dst, fmt.Errorf("%w: %s", ErrInvalid, msg)
	}

	p := e.Payload
	// MaxEncodedLen is negative for payloads too big for one S2 block (about
	// 4 GiB); those are stored uncompressed.
	maxBlock := -1
	if compressAbove >= 0 && len(p) > compressAbove && len(p) > 0 {
		maxBlock = s2.MaxEncodedLen(len(p))
	}
	start := len(dst)
	dst = slices.Grow(dst, HeaderSize+max(len(p), maxBlock))
	dst = dst[:start+HeaderSize]
	h := dst[start:]
	h[0] = Magic
	h[1] = Version
	h[2] = e.Codec
	h[3] = byte(e.Flags)
	binary.BigEndian.PutUint64(h[4:12], e.WriteID)
	binary.BigEndian.PutUint64(h[12:20], uint64(e.FreshUntil))

	if maxBlock > 0 {
		// Compress straight into dst's spare capacity: s2.Encode writes in
		// place when the slice it is given has capacity >= maxBlock.
		end := len(dst)
		block := s2.Encode(dst[end:end+maxBlock], p)
		if len(block) < len(p) {
			if &block[0] != &dst[:end+1][end] { // not in place after all
				copy(dst[end:end+maxBlock], block)
			}
			dst[start+3] |= byte(FlagCompressed)
			return dst[:end+len(block)], nil
		}
	}
	return append(dst, p...), nil
}

// DecodeEnvelope parses an envelope.
//
// A compressed payload is decompressed and FlagCompressed is cleared in the
// result, so the returned Envelope always holds the plain payload. The plain
// payload must not be longer than maxPayload bytes (a negative maxPayload is
// treated as 0); for compressed payloads the length recorded in the S2 block
// header is checked before anything is allocated, so a small hostile value
// cannot make the decoder allocate more than maxPayload bytes.
//
// When the payload is not compressed, the returned Payload aliases b (with
// its capacity clipped, so appending to it never writes into b); copy it if b
// is going to be reused. An empty payload is returned as nil.
//
// Every error wraps ErrCorrupt; see also ErrUnsupportedVersion and
// ErrTooLarge.
func DecodeEnvelope(b []byte, maxPayload int) (Envelope, error) {
	if maxPayload < 0 {
		maxPayload = 0
	}
	if len(b) < HeaderSize {
		return Envelope{}, fmt.Errorf("%w: %d bytes, shorter than the %d-byte header", ErrCorrupt, len(b), HeaderSize)
	}
	if b[0] != Magic {
		return Envelope{}, fmt.Errorf("%w: bad magic byte 0x%02x", ErrCorrupt, b[0])
	}
	if b[1] != Version {
		return Envelope{}, fmt.Errorf("%w %d", ErrUnsupportedVersion, b[1])
	}
	e := Envelope{
		Codec:      b[2],
		Flags:      Flags(b[3]),
		WriteID:    binary.BigEndian.Uint64(b[4:12]),
		FreshUntil: int64(binary.BigEndian.Uint64(b[12:20])),
	}
	if len(b) > HeaderSize {
		e.Payload = b[HeaderSize:len(b):len(b)]
	}
	if msg := check(&e); msg != "" {
		return Envelope{}, fmt.Errorf("%w: %s", ErrCorrupt, msg)
	}

	if e.Flags&FlagCompressed == 0 {
		if len(e.Payload) > maxPayload {
			return Envelope{}, fmt.Errorf("%w: %d bytes, limit %d", ErrTooLarge, len(e.Payload), maxPayload)
		}
		return e, nil
	}

	n, err := s2.DecodedLen(e.Payload)
	if err != nil {
		return Envelope{}, fmt.Errorf("%w: bad S2 block header: %v", ErrCorrupt, err)
	}
	if n > maxPayload {
		return Envelope{}, fmt.Errorf("%w: %d bytes after decompression, limit %d", ErrTooLarge, n, maxPayload)
	}
	plain, err := s2.Decode(make([]byte, n), e.Payload)
	if err != nil {
		return Envelope{}, fmt.Errorf("%w: bad S2 block: %v", ErrCorrupt, err)
	}
	e.Flags &^= FlagCompressed
	e.Payload = plain
	if len(plain) == 0 {
		e.Payload = nil
	}
	return e, nil
}
