"""Pure logic: backoff, URL parsing and masking, settings and registration validation."""

from __future__ import annotations

import json
import logging
import math
import random
from datetime import UTC, datetime
from email.utils import format_datetime
from urllib.parse import quote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from steadyrabbit import App, ConfigurationError, RetryPolicy, Settings, mask_url, parse_url
from steadyrabbit._backoff import backoff_delay
from steadyrabbit._headers import attempts, without_ours
from steadyrabbit._ops.relay import retry_after
from steadyrabbit._retry import ladder_ms
from steadyrabbit._url import scrub, url_secrets


@given(
    attempt=st.integers(min_value=0, max_value=10_000),
    base=st.floats(min_value=0.001, max_value=10),
    extra=st.floats(min_value=0, max_value=1000),
    draw=st.floats(min_value=0, max_value=0.999999),
)
def test_backoff_is_bounded_by_half_and_whole_ceiling(
    attempt: int, base: float, extra: float, draw: float
) -> None:
    cap = base + extra
    delay = backoff_delay(attempt, base=base, cap=cap, random=lambda: draw)
    ceiling = min(cap, base * 2.0**attempt) if attempt < 64 else cap
    assert ceiling / 2 <= delay <= ceiling
    assert delay <= cap


@given(attempt=st.integers(min_value=0, max_value=50))
def test_backoff_floor_and_ceiling_never_shrink(attempt: int) -> None:
    for draw in (0.0, 0.999999):
        now = backoff_delay(attempt, base=0.5, cap=30, random=lambda: draw)  # noqa: B023
        later = backoff_delay(attempt + 1, base=0.5, cap=30, random=lambda: draw)  # noqa: B023
        assert later >= now


def test_backoff_jitter_spreads_clients() -> None:
    rng = random.Random(7)
    delays = {round(backoff_delay(5, base=0.5, cap=30, random=rng.random), 3) for _ in range(50)}
    assert len(delays) > 40


def test_backoff_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(-1, base=1, cap=2, random=random.random)
    with pytest.raises(ValueError, match="base"):
        backoff_delay(0, base=2, cap=1, random=random.random)


def test_parse_url_full() -> None:
    address = parse_url("amqps://alice:s%40cret@rabbit.example:5999/prod%2Fa?heartbeat=10")
    assert (address.scheme, address.host, address.port) == ("amqps", "rabbit.example", 5999)
    assert (address.username, address.password, address.vhost) == ("alice", "s@cret", "prod/a")
    assert address.heartbeat == 10
    assert address.tls
    assert "s@cret" not in repr(address)
    assert "s@cret" not in str(address)
    assert address.display == "amqps://alice:****@rabbit.example:5999/prod/a"


def test_parse_url_defaults() -> None:
    address = parse_url("amqp://localhost")
    assert (address.port, address.vhost, address.username, address.password) == (
        5672,
        "/",
        "guest",
        "guest",
    )
    assert parse_url("amqp://h/%2F").vhost == "/"
    assert parse_url("amqps://h").port == 5671


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://guest:pw@localhost/", "scheme must be amqp"),
        ("localhost:5672", "scheme must be amqp"),
        ("amqp://", "names no host"),
        ("amqp://guest:pw@localhost:notaport/", "malformed broker URL"),
        ("amqp://guest:pw@localhost:99999/", "malformed broker URL"),
        ("amqp://localhost/?heartbeat=abc", "heartbeat must be a number"),
        ("amqp://localhost/?frobnicate=1", "unknown query parameter 'frobnicate'"),
    ],
)
def test_parse_url_errors_are_one_readable_line(url: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem) as info:
        parse_url(url)
    message = str(info.value)
    assert "\n" not in message
    assert "pw" not in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("amqp://u:p@h:1/v", "amqp://u:****@h:1/v"),
        ("x amqps://u:p%40q@h/ y amqp://a:b@c", "x amqps://u:****@h/ y amqp://a:****@c"),
        ("https://bob:hunter2@api.example/x", "https://bob:****@api.example/x"),
        ("amqp://u:p@ss@h/v", "amqp://u:****@h/v"),
        ("amqp://h:5672/v", "amqp://h:5672/v"),
    ],
)
def test_mask_url(text: str, expected: str) -> None:
    assert mask_url(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "POST http://127.0.0.1:8080/hook?token=abc&user=bob answered 500",
            "POST http://127.0.0.1:8080/hook?token=****&user=**** answered 500",
        ),
        ("https://api.example/x?apikey", "https://api.example/x?****"),
        ("https://api.example/x?a=&b=1", "https://api.example/x?a=&b=****"),
        (
            "https://app.example/#access_token=abc&x=1",
            "https://app.example/#access_token=****&x=****",
        ),
        ("https://ghp_token@github.com/org/repo", "https://****@github.com/org/repo"),
        ("http://u:p@h/x?t=a@b", "http://u:****"),  # the password may run to the last "@"
        ("http://h:8080/x?email=a@b.example&token=s", "http://h:****&token=****"),
        ("http://a@b:pw@h/", "http://****@b:****@h/"),
        ("target 'http://h/?t=x y' is bad", "target 'http://h/?t=****' is bad"),
        ('{"url": "http://h/?t=x\\"y"}', '{"url": "http://h/?t=****"}'),
        ("amqp://u:p@h/v?heartbeat=10", "amqp://u:****@h/v?heartbeat=****"),
    ],
)
def test_mask_url_hides_query_values_fragments_and_tokens(text: str, expected: str) -> None:
    assert mask_url(text) == expected
    assert mask_url(expected) == expected


# -- mask_url over generated URLs: each secret is percent-encoded but for a random set of the
# characters its place allows raw (RFC 3986), so the masked URL has one exact expected form.

_VISIBLE = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8)
_PASSWORD_RAW = "!$&'()*+,;=:"
_USER_ONLY_RAW = "!$&'()*+,;="
_VALUE_RAW = "!$'()*+,;=:@/?"


# Any text, with the characters that delimit URL parts and quoted strings drawn often.
_DELIMITERS = st.sampled_from("@:/?#&=%+ '\"\\")
_SECRET_TEXT = st.text(st.characters(codec="utf-8") | _DELIMITERS, min_size=1)


def _encoded(raw_allowed: str) -> st.SearchStrategy[tuple[str, str]]:
    """(secret, its spelling in the URL)."""
    return st.tuples(_SECRET_TEXT, st.sets(st.sampled_from(raw_allowed))).map(
        lambda drawn: (drawn[0], quote(drawn[0], safe="".join(drawn[1])))
    )


@st.composite
def _urls_with_secrets(draw: st.DrawFn) -> tuple[str, str, list[str]]:
    """(URL, the URL as mask_url must show it, the secrets in it)."""
    secrets: list[str] = []
    scheme = draw(st.sampled_from(["http", "https", "amqp", "amqps", "smtp"]))
    userinfo = shown_userinfo = ""
    kind = draw(st.sampled_from(["none", "password", "user-only"]))
    if kind == "password":
        user = draw(_VISIBLE)
        secret, spelled = draw(_encoded(_PASSWORD_RAW))
        userinfo, shown_userinfo = f"{user}:{spelled}@", f"{user}:****@"
        secrets.append(secret)
    elif kind == "user-only":
        secret, spelled = draw(_encoded(_USER_ONLY_RAW))
        userinfo, shown_userinfo = f"{spelled}@", "****@"
        secrets.append(secret)
    host = draw(_VISIBLE)
    port = draw(st.none() | st.integers(1, 65535))
    authority = host + ("" if port is None else f":{port}")
    path = "".join(draw(st.lists(_VISIBLE.map(lambda part: f"/{part}"), max_size=3)))
    names = draw(st.lists(_VISIBLE, max_size=4))
    # After a ":" (a password, a port), a raw "@" later in the URL is read as the end of a
    # password: all up to it is hidden (see the examples above).
    value_raw = _VALUE_RAW if kind != "password" and port is None else _VALUE_RAW.replace("@", "")
    items, shown_items = [], []
    for name in names:
        secret, spelled = draw(_encoded(value_raw))
        items.append(f"{name}={spelled}")
        shown_items.append(f"{name}=****")
        secrets.append(secret)
    query = f"?{'&'.join(items)}" if items else ""
    shown_query = f"?{'&'.join(shown_items)}" if items else ""
    fragment = shown_fragment = ""
    if draw(st.booleans()):
        # Without "=", a fragment is one item: a raw "=" would make part of it a name.
        secret, spelled = draw(_encoded(value_raw.replace("=", "")))
        fragment = f"#{spelled}"
        shown_fragment = "" if items else "#****"  # after a query, it is part of the last value
        secrets.append(secret)
    url = f"{scheme}://{userinfo}{authority}{path}{query}{fragment}"
    shown = f"{scheme}://{shown_userinfo}{authority}{path}{shown_query}{shown_fragment}"
    return url, shown, secrets


@settings(deadline=None)  # the check is heavy for a busy 2-core machine; time is not the point
@given(case=_urls_with_secrets())
def test_mask_url_shows_every_generated_url_without_its_secrets(
    case: tuple[str, str, list[str]],
) -> None:
    url, shown, secrets = case
    assert mask_url(url) == shown
    assert mask_url(shown) == shown
    assert mask_url(f"POST {url} failed:\n{url}") == f"POST {shown} failed:\n{shown}"
    quote_mark = '"' if "'" in url else "'"
    assert mask_url(f"url={url!r}") == f"url={quote_mark}{shown}{quote_mark}"
    assert mask_url(json.dumps({"url": url})) == json.dumps({"url": shown})
    # Quoted apart from the URL (an exception, a response body): scrub() finds them too.
    found = url_secrets(url)
    for secret in secrets:
        if len(secret) >= 4:
            assert secret in found
            assert secret not in scrub(f"refused {secret}: see {url}", found)


# White space ends a URL in text, so a raw secret has none.
_RAW_SECRET = st.text(st.characters(codec="utf-8") | _DELIMITERS, min_size=4).filter(
    lambda text: not any(c.isspace() for c in text)
)


@given(
    password=_RAW_SECRET,
    token=_RAW_SECRET,
    value=_RAW_SECRET,
    fragment=_RAW_SECRET,
    quoted=st.booleans(),
)
def test_mask_url_never_shows_a_secret_written_raw(
    password: str, token: str, value: str, fragment: str, quoted: bool
) -> None:
    """Raw delimiters ("@", "?", "#", "&") in secrets can change where a part ends; whichever
    way it is read, no secret is shown whole. (A raw ":", "/", "?" or "#" in a user-only token
    makes part of it a user name or a host, and "=" in a query without names makes part of it
    a parameter name: these are shown, as any HTTP client would read them so.)"""
    for char in ":/?#":
        token = token.replace(char, quote(char, safe=""))
    bare = value.replace("=", "%3D")
    urls = [
        f"https://user:{password}@host.example:8443/hook?token={value}#{fragment}",
        f"http://{token}@host.example/hook?{bare}",
    ]
    # What the masked texts show at most: a secret that is part of it proves nothing.
    visible = (
        "'\"error: https://user:****@host.example:8443/hook?token=****#**** (again)'\""
        "error: http://****@host.example/hook?**** (again)"
    )
    for url in urls:
        text = f"error: {url!r}" if quoted else f"error: {url} (again)"
        masked = mask_url(text)
        for secret in (password, token, value, bare, fragment):
            if secret in url and secret not in visible:
                assert secret not in masked, (text, masked)


def test_settings_validate() -> None:
    assert Settings().addresses[0].port == 5672
    assert Settings(urls=("amqp://a", "amqp://b")).addresses[1].host == "b"
    with pytest.raises(ConfigurationError, match="no broker URL"):
        Settings(urls=())
    with pytest.raises(ConfigurationError, match="heartbeat"):
        Settings(heartbeat=-1)
    with pytest.raises(ConfigurationError, match="scheme"):
        Settings(urls=("redis://localhost",))


def _handler(message: object) -> None:
    pass


def test_prefetch_defaults_to_concurrency_and_is_never_unlimited() -> None:
    app = App()
    spec = app.add_consumer(_handler, "q", concurrency=3)
    assert spec.prefetch == 3
    with pytest.raises(ConfigurationError, match="unlimited"):
        App().add_consumer(_handler, "q", prefetch=0)
    with pytest.raises(ConfigurationError, match="between the concurrency"):
        App().add_consumer(_handler, "q", concurrency=4, prefetch=2)
    with pytest.raises(ConfigurationError, match="already has a handler"):
        app.add_consumer(_handler, "q")


def test_registration_validation() -> None:
    with pytest.raises(ConfigurationError, match="needs a routing key"):
        App().add_consumer(_handler, "q", exchange="x")
    with pytest.raises(ConfigurationError, match="need an exchange"):
        App().add_consumer(_handler, "q", routing_key="k")
    with pytest.raises(ConfigurationError, match="unknown decoder"):
        App().add_consumer(_handler, "q", decode="yaml")
    with pytest.raises(ConfigurationError, match="1 to 250 bytes"):
        App().add_consumer(_handler, "")


def test_sync_handlers_are_made_awaitable_once_at_registration() -> None:
    async def handle_async(message: object) -> None:
        pass

    app = App()
    sync_spec = app.add_consumer(_handler, "a")
    async_spec = app.add_consumer(handle_async, "b")
    assert sync_spec.threaded is not None
    assert async_spec.threaded is None
    assert async_spec.function is handle_async  # its handler: wrapped once (SystemExit)


# -- retry policy ---------------------------------------------------------------------------

@given(
    retry=st.integers(min_value=1, max_value=200),
    base=st.floats(min_value=0.01, max_value=60),
    extra=st.floats(min_value=0, max_value=3600),
    draw=st.floats(min_value=0, max_value=0.999999),
)
def test_exponential_retry_delays_stay_within_the_jittered_ceiling(
    retry: int, base: float, extra: float, draw: float
) -> None:
    policy = RetryPolicy(base=base, cap=base + extra)
    delay = policy.delay(retry, lambda: draw)
    ceiling = min(policy.cap, base * 2.0 ** min(retry - 1, 64))
    assert ceiling / 2 <= delay <= ceiling <= policy.cap


def test_explicit_delays_are_used_exactly_and_the_last_repeats() -> None:
    policy = RetryPolicy(delays=(5, 30, 120))
    assert [policy.delay(n, lambda: 0.5) for n in (1, 2, 3, 4, 9)] == [5, 30, 120, 120, 120]
    assert [policy.bucket_ms(d) for d in (5, 30, 120)] == [5000, 30000, 120000]
    no_jitter = RetryPolicy(base=2, cap=10, jitter=False)
    assert [no_jitter.delay(n, lambda: 0.9) for n in (1, 2, 3, 4)] == [2, 4, 8, 10]


@given(delay=st.floats(min_value=0.01, max_value=10 * 86400))
def test_other_delays_round_to_a_small_ladder_of_retry_queues(delay: float) -> None:
    bucket = ladder_ms(delay) / 1000
    assert 0.7 * delay <= bucket <= 1.3 * delay + 0.005
    mantissa = bucket / 10 ** math.floor(math.log10(bucket))
    assert round(mantissa, 6) in {1.0, 1.5, 2.0, 3.0, 5.0, 7.0}


def test_a_day_of_jittered_delays_needs_few_retry_queues() -> None:
    policy = RetryPolicy(base=0.5, cap=86400)
    rng = random.Random(1)
    delays = [policy.delay(n, rng.random) for n in range(1, 40) for _ in range(20)]
    buckets = {policy.bucket_ms(delay) for delay in delays}
    assert len(buckets) <= 40


def test_retry_policy_validation() -> None:
    with pytest.raises(ConfigurationError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ConfigurationError, match="delays"):
        RetryPolicy(delays=())
    with pytest.raises(ConfigurationError, match="delays"):
        RetryPolicy(delays=(1, -2))
    with pytest.raises(ConfigurationError, match="exception types"):
        RetryPolicy(permanent=("ValueError",))  # type: ignore[arg-type]
    assert RetryPolicy(permanent=(KeyError,)).is_permanent(KeyError("x"))
    assert not RetryPolicy(permanent=(KeyError,)).is_permanent(ValueError("x"))


def test_retry_after_header() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after("120", now=now) == 120
    assert retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now=now) == 30
    assert retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0
    assert retry_after("soon", now=now) is None
    assert retry_after(None) is None
    assert retry_after("99999999") == 86400


@pytest.mark.parametrize(
    "value", ["²", "\u0661\u0662", "\uff11\uff12", "12.5", "-1", "+3", "1e3", "0x10", "1 2", ""]
)
def test_retry_after_takes_only_ascii_digits_as_delta_seconds(value: str) -> None:
    # RFC 9110: delta-seconds = 1*DIGIT, and DIGIT is ASCII; str.isdigit() also takes "²".
    assert retry_after(value) is None


@given(value=st.text() | st.from_regex(r"\A\s*[0-9]{1,12}\s*\Z") | st.builds(
    format_datetime,
    st.datetimes(timezones=st.just(UTC)),
    usegmt=st.just(True),
))
@example(value="²")
@example(value="9" * 5000)
@example(value="Fri, 31 Dec 9999 23:59:59 -2359")
@example(value="Mon, 01 Jan 0001 00:00:00 +2359")
def test_retry_after_never_raises_and_stays_within_a_day(value: str) -> None:
    seconds = retry_after(value)
    assert seconds is None or 0.0 <= seconds <= 86_400.0


def test_attempt_header_parsing_and_stripping() -> None:
    assert attempts(None) == 0
    assert attempts({"x-steadyrabbit-attempts": 3}) == 3
    assert attempts({"x-steadyrabbit-attempts": "3"}) == 0
    assert attempts({"x-steadyrabbit-attempts": True}) == 0
    headers = {"x-steadyrabbit-reason": "r", "x-death": [], "tenant": "acme"}
    assert without_ours(headers) == {"tenant": "acme"}


@pytest.mark.parametrize("log_format", ["plain", "json"])
def test_a_logged_traceback_masks_the_urls_it_quotes(
    log_format: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """A handler's exception often quotes the URL it failed on; the plain log format printed
    tracebacks unmasked (the JSON one masked them)."""
    from steadyrabbit._cli.logs import configure_logging

    def call_the_service() -> None:
        raise RuntimeError("GET https://svc:Pa55-w0rd@api.example/x?token=tok-SECRET-9 failed")

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    # The CLI's logging also quiets pika and httpx: give every logger its level back after.
    quieted = {name: logging.getLogger(name).level for name in ("pika", "httpx", "httpcore")}
    try:
        configure_logging("info", log_format)
        try:
            call_the_service()
        except RuntimeError:
            logging.getLogger("steadyrabbit").warning("handler failed", exc_info=True)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, quiet in quieted.items():
            logging.getLogger(name).setLevel(quiet)
    err = capfd.readouterr().err
    assert "RuntimeError" in err
    assert "Pa55-w0rd" not in err
    assert "tok-SECRET-9" not in err


def test_long_runs_are_protected_by_version_and_budget() -> None:
    """The version-dependent choice, as pure logic: the consumer argument only from 3.12 and
    only with a budget; the hand-off always (4.0.5 ignores the argument)."""
    from steadyrabbit._topology import consumer_timeout_argument, long_run_protection

    assert not consumer_timeout_argument((3, 10, 8), 60)
    assert not consumer_timeout_argument((3, 11, 99), 60)
    assert consumer_timeout_argument((3, 12, 0), 60)
    assert consumer_timeout_argument((4, 0, 5), 60)
    assert not consumer_timeout_argument((4, 0, 5), None)
    assert not consumer_timeout_argument((), 60)
    assert "RabbitMQ 3.10.8 has no per-consumer timeout" in long_run_protection((3, 10, 8), 60)
    assert "x-consumer-timeout 60000 ms" in long_run_protection((4, 0, 5), 60)
    assert "give the consumer max_duration" in long_run_protection((4, 0, 5), None)
    for version in ((3, 10, 8), (3, 12, 0), (4, 0, 5)):
        for budget in (None, 60.0):
            assert "handed off" in long_run_protection(version, budget)
