"""The Redis URL forms gpubroker takes, parsed once, with no Redis client in sight.

Plain: ``redis://[[user]:password@]host:port/db`` and ``rediss://...`` (TLS), as redis-py and
kombu read them. Sentinel (a master with replicas, watched by Redis Sentinel, which promotes a
replica when the master is lost)::

    redis+sentinel://[[user]:password@]host:port[,host:port...]/<service_name>[/<db>]
    rediss+sentinel://...          TLS to the master, replicas and sentinels

The hosts are the sentinels; ``service_name`` is the master's name in their configuration
(``sentinel monitor <service_name> ...``); the credentials are the master's (an ACL user of
config/redis-acl.conf), the sentinels are reached without. ``ssl_*`` query parameters
(``ssl_cert_reqs=required|optional|none``, ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``)
configure TLS as they do for ``rediss://``. ``store.connection`` turns a Sentinel URL into a
redis-py ``Sentinel(...).master_for(service)`` client, ``celery_conf`` into kombu's
``sentinel://`` transport with ``master_name``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote, urlsplit

PLAIN_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SSL_PARAMS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
FORMS = ("redis://[[user]:password@]host:port/db, rediss://... (TLS), or "
         "redis+sentinel://[[user]:password@]host:port[,host:port...]/<service_name>[/<db>]")


@dataclass(frozen=True)
class SentinelTarget:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ssl: dict[str, str] = field(default_factory=dict)  # the ssl_* query parameters

    def kombu_url(self) -> str:
        """kombu's form: one ``sentinel://`` URL per sentinel, joined by ``;`` (each carries the
        master's credentials and the db: kombu reads them from the first, the hosts from all)."""
        auth = ""
        if self.username or self.password:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        return ";".join(f"sentinel://{auth}{_host(host)}:{port}/{self.db}" for host, port in self.sentinels)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def is_sentinel(url: str) -> bool:
    return urlsplit(url).scheme in SENTINEL_SCHEMES


def check(url: str) -> str:
    """``url`` if it is a form gpubroker takes; else ValueError saying which forms there are."""
    scheme = urlsplit(url).scheme
    if scheme in SENTINEL_SCHEMES:
        parse_sentinel(url)
    elif scheme not in PLAIN_SCHEMES:
        raise ValueError(f"unknown scheme {scheme + '://' if scheme else '(none)'}; use {FORMS}")
    return url


def parse_sentinel(url: str) -> SentinelTarget:
    """A ``redis+sentinel://`` URL's parts; ValueError naming what is wrong (never the password)."""
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"not a Sentinel URL (redis+sentinel://...): {parts.scheme}://")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, password = None, None
    if userinfo:
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    sentinels = []
    for item in hosts.split(","):
        host, port = _host_port(item)
        sentinels.append((host, port))
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("the Sentinel URL names no service: redis+sentinel://host:port[,host:port...]/<service_name>")
    if len(path) > 2:
        raise ValueError("the Sentinel URL path is /<service_name>[/<db>], got more parts")
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise ValueError(f"the Sentinel URL's db must be a whole number, got {path[1]!r}")
        db = int(path[1])
    query = dict(parse_qsl(parts.query))
    unknown = set(query) - set(SSL_PARAMS) - {"ssl"}
    if unknown:
        raise ValueError(f"the Sentinel URL takes only the query parameters ssl, {', '.join(SSL_PARAMS)}; "
                         f"not {', '.join(sorted(unknown))}")
    tls = parts.scheme == "rediss+sentinel" or query.pop("ssl", "").lower() in ("1", "true", "yes")
    return SentinelTarget(tuple(sentinels), path[0], db, username, password, tls,
                          {k: v for k, v in query.items() if k in SSL_PARAMS})


def _host_port(item: str) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [::1]:26379
        host, _, rest = item[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise ValueError(f"the Sentinel URL has an empty sentinel host in {item!r}: host:port[,host:port...]")
    if not port_text:
        return host, 26379
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"the Sentinel URL has a bad sentinel port in {item!r}")
    return host, int(port_text)
