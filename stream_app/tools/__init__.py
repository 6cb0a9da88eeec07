"""Command-line tools around the engine: producing files, sample data, replay, the demo."""
