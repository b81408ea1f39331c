"""``Settings.from_env`` built from plain dicts: defaults, each check, and the variable named."""

from __future__ import annotations

import pytest

from worker.application import worker_config
from worker.errors import ConfigError
from worker.retry import RetryPolicy
from worker.settings import REGION_GATEWAYS, Settings, broker_kind, is_loopback

US = "https://sdr.totango.com/pixel.gif"
EU = "https://sdr-eu1.totango.com/pixel.gif"
REDIS = "redis://127.0.0.1:6379/0"
AMQP = "amqp://guest:guest@127.0.0.1:5672//"


def config_error(env: dict[str, str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert info.value.reason
    assert str(info.value) == f"{info.value.variable}: {info.value.reason}"
    return info.value


def test_empty_environment_gives_the_defaults() -> None:
    """With nothing set, every setting has its documented default (US, RabbitMQ, no service)."""
    settings = Settings.from_env({})
    assert settings == Settings()
    assert (settings.region, settings.gateway_url, settings.service_id) == ("us", US, None)
    assert settings.broker_kind == "rabbitmq"
    assert settings.allow_insecure_gateway is False


def test_documented_hosts() -> None:
    """The region table holds exactly Totango's two documented collection hosts."""
    assert REGION_GATEWAYS == {"us": US, "eu": EU}


@pytest.mark.parametrize(
    ("value", "region", "url"),
    [("us", "us", US), ("eu", "eu", EU), ("EU", "eu", EU), (" us ", "us", US)],
    ids=["us", "eu", "upper", "padded"],
)
def test_region_picks_the_documented_host(value: str, region: str, url: str) -> None:
    """TOTANGO_REGION us/eu selects the matching gateway."""
    settings = Settings.from_env({"TOTANGO_REGION": value})
    assert (settings.region, settings.gateway_url) == (region, url)


@pytest.mark.parametrize("value", ["", "uk", "us-east", "eu1", "sdr-eu1", "europe"])
def test_unknown_region_is_refused(value: str) -> None:
    """Any region but us/eu is refused: a wrong region loses data silently."""
    assert config_error({"TOTANGO_REGION": value}).variable == "TOTANGO_REGION"


@pytest.mark.parametrize("region", ["us", "eu"])
def test_gateway_url_overrides_the_region_host(region: str) -> None:
    """TOTANGO_GATEWAY_URL replaces the region's host; the region is still recorded."""
    url = "https://proxy.example.com/totango/pixel.gif"
    settings = Settings.from_env({"TOTANGO_REGION": region, "TOTANGO_GATEWAY_URL": url})
    assert (settings.gateway_url, settings.region) == (url, region)


def test_empty_gateway_url_falls_back_to_the_region() -> None:
    """An empty TOTANGO_GATEWAY_URL (as compose files leave it) means the region's host."""
    assert Settings.from_env({"TOTANGO_GATEWAY_URL": "", "TOTANGO_REGION": "eu"}).gateway_url == EU


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/pixel.gif",
        "http://127.0.0.2/pixel.gif",
        "http://[::1]:8080/pixel.gif",
        "http://localhost:8080/pixel.gif",
        "http://LOCALHOST/pixel.gif",
    ],
    ids=["ipv4", "ipv4-other-loopback", "ipv6", "localhost", "localhost-upper"],
)
def test_plain_http_is_allowed_for_loopback(url: str) -> None:
    """A local emulator may be plain http:// on a loopback host."""
    assert Settings.from_env({"TOTANGO_GATEWAY_URL": url}).gateway_url == url


INSECURE = [
    "http://sdr.totango.com/pixel.gif",
    "http://10.0.0.1/pixel.gif",
    "http://[::2]/pixel.gif",
    "http://127.0.0.1.nip.io/pixel.gif",
    "http://localhost.example.com/pixel.gif",
    "http://localhost@example.com/pixel.gif",
]
INSECURE_IDS = [
    "public",
    "private-ip",
    "ipv6",
    "loopback-lookalike",
    "localhost-subdomain",
    "userinfo",
]


@pytest.mark.parametrize("url", INSECURE, ids=INSECURE_IDS)
def test_plain_http_to_other_hosts_is_refused(url: str) -> None:
    """Plain http:// to anything but loopback is refused (the gateway needs TLS 1.2+)."""
    assert config_error({"TOTANGO_GATEWAY_URL": url}).variable == "TOTANGO_GATEWAY_URL"


@pytest.mark.parametrize("url", INSECURE, ids=INSECURE_IDS)
def test_plain_http_to_other_hosts_needs_the_explicit_opt_in(url: str) -> None:
    """TOTANGO_ALLOW_INSECURE_GATEWAY=true lets plain http:// through on purpose."""
    settings = Settings.from_env(
        {"TOTANGO_GATEWAY_URL": url, "TOTANGO_ALLOW_INSECURE_GATEWAY": "true"}
    )
    assert (settings.gateway_url, settings.allow_insecure_gateway) == (url, True)


@pytest.mark.parametrize(
    "url",
    ["ftp://sdr.totango.com/pixel.gif", "sdr.totango.com/pixel.gif", "https://", "http://[::1/x"],
    ids=["ftp", "no-scheme", "no-host", "broken-ipv6"],
)
def test_malformed_gateway_url_is_refused(url: str) -> None:
    """A URL that is not http(s) with a host is a ConfigError, also when urlsplit chokes (fixed)."""
    env = {"TOTANGO_GATEWAY_URL": url, "TOTANGO_ALLOW_INSECURE_GATEWAY": "true"}
    assert config_error(env).variable == "TOTANGO_GATEWAY_URL"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("10.0.0.1", False),
        ("::2", False),
        ("example.com", False),
        ("localhost.example.com", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    """Loopback is localhost or an address in 127.0.0.0/8 or ::1, nothing that only looks so."""
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("value", ["SP-1234-56", "SP-0-0"])
def test_good_service_id(value: str) -> None:
    """A service id shaped SP-<digits>-<digits> is kept."""
    assert Settings.from_env({"TOTANGO_SERVICE_ID": value}).service_id == value


def test_empty_service_id_means_none() -> None:
    """An empty TOTANGO_SERVICE_ID is unset (producers may run without a default)."""
    assert Settings.from_env({"TOTANGO_SERVICE_ID": ""}).service_id is None


@pytest.mark.parametrize(
    "value", ["SP-1", "sp-1-2", "SP-a-b", "SP-1-2\n", "SP-1-2 ", " SP-1-2", "SP-\u0661-2"]
)
def test_bad_service_id_is_refused(value: str) -> None:
    """A malformed service id stops the start; a trailing newline no longer slips through."""
    assert config_error({"TOTANGO_SERVICE_ID": value}).variable == "TOTANGO_SERVICE_ID"


def test_check_worker_requires_a_service_id() -> None:
    """A worker needs a default service id for messages that carry none."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({}).check_worker()
    assert info.value.variable == "TOTANGO_SERVICE_ID"


def test_check_worker_passes_with_a_service_id() -> None:
    """With a service id, check_worker has nothing to say."""
    Settings.from_env({"TOTANGO_SERVICE_ID": "SP-1-2"}).check_worker()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TOTANGO_MAX_RETRIES", "abc"),
        ("TOTANGO_MAX_RETRIES", "-1"),
        ("TOTANGO_MAX_RETRIES", "1.5"),
        ("TOTANGO_CONCURRENCY", "0"),
        ("TOTANGO_PREFETCH_MULTIPLIER", "0"),
        ("TOTANGO_BATCH_SENDERS", "0"),
        ("TOTANGO_BATCH_SENDERS", "many"),
        ("TOTANGO_MAX_URL_LENGTH", "100"),
        ("TOTANGO_METRICS_PORT", "-1"),
        ("TOTANGO_CONNECT_TIMEOUT", "0"),
        ("TOTANGO_CONNECT_TIMEOUT", "fast"),
        ("TOTANGO_READ_TIMEOUT", "-10"),
        ("TOTANGO_READ_TIMEOUT", "nan"),
        ("TOTANGO_READ_TIMEOUT", "inf"),
        ("TOTANGO_RETRY_BACKOFF_BASE", "-1"),
        ("TOTANGO_RETRY_BACKOFF_MAX", "-1"),
        ("TOTANGO_RETRY_AFTER_MAX", "-0.5"),
        ("TOTANGO_VISIBILITY_TIMEOUT", "0"),
        ("TOTANGO_RABBITMQ_CONSUMER_TIMEOUT", "0.5"),
        ("TOTANGO_SOFT_SHUTDOWN_TIMEOUT", "-1"),
        ("TOTANGO_HEARTBEAT_MAX_AGE", "0"),
    ],
)
def test_bad_number_names_its_variable(variable: str, value: str) -> None:
    """A non-numeric, negative, too small or non-finite number is refused, naming the variable."""
    assert config_error({variable: value}).variable == variable


@pytest.mark.parametrize(
    ("variable", "value", "attribute", "expected"),
    [
        ("TOTANGO_MAX_RETRIES", "0", "max_retries", 0),
        ("TOTANGO_MAX_RETRIES", "", "max_retries", 8),
        ("TOTANGO_CONCURRENCY", "4", "concurrency", 4),
        ("TOTANGO_BATCH_SENDERS", "32", "batch_senders", 32),
        ("TOTANGO_BATCH_SENDERS", "", "batch_senders", 128),
        ("TOTANGO_CONNECT_TIMEOUT", "0.5", "connect_timeout", 0.5),
        ("TOTANGO_RETRY_BACKOFF_MAX", "60", "retry_backoff_max", 60.0),
    ],
)
def test_good_number_is_read(variable: str, value: str, attribute: str, expected: float) -> None:
    """Numbers are parsed; an empty value means the default."""
    assert getattr(Settings.from_env({variable: value}), attribute) == expected


@pytest.mark.parametrize(
    ("variable", "value", "attribute", "expected"),
    [
        ("TOTANGO_HTTP_METHOD", "post", "http_method", "POST"),
        ("TOTANGO_LOG_LEVEL", "debug", "log_level", "DEBUG"),
        ("TOTANGO_TASK_EVENTS", "false", "task_events", False),
        ("TOTANGO_TASK_EVENTS", "", "task_events", False),
    ],
)
def test_case_insensitive_choices(variable: str, value: str, attribute: str, expected: str) -> None:
    """Method and log level are normalised to upper case."""
    assert getattr(Settings.from_env({variable: value}), attribute) == expected


@pytest.mark.parametrize(
    ("variable", "value"), [("TOTANGO_HTTP_METHOD", "PUT"), ("TOTANGO_POOL", "fork")]
)
def test_unknown_choice_is_refused(variable: str, value: str) -> None:
    """An HTTP method or pool outside the list is refused, naming the variable."""
    assert config_error({variable: value}).variable == variable


@pytest.mark.parametrize("pool", ["gevent", "eventlet"])
def test_a_green_thread_pool_is_refused_with_the_reason(pool: str) -> None:
    """gevent and eventlet cannot yield from a libcurl call: one call would stall every
    green thread of the process, so the setting is refused with that reason."""
    error = config_error({"TOTANGO_POOL": pool})
    assert error.variable == "TOTANGO_POOL"
    assert "libcurl" in error.reason
    assert "use threads" in error.reason


# --- delays against the broker's limits -----------------------------------------------------


@pytest.mark.parametrize(
    ("env", "ok"),
    [
        ({}, True),  # 300 / 600 s against 3600 / 2
        ({"TOTANGO_RETRY_BACKOFF_MAX": "1800", "TOTANGO_RETRY_AFTER_MAX": "1800"}, True),
        ({"TOTANGO_RETRY_BACKOFF_MAX": "1801"}, False),
        ({"TOTANGO_RETRY_AFTER_MAX": "1801"}, False),
        ({"TOTANGO_VISIBILITY_TIMEOUT": "1199"}, False),  # 600 s Retry-After cap > 599.5
        ({"TOTANGO_VISIBILITY_TIMEOUT": "1200"}, True),
        (
            {
                "TOTANGO_VISIBILITY_TIMEOUT": "120",
                "TOTANGO_RETRY_BACKOFF_MAX": "60",
                "TOTANGO_RETRY_AFTER_MAX": "60",
            },
            True,
        ),
    ],
    ids=[
        "defaults",
        "at-half",
        "backoff-over",
        "retry-after-over",
        "short-visibility",
        "visibility-at-twice",
        "all-short",
    ],
)
def test_redis_delay_caps_stay_under_half_the_visibility_timeout(
    env: dict[str, str], ok: bool
) -> None:
    """On Redis a countdown longer than half visibility_timeout would run the retry twice."""
    env = {"TOTANGO_BROKER_URL": REDIS, **env}
    if ok:
        assert Settings.from_env(env).broker_kind == "redis"
    else:
        error = config_error(env)
        assert error.variable == "TOTANGO_RETRY_BACKOFF_MAX"
        assert "TOTANGO_VISIBILITY_TIMEOUT" in error.reason


@pytest.mark.parametrize(
    ("env", "ok"),
    [
        ({}, True),  # 300 / 600 s against 1800 / 2
        ({"TOTANGO_RETRY_BACKOFF_MAX": "900"}, True),
        ({"TOTANGO_RETRY_BACKOFF_MAX": "901"}, False),
        ({"TOTANGO_RETRY_AFTER_MAX": "901"}, False),
        ({"TOTANGO_RABBITMQ_CONSUMER_TIMEOUT": "1199"}, False),
        ({"TOTANGO_RABBITMQ_CONSUMER_TIMEOUT": "7200", "TOTANGO_RETRY_AFTER_MAX": "3600"}, True),
    ],
    ids=[
        "defaults",
        "at-half",
        "backoff-over",
        "retry-after-over",
        "short-consumer-timeout",
        "long-consumer-timeout",
    ],
)
def test_rabbitmq_delay_caps_stay_under_half_the_consumer_timeout(
    env: dict[str, str], ok: bool
) -> None:
    """On RabbitMQ a message held past consumer_timeout closes the channel."""
    env = {"TOTANGO_BROKER_URL": AMQP, **env}
    if ok:
        assert Settings.from_env(env).broker_kind == "rabbitmq"
    else:
        error = config_error(env)
        assert error.variable == "TOTANGO_RETRY_BACKOFF_MAX"
        assert "consumer_timeout" in error.reason


def test_embedded_broker_has_no_delay_limit() -> None:
    """The demo's embedded broker does not redeliver held messages: long caps are fine."""
    env = {
        "TOTANGO_BROKER_URL": "filesystem://",
        "TOTANGO_RETRY_BACKOFF_MAX": "100000",
        "TOTANGO_VISIBILITY_TIMEOUT": "10",
    }
    assert Settings.from_env(env).retry_backoff_max == 100000.0


@pytest.mark.parametrize("broker", [AMQP, REDIS, "filesystem://"])
def test_backoff_base_above_cap_is_refused(broker: str) -> None:
    """A base above the cap is a contradiction, on any broker."""
    env = {
        "TOTANGO_BROKER_URL": broker,
        "TOTANGO_RETRY_BACKOFF_BASE": "10",
        "TOTANGO_RETRY_BACKOFF_MAX": "5",
    }
    assert config_error(env).variable == "TOTANGO_RETRY_BACKOFF_BASE"


def test_longest_delay_is_the_larger_cap() -> None:
    """longest_delay is what check_delays compares: the backoff cap or the Retry-After cap."""
    assert Settings(retry_backoff_max=300.0, retry_after_max=600.0).longest_delay == 600.0
    assert Settings(retry_backoff_max=700.0, retry_after_max=600.0).longest_delay == 700.0


# --- brokers and booleans ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        (AMQP, "rabbitmq"),
        ("amqps://u:p@mq.example.com:5671//", "rabbitmq"),
        ("pyamqp://127.0.0.1//", "rabbitmq"),
        (REDIS, "redis"),
        ("rediss://:pw@cache.example.com:6380/1", "redis"),
        ("REDIS://127.0.0.1/0", "redis"),
        ("sqla+sqlite:///demo.db", "embedded"),
        ("filesystem://", "embedded"),
    ],
)
def test_broker_kind(url: str, kind: str) -> None:
    """The broker kind follows the URL scheme."""
    assert broker_kind(url) == kind
    assert Settings.from_env({"TOTANGO_BROKER_URL": url}).broker_kind == kind


@pytest.mark.parametrize(
    "url", ["", "kafka://127.0.0.1", "http://127.0.0.1", "127.0.0.1:5672", "redis://[::1"]
)
def test_unknown_broker_is_refused(url: str) -> None:
    """Only amqp://, redis:// and the embedded demo transports are known."""
    assert config_error({"TOTANGO_BROKER_URL": url}).variable == "TOTANGO_BROKER_URL"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        (" yes ", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
        ("", False),
    ],
)
def test_bool_parsing(value: str, expected: bool) -> None:
    """Booleans accept the usual spellings, in any case and with spaces around."""
    settings = Settings.from_env({"TOTANGO_SENTRY_SEND_PII": value})
    assert settings.sentry_send_pii is expected


@pytest.mark.parametrize("value", ["maybe", "2", "y", "enabled"])
def test_unreadable_bool_is_refused(value: str) -> None:
    """A value that is neither true nor false is refused rather than guessed."""
    for variable in ("TOTANGO_SENTRY_SEND_PII", "TOTANGO_ALLOW_INSECURE_GATEWAY"):
        assert config_error({variable: value}).variable == variable


def test_empty_optional_strings_mean_none() -> None:
    """Empty Sentry variables are unset, so an empty SENTRY_DSN never enables Sentry."""
    env = {"SENTRY_DSN": "", "SENTRY_ENVIRONMENT": "", "SENTRY_RELEASE": ""}
    settings = Settings.from_env(env)
    assert (settings.sentry_dsn, settings.sentry_environment, settings.sentry_release) == (
        None,
        None,
        None,
    )


def test_the_retry_policy_is_made_of_the_retry_settings() -> None:
    """Single events and batches decide retries with the policy the settings make."""
    settings = Settings.from_env(
        {
            "TOTANGO_MAX_RETRIES": "3",
            "TOTANGO_RETRY_BACKOFF_BASE": "2",
            "TOTANGO_RETRY_BACKOFF_MAX": "40",
            "TOTANGO_RETRY_AFTER_MAX": "50",
        }
    )
    assert settings.retry_policy == RetryPolicy(
        max_retries=3, backoff_base=2.0, backoff_max=40.0, retry_after_max=50.0
    )


@pytest.mark.parametrize(("value", "expected"), [(None, True), ("false", False), ("true", True)])
def test_task_events_setting_reaches_celery(value: str | None, expected: bool) -> None:
    """TOTANGO_TASK_EVENTS (on unless set false) is what the app gives Celery as
    ``worker_send_task_events``, the switch for the events Flower's task views read."""
    env = {} if value is None else {"TOTANGO_TASK_EVENTS": value}
    assert worker_config(Settings.from_env(env))["worker_send_task_events"] is expected


AMQP_2 = "amqp://guest:guest@127.0.0.1:5673//"


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        (f"{AMQP};{AMQP_2}", "rabbitmq"),
        (f"{AMQP};{AMQP_2};amqps://u:p@mq-2.example.com:5671//", "rabbitmq"),
        (f"{REDIS};redis://127.0.0.1:6380/0", "redis"),
    ],
)
def test_a_failover_list_of_one_kind_is_accepted_and_kept_whole(url: str, kind: str) -> None:
    """A ';'-separated failover list (kombu's syntax) of one broker kind is valid, has that
    kind, and reaches Celery whole, so that kombu can fail over along it."""
    settings = Settings.from_env({"TOTANGO_BROKER_URL": url})
    assert settings.broker_kind == kind
    assert settings.broker_url == url
    assert broker_kind(url) == kind


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (f"{AMQP};kafka://127.0.0.1", "failover entry 2 of 2 must be an amqp:// or redis:// URL"),
        (f"{AMQP};{AMQP_2};", "failover entry 3 of 3 is empty"),
        (f";{AMQP}", "failover entry 1 of 2 is empty"),
        (f"{AMQP}; {AMQP_2}", "failover entry 2 of 2 has white space around it"),
        (f"{AMQP};{REDIS}", "failover entry 2 of 2 is redis but entry 1 is rabbitmq"),
        (f"{REDIS};{AMQP_2};{AMQP}", "failover entry 2 of 3 is rabbitmq but entry 1 is redis"),
        (f"{AMQP};amqp://127.0.0.1:56x2//", "failover entry 2 of 2 is not a valid URL"),
        (f"{AMQP};redis://[::1", "failover entry 2 of 2 is not a valid URL"),
        ("filesystem://;filesystem://", "failover entry 1 of 2 is the embedded demo broker"),
    ],
)
def test_a_wrong_failover_entry_is_named_by_its_position(url: str, reason: str) -> None:
    """Each entry of a failover list is checked on its own; the error names the entry's
    1-based position and what is wrong with it (scheme, emptiness, spaces, mixed kinds)."""
    error = config_error({"TOTANGO_BROKER_URL": url})
    assert error.variable == "TOTANGO_BROKER_URL"
    assert error.reason.startswith(reason), error.reason


def test_a_single_url_with_a_bad_port_is_refused() -> None:
    """A port that is not a number is refused when the settings are read, not at connect."""
    assert config_error({"TOTANGO_BROKER_URL": "amqp://127.0.0.1:x//"}).reason == (
        "is not a valid URL"
    )


# --- the gateway URL: path, query, fragment ---------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kept"),
    [
        ("https://sdr.totango.com/pixel.gif/", "https://sdr.totango.com/pixel.gif"),
        ("https://sdr.totango.com/pixel.gif/?t=1", "https://sdr.totango.com/pixel.gif?t=1"),
        ("https://proxy.example/totango/pixel.gif", "https://proxy.example/totango/pixel.gif"),
        (
            "https://sdr.totango.com/pixel.gif?api-token=a%26b",
            "https://sdr.totango.com/pixel.gif?api-token=a%26b",
        ),
    ],
    ids=["trailing-slash", "trailing-slash-query", "behind-a-path", "query"],
)
def test_a_gateway_url_ending_in_pixel_gif_is_kept_with_its_query(url: str, kept: str) -> None:
    """``pixel.gif`` and Totango's ``pixel.gif/`` are accepted; the worker sends
    ``pixel.gif``; a query of the URL's own is kept (it is merged into every call)."""
    assert Settings.from_env({"TOTANGO_GATEWAY_URL": url}).gateway_url == kept


@pytest.mark.parametrize(
    "url",
    [
        "https://sdr.totango.com/",
        "https://sdr.totango.com",
        "https://sdr.totango.com/pixel.png",
        "https://sdr.totango.com/pixel.gif/x",
        "https://sdr.totango.com/pixel.gif#top",
        "https://sdr.totango.com/pixel.gif?sdr_s=SP-1-2",
        "https://sdr.totango.com/pixel.gif?t=1&SDR_o.plan=x",
        "https://sdr.totango.com/pixel.gif?enableWriteback=true",
        "https://sdr.totango.com:99999/pixel.gif",
    ],
    ids=[
        "root",
        "no-path",
        "other-file",
        "below-pixel",
        "fragment",
        "event-parameter",
        "event-parameter-any-case",
        "writeback",
        "port-out-of-range",
    ],
)
def test_a_gateway_url_that_is_not_pixel_gif_or_carries_event_parameters_is_refused(
    url: str,
) -> None:
    """The path must be pixel.gif, with no fragment, and the URL's query must not carry an
    event's parameters (they would be sent twice): a ConfigError at start, not lost events."""
    assert config_error({"TOTANGO_GATEWAY_URL": url}).variable == "TOTANGO_GATEWAY_URL"


# --- the service map ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            "SP-1-2=us,SP-3-4=eu",
            {"SP-1-2": REGION_GATEWAYS["us"], "SP-3-4": REGION_GATEWAYS["eu"]},
        ),
        (" SP-1-2 = EU ", {"SP-1-2": REGION_GATEWAYS["eu"]}),
        (
            "SP-1-2=http://127.0.0.1:9/pixel.gif/,SP-3-4=https://gw.example/pixel.gif?t=a=b",
            {
                "SP-1-2": "http://127.0.0.1:9/pixel.gif",
                "SP-3-4": "https://gw.example/pixel.gif?t=a=b",
            },
        ),
    ],
    ids=["regions", "spaces-and-case", "urls"],
)
def test_the_service_map_maps_each_service_to_a_gateway_url(
    raw: str, expected: dict[str, str]
) -> None:
    """TOTANGO_SERVICE_MAP takes a region name or a gateway URL (checked like
    TOTANGO_GATEWAY_URL) for each service id."""
    settings = Settings.from_env({"TOTANGO_SERVICE_MAP": raw})
    assert dict(settings.service_map or ()) == expected
    assert settings.service_ids == frozenset(expected)
    assert {sid: settings.gateway_for(sid) for sid in expected} == expected
    assert set(settings.gateway_urls) == set(expected.values())


def test_without_a_service_map_every_service_goes_to_the_gateway_url() -> None:
    """No map: no restriction on service ids, one gateway."""
    settings = Settings.from_env({"TOTANGO_REGION": "eu"})
    assert (settings.service_map, settings.service_ids) == (None, None)
    assert settings.gateway_for("SP-9-9") == REGION_GATEWAYS["eu"]
    assert settings.gateway_urls == (REGION_GATEWAYS["eu"],)


@pytest.mark.parametrize(
    "env",
    [
        {"TOTANGO_SERVICE_MAP": "SP-1-2"},
        {"TOTANGO_SERVICE_MAP": "SP-1-2=us,"},
        {"TOTANGO_SERVICE_MAP": "=us"},
        {"TOTANGO_SERVICE_MAP": "sp-1-2=us"},
        {"TOTANGO_SERVICE_MAP": "SP-1-2=us,SP-1-2=eu"},
        {"TOTANGO_SERVICE_MAP": "SP-1-2=asia"},
        {"TOTANGO_SERVICE_MAP": "SP-1-2=https://gw.example/other.gif"},
        {"TOTANGO_SERVICE_MAP": "SP-1-2=http://gw.example/pixel.gif"},
        {"TOTANGO_SERVICE_MAP": "SP-1-2=us", "TOTANGO_GATEWAY_URL": "https://gw.example/pixel.gif"},
        {"TOTANGO_SERVICE_MAP": "SP-1-2=us", "TOTANGO_SERVICE_ID": "SP-3-4"},
    ],
    ids=[
        "no-target",
        "empty-entry",
        "no-service",
        "bad-service-id",
        "twice",
        "unknown-region",
        "not-pixel-gif",
        "plain-http",
        "gateway-url-too",
        "default-service-not-mapped",
    ],
)
def test_a_bad_service_map_stops_the_worker_at_start_naming_the_variable(
    env: dict[str, str],
) -> None:
    """Every mistake in the map is a ConfigError naming TOTANGO_SERVICE_MAP, so that no event
    goes to a gateway that is not its service's."""
    assert config_error(env).variable == "TOTANGO_SERVICE_MAP"
