package wire

import (
	"bytes"
	"encoding/hex"
	"errors"
	"testing"
)

const fuzzMax = 1 << 16

// FuzzDecodeEnvelope checks that DecodeEnvelope never panics, that every
// error wraps ErrCorrupt, and that whatever decodes re-encodes, with and
// without compression, to an envelope that decodes to the same fields. An
// uncompressed input must re-encode (without compression) to itself: the
// uncompressed encoding is canonical.
func FuzzDecodeEnvelope(f *testing.F) {
	vf := loadVectors(f)
	for _, v := range vf.Valid {
		b, _ := hex.DecodeString(v.Hex)
		f.Add(b)
	}
	for _, v := range vf.Invalid {
		b, _ := hex.DecodeString(v.Hex)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		in := bytes.Clone(b)
		e, err := DecodeEnvelope(b, fuzzMax)
		if !bytes.Equal(in, b) {
			t.Fatal("DecodeEnvelope modified its input")
		}
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			return
		}
		if !IsEnvelope(b) {
			t.Fatal("decoded something IsEnvelope rejects")
		}
		if e.Flags&FlagCompressed != 0 {
			t.Fatal("FlagCompressed left set")
		}
		if len(e.Payload) > fuzzMax {
			t.Fatalf("payload of %d bytes exceeds the limit", len(e.Payload))
		}
		for _, ca := range []int{-1, 0} {
			enc, err := AppendEnvelope(nil, e, ca)
			if err != nil {
				t.Fatalf("re-encoding (compressAbove %d) %+v: %v", ca, e, err)
			}
			if ca < 0 && Flags(b[3])&FlagCompressed == 0 && !bytes.Equal(enc, b) {
				t.Fatalf("re-encoding is not canonical:\n in  %x\n out %x", b, enc)
			}
			e2, err := DecodeEnvelope(enc, fuzzMax)
			if err != nil {
				t.Fatalf("re-decoding %x: %v", enc, err)
			}
			if !equalEnvelope(e, e2) {
				t.Fatalf("round trip changed the envelope:\n %+v\n %+v", e, e2)
			}
		}
	})
}
