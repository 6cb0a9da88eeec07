"""Settings, metrics and logging: what every process shares."""
