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
// again to the same Message. It also checks the tag: the Bus's check on the
// received bytes agrees with Message.Verify, and a message signed again
// verifies, whatever its gen, and fails once any authenticated field changes.
func FuzzDecodeMessage(f *testing.F) {
	a, err := newAuth(msgTestSecret)
	if err != nil {
		f.Fatal(err)
	}
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

		if got, want := a.verify(b, &m), m.Verify(msgTestSecret); got != want {
			t.Fatalf("Bus verify = %v, Message.Verify = %v", got, want)
		}
		s := m
		if err := s.Sign(msgTestSecret); err != nil {
			t.Fatalf("Sign: %v", err)
		}
		signed, err := s.MarshalBinary()
		if err != nil {
			t.Fatalf("encoding the signed message: %v", err)
		}
		if !s.Verify(msgTestSecret) || !a.verify(signed, &s) {
			t.Fatalf("a freshly signed message does not verify: %x", signed)
		}
		u := m
		u.Tag = nil
		if p, err := a.marshal(&u); err != nil || !bytes.Equal(p, signed) {
			t.Fatalf("Bus marshal = %x, %v, want %x", p, err, signed)
		}
		g := s
		g.Gen ^= 1
		if g.Kind == KindFlush && !g.Verify(msgTestSecret) {
			t.Fatalf("changing a flush's gen broke its tag; the tag must not cover gen")
		}
		q := s
		q.Seq ^= 1
		if q.Verify(msgTestSecret) {
			t.Fatalf("changing seq kept the tag valid")
		}
	})
}
