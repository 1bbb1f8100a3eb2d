//go:build race

// Package racebuild reports whether the race detector is on, so that tests
// counting allocations can allow for the detector's own.
package racebuild

// Enabled is true in -race builds.
const Enabled = true
