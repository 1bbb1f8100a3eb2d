//go:build race || !(amd64 || arm64 || loong64 || mips64 || mips64le || ppc64 || ppc64le || riscv64 || s390x)

package pcount

import "sync/atomic"

// add is atomic under the race detector, which does not know that pinning
// gives the cell a single writer, and on 32-bit platforms, where a plain
// 64-bit add is two stores that a concurrent Load could see half done.
func add(n *uint64) uint64 { return atomic.AddUint64(n, 1) }
