"""The topics of the engine. Raw bytes everywhere: validation and encoding are ours, not Faust's."""

from __future__ import annotations

from stream_app.app import app, settings

# Producers may key and partition these any way they like; the ingest and review agents re-key by user id.
clicks_and_searches = app.topic(
    settings.topic_clicks, settings.topic_searches,
    key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
)
reviews = app.topic(
    settings.topic_reviews, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
)

# Validated events keyed by user id with our partitioner: the profile table is co-partitioned with it,
# so exactly one worker owns each user's profile however the producer partitioned the input.
events_by_user = app.topic(
    f"{settings.app_id}-events-by-user",
    partitions=settings.partitions, internal=True,
    key_type=str, value_type=bytes, key_serializer="utf8", value_serializer="raw",
)

dead_letters = app.topic(
    settings.topic_dead_letters, partitions=1,
    key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
)

profile_deltas = app.topic(
    settings.topic_deltas, partitions=settings.partitions,
    key_type=str, value_type=bytes, key_serializer="utf8", value_serializer="raw",
)
