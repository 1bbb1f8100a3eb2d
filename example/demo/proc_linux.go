package main

import "syscall"

// childAttr puts a child in its own process group (Ctrl-C reaches only the
// demo, which stops the children in order) and has the kernel kill it if
// the demo dies without doing so.
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}
