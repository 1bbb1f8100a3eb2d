//go:build unix && !linux

package main

import "syscall"

// childAttr puts a child in its own process group, so that Ctrl-C reaches
// only the demo, which stops the children in order.
func childAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}
