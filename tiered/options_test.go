package tiered

import (
	"math"
	"testing"
	"time"
)

// TestNew_NaNFractionsRefused: a NaN TTLJitter or EagerRefresh (what
// strconv.ParseFloat makes of "NaN" in a config) is refused like any
// fraction out of range. Before, NaN passed every comparison: New
// accepted it, and each jittered TTL came out as garbage (a NaN converted
// to a Duration), so Redis kept every value for a millisecond.
func TestNew_NaNFractionsRefused(t *testing.T) {
	c := newCache[string](t, Options{})
	for _, o := range []Options{
		{TTLJitter: math.NaN()},
		{EagerRefresh: math.NaN(), FreshFor: time.Minute},
	} {
		if nc, err := New[string](namespace(t), c.rdb, c.bus, o); err == nil {
			nc.Close()
			t.Errorf("New(%+v) succeeded; want an error", o)
		}
	}
}
