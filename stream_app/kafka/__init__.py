"""Kafka plumbing: clients and codecs, topic reading helpers, the embedded broker and its work-arounds."""
