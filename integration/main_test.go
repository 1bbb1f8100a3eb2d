package integration

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the run if any goroutine (a Bus, a proxy, a cache's L1,
// a load goroutine) outlives the tests.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
