package invalidate

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package when a test leaves a goroutine behind: every
// Bus must stop its receive goroutine (and its subscription) in Close.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
