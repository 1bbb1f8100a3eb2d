package tiered

// setHooks installs the test seams under the cache's lock, so the goroutines
// that later read them (the Bus's handler, fills) are ordered after it.
func (c *Cache[V]) setHooks(afterL2Read func(key string), afterApply func()) {
	c.mu.Lock()
	c.afterL2Read, c.afterApply = afterL2Read, afterApply
	c.mu.Unlock()
}

// applied returns a channel that receives once per message the cache
// applies from the Bus.
func applied[V any](c *Cache[V]) <-chan struct{} {
	ch := make(chan struct{}, 1024)
	c.setHooks(c.afterL2Read, func() { ch <- struct{}{} })
	return ch
}
