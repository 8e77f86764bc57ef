"""The redis+sentinel:// URL form: parsed once (broker.redis_urls), refused with the setting named,
and turned into kombu's sentinel:// transport for every Celery process (client, worker, Flower)."""

from __future__ import annotations

import ssl

import pytest

from broker.celery_conf import SENTINEL_TRANSPORT, celery_settings
from broker.errors import ConfigError
from broker.redis_urls import SentinelTarget, parse_sentinel
from broker.settings import Settings, redacted_url


def test_the_full_form() -> None:
    url = "redis+sentinel://worker:s%40cret@10.0.0.1:26379,10.0.0.2,[::1]:26380/gpb/2"
    assert parse_sentinel(url) == SentinelTarget(
        (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380)), "gpb", 2, "worker", "s@cret")
    assert parse_sentinel("redis+sentinel://:pw@h:1/gpb") == SentinelTarget((("h", 1),), "gpb", 0, None, "pw")
    assert redacted_url(url) == "redis+sentinel://worker:***@10.0.0.1:26379,10.0.0.2,[::1]:26380/gpb/2"


def test_tls_by_scheme_or_query() -> None:
    assert parse_sentinel("rediss+sentinel://h:1/gpb?ssl_ca_certs=/ca.pem").tls
    target = parse_sentinel("redis+sentinel://h:1/gpb?ssl=true&ssl_cert_reqs=none")
    assert target.tls and target.ssl == {"ssl_cert_reqs": "none"}
    assert not parse_sentinel("redis+sentinel://h:1/gpb").tls


@pytest.mark.parametrize(("url", "reason"), [
    ("redis+sentinel://u:secret@h:26379", "names no service"),
    ("redis+sentinel://h:26379/gpb/zero", "db must be a whole number"),
    ("redis+sentinel://h:26379/gpb/0/x", "/<service_name>[/<db>]"),
    ("redis+sentinel://h:0/gpb", "bad sentinel port"),
    ("redis+sentinel://h:1,:2/gpb", "empty sentinel host"),
    ("redis+sentinel://h:1/gpb?timeout=3", "not timeout"),
    ("sentinel://h:26379", "unknown scheme sentinel://"),
])
def test_a_bad_url_is_refused_naming_the_setting(url: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(redis_url=url)
    text = str(caught.value)
    assert "redis_url (GPUBROKER_REDIS_URL)" in text and reason in text
    assert "secret" not in text


def test_celery_gets_kombus_sentinel_transport() -> None:
    settings = Settings(redis_url="redis+sentinel://u:pw@s1:26379,s2:26380/gpb/3", min_replicas_ack=1)
    conf = celery_settings(settings)
    # One URL (no alternates kombu would switch to, with its own transport), every sentinel an option.
    assert conf["broker_url"] == "sentinel://u:pw@s1:26379/3"
    assert conf["broker_transport"] == SENTINEL_TRANSPORT
    options = conf["broker_transport_options"]
    assert options["master_name"] == "gpb" and options["sentinels"] == [["s1", 26379], ["s2", 26380]]
    assert options["gpubroker"]["redis_url"] == settings.redis_url  # the result backend's
    assert options["gpubroker"]["min_replicas_ack"] == 1
    flower = celery_settings(settings, submit=False)  # kombu's own sentinel transport: every sentinel a URL
    assert "broker_transport" not in flower and flower["broker_transport_options"]["master_name"] == "gpb"
    assert flower["broker_url"] == "sentinel://u:pw@s1:26379/3;sentinel://u:pw@s2:26380/3"
    assert conf["broker_use_ssl"] is False
    tls = celery_settings(Settings(redis_url="rediss+sentinel://s1:26379/gpb?ssl_ca_certs=/ca.pem"))
    assert tls["broker_use_ssl"] == {"ssl_ca_certs": "/ca.pem", "ssl_cert_reqs": ssl.CERT_REQUIRED}


def test_the_brokers_sentinel_channel_asks_every_sentinel_and_never_switches_transport() -> None:
    """kombu switches a connection with alternates to the next URL, and to the transport its
    scheme names (kombu's own, which would publish past submit.lua): the broker's connection has
    none, and its channel still asks every sentinel."""
    from broker.celery_conf import monitor_app
    from broker.native.transport import SentinelChannel

    app = monitor_app(Settings(redis_url="redis+sentinel://s1:26379,s2:26380/gpb/0"))
    connection = app.connection_for_write()
    assert connection.alt == [] and connection.transport_cls == SENTINEL_TRANSPORT
    channel = SentinelChannel.__new__(SentinelChannel)
    channel.connection = connection.transport
    channel.sentinels, channel.master_name = [["s1", 26379], ["s2", 26380]], "gpb"
    channel.min_other_sentinels, channel.sentinel_kwargs = 0, None
    seen: list[list[tuple[str, int]]] = []

    class Probe(Exception):
        pass

    def sentinel(hosts: list[tuple[str, int]], **_: object) -> None:
        seen.append(list(hosts))
        raise Probe

    import kombu.transport.redis as kombu_redis
    real, kombu_redis.sentinel.Sentinel = kombu_redis.sentinel.Sentinel, sentinel  # type: ignore[attr-defined]
    try:
        channel._connparams = lambda asynchronous=False: {"host": "s1", "port": 26379}  # type: ignore[method-assign]
        with pytest.raises(Probe):
            channel._sentinel_managed_pool()
    finally:
        kombu_redis.sentinel.Sentinel = real  # type: ignore[attr-defined]
    assert seen == [[("s1", 26379), ("s2", 26380)]]
    assert connection.alt == []
