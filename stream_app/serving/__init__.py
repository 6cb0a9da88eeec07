"""The read side: rebuilding profiles from the delta topic, the Redis store and its subscriber."""
