"""Real-time user-profile engine."""

__version__ = "0.1.0"
