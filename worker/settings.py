"""Every environment variable is read here, once, into one frozen ``Settings``.

Tests build settings from a plain dict (``Settings.from_env({...})``) instead of patching
``os.environ``. A wrong value raises ``ConfigError`` naming the variable and what to fix.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from worker.errors import ConfigError
from worker.events import SERVICE_ID_RE
from worker.retry import RetryPolicy

#: The documented collection hosts. Sending to the wrong region loses data silently, so the
#: region is an explicit, validated choice and never guessed.
REGION_GATEWAYS = {
    "us": "https://sdr.totango.com/pixel.gif",
    "eu": "https://sdr-eu1.totango.com/pixel.gif",
}

#: RabbitMQ's default ``consumer_timeout`` (30 minutes). A delayed retry held by a consumer
#: for longer makes the broker close the channel with PRECONDITION_FAILED.
RABBITMQ_DEFAULT_CONSUMER_TIMEOUT = 1800.0

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Settings:
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672//"
    service_id: str | None = None
    region: str = "us"
    gateway_url: str = REGION_GATEWAYS["us"]
    #: ``TOTANGO_SERVICE_MAP``: each service id's gateway URL, for a fleet that serves several
    #: Totango services (a US and an EU one). ``None``: every event goes to ``gateway_url``.
    service_map: tuple[tuple[str, str], ...] | None = None
    allow_insecure_gateway: bool = False
    connect_timeout: float = 3.05
    read_timeout: float = 10.0
    http_method: str = "GET"
    max_url_length: int = 8000
    #: The retry defaults are the policy's own (worker/retry.py), stated once.
    max_retries: int = RetryPolicy.max_retries
    retry_backoff_base: float = RetryPolicy.backoff_base
    retry_backoff_max: float = RetryPolicy.backoff_max
    retry_after_max: float = RetryPolicy.retry_after_max
    visibility_timeout: float = 3600.0
    rabbitmq_consumer_timeout: float = RABBITMQ_DEFAULT_CONSUMER_TIMEOUT
    pool: str = "threads"
    concurrency: int = 64
    prefetch_multiplier: int = 2
    #: Gateway calls a process's batches may have in flight at once, shared by its batches.
    batch_senders: int = 128
    #: Celery task events (received, started, succeeded...), which Flower's task views need.
    task_events: bool = True
    soft_shutdown_timeout: float = 20.0
    metrics_port: int = 9808
    heartbeat_file: str = "/tmp/totango-worker.heartbeat"  # noqa: S108  overridable; pods mount /tmp
    heartbeat_max_age: float = 60.0
    sentry_dsn: str | None = None
    sentry_environment: str | None = None
    sentry_release: str | None = None
    sentry_send_pii: bool = False
    log_level: str = "INFO"
    #: Where the embedded (``filesystem://``) broker of ``make demo`` keeps its messages.
    filesystem_dir: str = ".demo/broker"
    # --- the state store (worker/state.py): duplicate suppression, newest value wins -------
    #: A Redis URL; unset: the broker itself when it is Redis, else no store (features off).
    state_url: str | None = None
    #: Record each delivered event id, and acknowledge a copy of a delivered event unsent.
    dedup: bool = True
    #: How long a delivered id is remembered (7 days): the longest path to a redelivery
    #: (``redelivery_span``) plus the window in which a replay of it is still recognised.
    dedup_ttl: float = 7 * 24 * 3600.0
    #: Per attribute, send nothing older than the newest ``occurred_at`` already sent.
    newest_wins: bool = True
    #: The fleet's breaker (worker/outage.py): in a gateway outage, stop taking events and
    #: probe the gateway, instead of spending every event's retries.
    breaker: bool = True
    #: Consecutive calls, across the fleet, that find the gateway down before it opens.
    breaker_threshold: int = 20
    #: Seconds between two probes of a gateway while its breaker is open.
    breaker_probe_interval: float = 5.0

    @property
    def broker_kind(self) -> str:
        """``rabbitmq``, ``redis`` or ``embedded`` (the demo's filesystem transport)."""
        return broker_kind(self.broker_url)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and check every setting. ``env`` defaults to ``os.environ``."""
        e = os.environ if env is None else env
        d = cls()
        region = e.get("TOTANGO_REGION", d.region).strip().lower()
        if region not in REGION_GATEWAYS:
            raise ConfigError("TOTANGO_REGION", f"must be one of us, eu; got {region!r}")
        allow_insecure = _bool(e, "TOTANGO_ALLOW_INSECURE_GATEWAY", d.allow_insecure_gateway)
        gateway_url = e.get("TOTANGO_GATEWAY_URL") or REGION_GATEWAYS[region]
        gateway_url = check_gateway_url(gateway_url, allow_insecure)
        service_id = e.get("TOTANGO_SERVICE_ID") or None
        if service_id is not None and not SERVICE_ID_RE.fullmatch(service_id):
            raise ConfigError("TOTANGO_SERVICE_ID", "must look like SP-<digits>-<digits>")
        service_map = _service_map(e.get("TOTANGO_SERVICE_MAP") or "", allow_insecure)
        if service_map is not None:
            if e.get("TOTANGO_GATEWAY_URL"):
                raise ConfigError(
                    "TOTANGO_SERVICE_MAP",
                    "and TOTANGO_GATEWAY_URL are both set: the map names each service's "
                    "gateway, so leave TOTANGO_GATEWAY_URL unset",
                )
            if service_id is not None and service_id not in dict(service_map):
                raise ConfigError(
                    "TOTANGO_SERVICE_MAP",
                    f"has no entry for TOTANGO_SERVICE_ID ({service_id}), the default service",
                )
        method = e.get("TOTANGO_HTTP_METHOD", d.http_method).upper()
        if method not in {"GET", "POST"}:
            raise ConfigError("TOTANGO_HTTP_METHOD", "must be GET or POST")
        pool = e.get("TOTANGO_POOL", d.pool)
        if pool in {"gevent", "eventlet"}:
            raise ConfigError(
                "TOTANGO_POOL",
                f"{pool} is not supported: the gateway's calls are made by libcurl, which no "
                "green thread can yield from, so one call would stall the whole process; use "
                "threads",
            )
        if pool not in {"threads", "prefork", "solo"}:
            raise ConfigError("TOTANGO_POOL", "must be threads, prefork or solo")
        broker_url = e.get("TOTANGO_BROKER_URL", d.broker_url)
        broker_kind(broker_url)
        settings = cls(
            broker_url=broker_url,
            service_id=service_id,
            region=region,
            gateway_url=gateway_url,
            service_map=service_map,
            allow_insecure_gateway=allow_insecure,
            connect_timeout=_float(e, "TOTANGO_CONNECT_TIMEOUT", d.connect_timeout, low=0.1),
            read_timeout=_float(e, "TOTANGO_READ_TIMEOUT", d.read_timeout, low=0.1),
            http_method=method,
            max_url_length=_int(e, "TOTANGO_MAX_URL_LENGTH", d.max_url_length, low=256),
            max_retries=_int(e, "TOTANGO_MAX_RETRIES", d.max_retries, low=0),
            retry_backoff_base=_float(e, "TOTANGO_RETRY_BACKOFF_BASE", d.retry_backoff_base, 0),
            retry_backoff_max=_float(e, "TOTANGO_RETRY_BACKOFF_MAX", d.retry_backoff_max, 0),
            retry_after_max=_float(e, "TOTANGO_RETRY_AFTER_MAX", d.retry_after_max, low=0),
            visibility_timeout=_float(e, "TOTANGO_VISIBILITY_TIMEOUT", d.visibility_timeout, 1),
            rabbitmq_consumer_timeout=_float(
                e, "TOTANGO_RABBITMQ_CONSUMER_TIMEOUT", d.rabbitmq_consumer_timeout, low=1
            ),
            pool=pool,
            concurrency=_int(e, "TOTANGO_CONCURRENCY", d.concurrency, low=1),
            prefetch_multiplier=_int(e, "TOTANGO_PREFETCH_MULTIPLIER", d.prefetch_multiplier, 1),
            batch_senders=_int(e, "TOTANGO_BATCH_SENDERS", d.batch_senders, low=1),
            task_events=_bool(e, "TOTANGO_TASK_EVENTS", d.task_events),
            soft_shutdown_timeout=_float(
                e, "TOTANGO_SOFT_SHUTDOWN_TIMEOUT", d.soft_shutdown_timeout, low=0
            ),
            metrics_port=_int(e, "TOTANGO_METRICS_PORT", d.metrics_port, low=0),
            heartbeat_file=e.get("TOTANGO_HEARTBEAT_FILE", d.heartbeat_file),
            heartbeat_max_age=_float(e, "TOTANGO_HEARTBEAT_MAX_AGE", d.heartbeat_max_age, 1),
            sentry_dsn=e.get("SENTRY_DSN") or None,
            sentry_environment=e.get("SENTRY_ENVIRONMENT") or None,
            sentry_release=e.get("SENTRY_RELEASE") or None,
            sentry_send_pii=_bool(e, "TOTANGO_SENTRY_SEND_PII", d.sentry_send_pii),
            log_level=e.get("TOTANGO_LOG_LEVEL", d.log_level).upper(),
            filesystem_dir=e.get("TOTANGO_FILESYSTEM_DIR", d.filesystem_dir),
            state_url=_state_url(e.get("TOTANGO_STATE_URL") or None),
            dedup=_bool(e, "TOTANGO_DEDUP", d.dedup),
            dedup_ttl=_float(e, "TOTANGO_DEDUP_TTL", d.dedup_ttl, low=1),
            newest_wins=_bool(e, "TOTANGO_NEWEST_WINS", d.newest_wins),
            breaker=_bool(e, "TOTANGO_BREAKER", d.breaker),
            breaker_threshold=_int(e, "TOTANGO_BREAKER_THRESHOLD", d.breaker_threshold, low=1),
            breaker_probe_interval=_float(
                e, "TOTANGO_BREAKER_PROBE_INTERVAL", d.breaker_probe_interval, low=0.5
            ),
        )
        settings.check_delays()
        settings.check_dedup_ttl()
        return settings

    @property
    def service_ids(self) -> frozenset[str] | None:
        """The only service ids events may name, when a service map is set."""
        return None if self.service_map is None else frozenset(dict(self.service_map))

    @property
    def gateway_urls(self) -> tuple[str, ...]:
        """Every gateway this worker calls: the service map's URLs, or ``gateway_url``."""
        if self.service_map is None:
            return (self.gateway_url,)
        return tuple(dict.fromkeys(url for _, url in self.service_map))

    def gateway_for(self, service_id: str) -> str:
        """The gateway URL for an event of ``service_id``."""
        if self.service_map is None:
            return self.gateway_url
        return dict(self.service_map)[service_id]

    @property
    def longest_delay(self) -> float:
        """The longest countdown a retry can get: the backoff cap or the Retry-After cap."""
        return max(self.retry_backoff_max, self.retry_after_max)

    @cached_property
    def retry_policy(self) -> RetryPolicy:
        """The retry policy these settings make, for single events and batches alike."""
        return RetryPolicy(
            self.max_retries, self.retry_backoff_base, self.retry_backoff_max, self.retry_after_max
        )

    def check_delays(self) -> None:
        """A retry countdown must stay below what the broker tolerates for a held message.

        On Redis a reserved message comes back after ``visibility_timeout`` and runs twice; on
        RabbitMQ a message held past ``consumer_timeout`` closes the channel. Half the limit
        leaves room for the call itself and for clock skew.
        """
        if self.retry_backoff_base > self.retry_backoff_max:
            raise ConfigError(
                "TOTANGO_RETRY_BACKOFF_BASE", "must not exceed TOTANGO_RETRY_BACKOFF_MAX"
            )
        kind = self.broker_kind
        if kind == "redis" and self.longest_delay > self.visibility_timeout / 2:
            raise ConfigError(
                "TOTANGO_RETRY_BACKOFF_MAX",
                f"the longest retry delay ({self.longest_delay:g}s, backoff or Retry-After cap) "
                f"must stay under half of TOTANGO_VISIBILITY_TIMEOUT "
                f"({self.visibility_timeout:g}s), or Redis redelivers the retry twice",
            )
        if kind == "rabbitmq" and self.longest_delay > self.rabbitmq_consumer_timeout / 2:
            raise ConfigError(
                "TOTANGO_RETRY_BACKOFF_MAX",
                f"the longest retry delay ({self.longest_delay:g}s) must stay under half of "
                f"the broker's consumer_timeout ({self.rabbitmq_consumer_timeout:g}s)",
            )

    @property
    def state_store_url(self) -> str | None:
        """The state store: ``TOTANGO_STATE_URL``, else the broker when it is Redis."""
        if self.state_url is not None:
            return self.state_url
        return self.broker_url if self.broker_kind == "redis" else None

    @property
    def dedup_on(self) -> bool:
        """Duplicate suppression runs only with a store to keep the records in."""
        return self.dedup and self.state_store_url is not None

    @property
    def newest_wins_on(self) -> bool:
        """The newest-value rule runs only with a store to keep the times in."""
        return self.newest_wins and self.state_store_url is not None

    @property
    def breaker_on(self) -> bool:
        """The fleet's breaker runs only with a store the fleet shares."""
        return self.breaker and self.state_store_url is not None

    @property
    def state_on(self) -> bool:
        """Whether any feature of the state store is on."""
        return self.dedup_on or self.newest_wins_on or self.breaker_on

    @property
    def redelivery_span(self) -> float:
        """The longest time from a 200 to another copy of that message reaching a worker:
        the broker holding a message (Redis ``visibility_timeout``, RabbitMQ
        ``consumer_timeout``) plus every retry delay at its cap."""
        held = (
            self.visibility_timeout
            if self.broker_kind == "redis"
            else self.rabbitmq_consumer_timeout
        )
        return held + self.max_retries * self.longest_delay

    def check_dedup_ttl(self) -> None:
        """A record that expires before the last copy of its message arrives stops nothing."""
        if self.dedup_on and self.dedup_ttl <= self.redelivery_span:
            raise ConfigError(
                "TOTANGO_DEDUP_TTL",
                f"must exceed the longest path to a redelivery ({self.redelivery_span:g}s: "
                "the broker's hold on a message plus every retry delay at its cap)",
            )

    def check_worker(self) -> None:
        """What only a worker needs: a default service id for messages that name none."""
        if self.service_id is None:
            raise ConfigError(
                "TOTANGO_SERVICE_ID", "is required by the worker (for example SP-1234-56)"
            )


def broker_kind(url: str) -> str:
    """``rabbitmq``, ``redis`` or ``embedded``, for one broker URL or for a failover list.

    A failover list is kombu's syntax: URLs separated by ``;``, tried in order and then
    round-robin when a connection is lost. Each entry is checked on its own, and a wrong one
    is named by its position (1-based); all entries must be of one broker kind, since the
    queue arguments and transport options follow the kind.
    """
    entries = url.split(";")
    if len(entries) == 1:
        return _url_kind(url)
    kinds: list[str] = []
    for n, entry in enumerate(entries, 1):
        where = f"failover entry {n} of {len(entries)}"
        if not entry.strip():
            raise ConfigError("TOTANGO_BROKER_URL", f"{where} is empty (a stray ';'?)")
        if entry != entry.strip():
            raise ConfigError(
                "TOTANGO_BROKER_URL", f"{where} has white space around it; use ';' alone"
            )
        try:
            kind = _url_kind(entry)
        except ConfigError as exc:
            raise ConfigError("TOTANGO_BROKER_URL", f"{where} {exc.reason}") from None
        if kind == "embedded":
            raise ConfigError(
                "TOTANGO_BROKER_URL", f"{where} is the embedded demo broker, which has no failover"
            )
        if kinds and kind != kinds[0]:
            raise ConfigError(
                "TOTANGO_BROKER_URL",
                f"{where} is {kind} but entry 1 is {kinds[0]}: all entries must be one kind",
            )
        kinds.append(kind)
    return kinds[0]


def _url_kind(url: str) -> str:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  raises ValueError for a port that is not a number
    except ValueError:  # urlsplit refuses a malformed IPv6 host such as "[::1"
        raise ConfigError("TOTANGO_BROKER_URL", "is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme in {"amqp", "amqps", "pyamqp"}:
        return "rabbitmq"
    if scheme in {"redis", "rediss"}:
        return "redis"
    if scheme.startswith("sqla+") or scheme == "filesystem":
        return "embedded"
    raise ConfigError(
        "TOTANGO_BROKER_URL", f"must be an amqp:// or redis:// URL; got scheme {scheme!r}"
    )


def _state_url(url: str | None) -> str | None:
    if url is None:
        return None
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        raise ConfigError("TOTANGO_STATE_URL", "is not a valid URL") from None
    if scheme not in {"redis", "rediss", "unix"}:
        raise ConfigError("TOTANGO_STATE_URL", f"must be a redis:// URL; got scheme {scheme!r}")
    return url


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: Parameter names a gateway URL's own query may not hold: they are the event's, and one
#: in the URL would be sent twice (or instead of the event's).
_EVENT_PARAMETER_PREFIXES = ("sdr_", "enablewriteback")


def check_gateway_url(url: str, allow_insecure: bool, variable: str = "TOTANGO_GATEWAY_URL") -> str:
    """The gateway URL, checked, with its path ending in ``pixel.gif``: Totango's examples
    write ``pixel.gif/``, which is accepted and sent as ``pixel.gif``. A query of the URL's
    own (``?api-token=...``) is kept and merged into every call (``worker/gateway.py``)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  raises ValueError on a port out of range or not a number
    except ValueError:  # urlsplit refuses a malformed IPv6 host such as "[::1"
        raise ConfigError(variable, f"is not a valid URL; got {url!r}") from None
    if parts.scheme not in {"https", "http"} or not parts.hostname:
        raise ConfigError(variable, f"must be an https:// URL; got {url!r}")
    if parts.scheme == "http" and not (is_loopback(parts.hostname) or allow_insecure):
        raise ConfigError(
            variable,
            "plain http:// is allowed only for loopback hosts (127.0.0.1, ::1, localhost)",
        )
    path = parts.path.removesuffix("/")
    if path.rsplit("/", 1)[-1] != "pixel.gif":
        raise ConfigError(variable, f"must end in /pixel.gif (the collection gateway); got {url!r}")
    if parts.fragment or url.endswith("#"):
        raise ConfigError(variable, f"must not have a #fragment; got {url!r}")
    for name, _ in parse_qsl(parts.query, keep_blank_values=True):
        if name.lower().startswith(_EVENT_PARAMETER_PREFIXES):
            raise ConfigError(variable, f"must not carry the event parameter {name!r} in its query")
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _service_map(raw: str, allow_insecure: bool) -> tuple[tuple[str, str], ...] | None:
    """``SP-1-2=us,SP-3-4=eu`` or ``SP-5-6=https://host/pixel.gif``: service id to region
    or gateway URL, resolved to URLs. Empty: no map."""
    if not raw.strip():
        return None
    variable = "TOTANGO_SERVICE_MAP"
    entries: dict[str, str] = {}
    for entry in raw.split(","):
        service_id, sep, target = (part.strip() for part in entry.partition("="))
        if not sep or not service_id or not target:
            raise ConfigError(
                variable, f"each entry is <service id>=us|eu|<gateway URL>; got {entry.strip()!r}"
            )
        if not SERVICE_ID_RE.fullmatch(service_id):
            raise ConfigError(variable, f"{service_id!r} does not look like SP-<digits>-<digits>")
        if service_id in entries:
            raise ConfigError(variable, f"names {service_id} twice")
        if target.lower() in REGION_GATEWAYS:
            entries[service_id] = REGION_GATEWAYS[target.lower()]
        elif "://" in target:
            entries[service_id] = check_gateway_url(target, allow_insecure, variable)
        else:
            raise ConfigError(
                variable, f"{service_id} maps to {target!r}: use us, eu or a gateway URL"
            )
    return tuple(entries.items())


def _int(env: Mapping[str, str], name: str, default: int, low: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"must be an integer; got {raw!r}") from None
    if value < low:
        raise ConfigError(name, f"must be at least {low}; got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, low: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"must be a number; got {raw!r}") from None
    if not math.isfinite(value):  # an infinite timeout or delay is a hang, not a limit
        raise ConfigError(name, f"must be a finite number; got {raw!r}")
    if value < low:
        raise ConfigError(name, f"must be at least {low:g}; got {raw}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise ConfigError(name, f"must be true or false; got {raw!r}")
