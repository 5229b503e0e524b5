package bus

// SetLocalFullHook makes l call f with an event's kind whenever it finds
// the router's shard full.
func SetLocalFullHook(l *Local, f func(kind string)) { l.full = f }
