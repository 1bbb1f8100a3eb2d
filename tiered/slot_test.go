package tiered

import "testing"

// TestKeySlot checks keySlot against slots Redis computes (CLUSTER KEYSLOT,
// and the examples of the Redis Cluster specification).
func TestKeySlot(t *testing.T) {
	for _, c := range []struct {
		key  string
		slot uint16
	}{
		{"123456789", 0x31c3 & 16383}, // the CRC16/XMODEM check value 0x31C3
		{"foo", 12182},
		{"bar", 5061},
		{"{user1000}.following", 3443},
		{"{user1000}.followers", 3443},
		{"user1000", 3443},
		{"foo{}{bar}", keySlot("foo{}{bar}")}, // empty first tag: the whole key
		{"foo{{bar}}zap", keySlot("{bar")},
		{"tc:users:1:0:{42}", keySlot("42")},
	} {
		if got := keySlot(c.key); got != c.slot {
			t.Errorf("keySlot(%q) = %d, want %d", c.key, got, c.slot)
		}
	}
	if keySlot("foo{}{bar}") != crc16("foo{}{bar}")&16383 {
		t.Error("an empty hash tag must hash the whole key")
	}
}
