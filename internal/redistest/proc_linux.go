package redistest

import (
	"bytes"
	"fmt"
	"os"
	"syscall"
	"time"
)

// sysProcAttr makes the kernel SIGKILL redis-server if the test binary dies without Close
// (e.g. a test timeout panic), so no orphan keeps its port.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}

// waitState waits at most d until /proc reports the process as stopped (want true, state 'T') or
// not stopped (want false). SIGSTOP and SIGCONT take effect asynchronously; this makes Freeze and
// Thaw return only once they have.
func waitState(pid int, want bool, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		stopped, err := isStopped(pid)
		if err != nil {
			return err
		}
		if stopped == want {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("redistest: redis-server pid %d: stopped=%v after %v, want %v", pid, stopped, d, want)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// isStopped reads the state field of /proc/PID/stat.
func isStopped(pid int) (bool, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false, fmt.Errorf("redistest: read process state: %w", err)
	}
	// Format: "pid (comm) S ...": comm may contain spaces or parentheses, so split at the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return false, fmt.Errorf("redistest: unexpected /proc/%d/stat: %q", pid, b)
	}
	state := b[i+2]
	return state == 'T' || state == 't', nil
}
