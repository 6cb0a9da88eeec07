"""The profile table: user id -> ProfileState.to_dict(), backed by a changelog topic."""

from __future__ import annotations

from stream_app.app import app, settings

profiles = app.Table(
    "profiles",
    default=None,
    partitions=settings.partitions,
    key_type=str,
    # Partition the changelog by the key's hash, like events_by_user, instead of by "the current event":
    # a micro-batch spans several partitions, and Faust's current event is only the batch's last one.
    use_partitioner=True,
    help="Per-user decayed profile state",
)
# Faust derives serializers from key_type/value_type and would JSON-encode the key ("\"u1\""), which
# hashes to another partition than the plain UTF-8 key of events_by_user. Writes take the table's
# serializer, recovery reads with the changelog topic's: rebuild the topic so both use UTF-8.
profiles.key_serializer = "utf8"  # type: ignore[attr-defined]
profiles.value_serializer = "json"  # type: ignore[attr-defined]
profiles.changelog_topic = profiles._new_changelog_topic(compacting=True)  # type: ignore[attr-defined]
