//go:build !race && (amd64 || arm64 || loong64 || mips64 || mips64le || ppc64 || ppc64le || riscv64 || s390x)

package pcount

// add is a plain increment: the caller is pinned to the cell's P, so nothing
// else writes the cell meanwhile. Load reads it atomically, which on the
// 64-bit platforms this file is built for is an ordinary aligned load.
func add(n *uint64) uint64 { *n++; return *n }
