package tiered

// The setters install test seams under the cache's lock, so the goroutines
// that later read them (the Bus's handler, fills) are ordered after it.

func (c *Cache[V]) setReadHook(afterL2Read func(key string)) {
	c.mu.Lock()
	c.afterL2Read = afterL2Read
	c.mu.Unlock()
}

func (c *Cache[V]) setStoreHook(beforeL1Store func(key string)) {
	c.mu.Lock()
	c.beforeL1Store = beforeL1Store
	c.mu.Unlock()
}

// applied returns a channel that receives once per message the cache
// applies from the Bus.
func applied[V any](c *Cache[V]) <-chan struct{} {
	ch := make(chan struct{}, 1024)
	c.mu.Lock()
	c.afterApply = func() { ch <- struct{}{} }
	c.mu.Unlock()
	return ch
}

func (c *Cache[V]) setFlightHooks(flightStart func(key string), beforeApply func()) {
	c.mu.Lock()
	c.flightStart, c.beforeApply = flightStart, beforeApply
	c.mu.Unlock()
}
