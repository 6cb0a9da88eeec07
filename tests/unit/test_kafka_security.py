"""Kafka security settings reach both Faust and our own clients; the password stays a secret elsewhere."""

from __future__ import annotations

import ssl

import faust
import pytest
from pydantic import ValidationError

from stream_app.kafka.clients import client_kwargs
from stream_app.ops.settings import Settings
from stream_app.worker.app import faust_config


def sasl_ssl() -> Settings:
    return Settings(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="svc",
                    sasl_password="s3cret-pw")  # type: ignore[arg-type]  # noqa: S106 - a test value


def test_sasl_ssl_goes_to_faust_as_credentials() -> None:
    credentials = faust_config(sasl_ssl())["broker_credentials"]
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.username, credentials.password) == ("svc", "s3cret-pw")
    assert str(credentials.mechanism.value) == "SCRAM-SHA-512"
    assert isinstance(credentials.ssl_context, ssl.SSLContext)


def test_sasl_ssl_goes_to_our_own_clients() -> None:
    kwargs = client_kwargs(sasl_ssl())
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == ("svc", "s3cret-pw")
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)


def test_plaintext_has_no_credentials_and_ssl_alone_has_a_context() -> None:
    assert faust_config(Settings())["broker_credentials"] is None
    assert isinstance(faust_config(Settings(security_protocol="SSL"))["broker_credentials"], faust.SSLCredentials)


def test_the_password_is_secret_and_required_for_sasl() -> None:
    settings = sasl_ssl()
    assert "s3cret-pw" not in repr(settings) and "s3cret-pw" not in str(settings.model_dump())
    with pytest.raises(ValidationError, match="SASL security needs"):
        Settings(security_protocol="SASL_PLAINTEXT", sasl_username="svc")
