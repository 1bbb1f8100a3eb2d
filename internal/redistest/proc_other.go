//go:build !linux

package redistest

import (
	"syscall"
	"time"
)

// sysProcAttr has no parent-death signal outside Linux; Close must run to end the process.
func sysProcAttr() *syscall.SysProcAttr { return nil }

// waitState cannot observe the process state outside Linux; it gives the signal a moment instead.
func waitState(pid int, want bool, d time.Duration) error {
	time.Sleep(min(d, 50*time.Millisecond))
	return nil
}
