package invalidate

import (
	"bytes"
	"encoding/hex"
	"errors"
	"testing"
)

// FuzzDecodeMessage checks that UnmarshalBinary never panics, that its
// errors wrap ErrMalformed, and that whatever decodes re-encodes to exactly
// the input (the encoding is canonical), within MaxMessageSize, and decodes
// again to the same Message.
func FuzzDecodeMessage(f *testing.F) {
	vf := msgLoadVectors(f)
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
		var m Message
		err := m.UnmarshalBinary(b)
		if !bytes.Equal(in, b) {
			t.Fatal("UnmarshalBinary modified its input")
		}
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v does not wrap ErrMalformed", err)
			}
			return
		}
		enc, err := m.MarshalBinary()
		if err != nil {
			t.Fatalf("re-encoding %+v: %v", m, err)
		}
		if len(enc) > MaxMessageSize {
			t.Fatalf("encoded %d bytes", len(enc))
		}
		if !bytes.Equal(enc, b) {
			t.Fatalf("encoding is not canonical:\n in  %x\n out %x", b, enc)
		}
		var m2 Message
		if err := m2.UnmarshalBinary(enc); err != nil {
			t.Fatalf("re-decoding %x: %v", enc, err)
		}
		if !msgEqual(m, m2) {
			t.Fatalf("round trip changed the message:\n %+v\n %+v", m, m2)
		}
	})
}
