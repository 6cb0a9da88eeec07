"""Pure profile logic: decay, keywords, the profile fold, triage of input, the delta replica, pseudonyms.

Nothing here imports Faust, torch or a Kafka client: unit tests exercise it all without a broker.
"""
