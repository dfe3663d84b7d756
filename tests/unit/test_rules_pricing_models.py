"""Rules keys of the pricing models: price (a function), bundle, single_use, pass. Every
mistake is one RulesError naming the file and the line of the offending key or value."""

import dataclasses
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from l402proxy.cli import EXIT_BAD_INPUT, main
from l402proxy.rules import (
    MAX_BUNDLE_SIZE,
    Bundle,
    PassSpec,
    PriceRef,
    Rule,
    RulesError,
    load_rules,
    parse_rules,
    parse_size,
    rule_warnings,
)
from tests.unit.test_rules import MINIMAL, error, one, parse, yaml_text

# A service whose file lines are: 1 services, 2 - name, 3 match, then what a case adds (line 4).
HEAD = "services:\n  - name: a\n    match: {path: /a}\n"

# ---- price: a function ---------------------------------------------------------------------


@pytest.fixture
def module_dir(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Writes a module next to the rules file (tmp_path) under a name no other test uses (Python
    imports a module once per process) and returns that name; forgotten after the test."""
    names: list[str] = []

    def write(code: str) -> str:
        name = f"price_{uuid.uuid4().hex[:12]}"
        (tmp_path / f"{name}.py").write_text(yaml_text(code))
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def rules_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml_text(text))
    return path


def load_error(tmp_path: Path, text: str) -> RulesError:
    path = rules_file(tmp_path, text)
    before = list(sys.path)
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert sys.path == before  # the rules directory is taken off again, failure or not
    assert info.value.source == str(path)
    return info.value


def test_price_imports_a_function_next_to_the_rules_file(
    tmp_path: Path, module_dir: Callable[[str], str]
) -> None:
    module = module_dir(
        """
        def quote(request):
            return 7
        """
    )
    path = rules_file(
        tmp_path,
        f"""
        services:
          - name: api
            match: {{path: /api/*}}
            price: python:{module}:quote
        """,
    )
    before = list(sys.path)
    rule = load_rules(path).rules[0]
    assert sys.path == before
    assert rule.price_sat == 0  # the fixed price stays 0: nothing fixed is sold
    assert rule.price is not None
    assert rule.price.text == f"python:{module}:quote"
    assert rule.price.function.__module__ == module
    assert rule.price.function(None) == 7
    assert (rule.price.source, rule.price.line) == (str(path), 4)
    assert rule.price.where == f"{path}:4"
    assert (rule.bundle, rule.single_use, rule.pass_) == (None, False, None)
    assert rule_warnings(load_rules(path)) == []


def test_price_from_a_package_and_a_dotted_attribute(tmp_path: Path) -> None:
    package = f"pricing_{uuid.uuid4().hex[:12]}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "api.py").write_text(
        "class Pricer:\n    @staticmethod\n    async def quote(request):\n        return 3\n"
    )
    try:
        rule = load_rules(
            rules_file(
                tmp_path,
                f"""
                services:
                  - name: api
                    match: {{path: /api/*}}
                    mode: upgrade
                    price: ' python:{package}.api:Pricer.quote '
                """,
            )
        ).rules[0]
    finally:
        for name in [name for name in sys.modules if name.startswith(package)]:
            del sys.modules[name]
    assert rule.price is not None and rule.price.text == f"python:{package}.api:Pricer.quote"
    assert rule.price.function.__qualname__ == "Pricer.quote"


def test_price_from_sys_path_without_a_directory() -> None:
    # parse_rules without a directory imports from sys.path as it is.
    rule = one(HEAD + "    price: python:os.path:join\n")
    assert rule.price is not None and rule.price.function.__name__ == "join"
    assert rule.price.where == "rules/test.yaml:4"


PRICE_ERRORS = [
    pytest.param(
        "    price: 21\n",
        "price must be a reference like 'python:mypricing:quote', got 21 "
        "(a fixed price goes in price_sat)",
        id="a-number",
    ),
    pytest.param(
        "    price: mypricing:quote\n",
        "price must be 'python:<module>:<function>' (e.g. 'python:mypricing:quote'), got "
        "'mypricing:quote'",
        id="no-scheme",
    ),
    pytest.param("    price: 'python:mypricing'\n", "price must be 'python:", id="no-function"),
    pytest.param("    price: 'python:1bad:quote'\n", "price must be 'python:", id="bad-module"),
    pytest.param("    price: 'python:.rel:quote'\n", "price must be 'python:", id="relative"),
    pytest.param("    price: 'https://x/price'\n", "price must be 'python:", id="url"),
    pytest.param("    price: [python:a:b]\n", "got a list", id="a-list"),
    pytest.param(
        "    price: 'python:no_such_module_l402:quote'\n",
        "price python:no_such_module_l402:quote: cannot import module 'no_such_module_l402': "
        "ModuleNotFoundError: No module named 'no_such_module_l402'",
        id="missing-module",
    ),
    pytest.param(
        "    price: 'python:os.path:jion'\n",
        "price python:os.path:jion: 'os.path' has no attribute 'jion' (did you mean 'join'?)",
        id="missing-function",
    ),
    pytest.param(
        "    price: 'python:os:sep'\n",
        "price python:os:sep: 'os:sep' is not callable (type str)",
        id="not-callable",
    ),
    pytest.param(
        "    price: 'python:os:getpid'\n",
        "price python:os:getpid: 'os:getpid' cannot be called with one argument (the PriceRequest)",
        id="takes-no-argument",
    ),
    pytest.param(
        "    price: 'python:os.path:commonprefix.missing'\n",
        "'os.path:commonprefix' has no attribute 'missing'",
        id="missing-nested-attribute",
    ),
]


@pytest.mark.parametrize(("line", "message"), PRICE_ERRORS)
def test_price_errors_name_the_line_and_the_reference(line: str, message: str) -> None:
    before = list(sys.path)
    exc = error(HEAD + line)
    assert sys.path == before
    assert str(exc).startswith("rules/test.yaml:4: service 'a': "), str(exc)
    assert message in str(exc)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        pytest.param("raise ValueError('no\\nconfig')", "ValueError: no\\nconfig", id="raises"),
        pytest.param("def quote(request:\n", "SyntaxError: ", id="syntax-error"),
        pytest.param("import sys\nsys.exit(3)", "SystemExit: 3", id="exits"),
        pytest.param("import no_such_dependency_l402", "No module named 'no_such_dep", id="dep"),
        pytest.param("quote = 5", "is not callable (type int)", id="not-callable"),
        pytest.param("def quote(a, b):\n    return 1", "cannot be called with one arg", id="arity"),
        pytest.param("def quote():\n    return 1", "cannot be called with one arg", id="no-args"),
        pytest.param("def qoute(request):\n    return 1", "(did you mean 'qoute'?)", id="typo"),
    ],
)
def test_a_broken_price_module_is_one_line_naming_the_rules_line(
    tmp_path: Path, module_dir: Callable[[str], str], code: str, message: str
) -> None:
    module = module_dir(code + "\n")
    exc = load_error(
        tmp_path,
        f"""
        services:
          - name: ok
            match: {{path: /ok}}
            price_sat: 1
          - name: api
            match: {{path: /api/*}}
            price: python:{module}:quote
        """,
    )
    assert exc.line == 7 and exc.service == "api", str(exc)
    assert f"price python:{module}:quote: " in str(exc)
    assert message in str(exc)
    assert str(exc).isprintable()


def test_a_module_next_to_the_rules_that_is_shadowed_is_refused(tmp_path: Path) -> None:
    # `json` is imported already (and `time` is built into Python): a json.py next to the rules
    # would silently not be the code that prices.
    (tmp_path / "json.py").write_text("def quote(request):\n    return 1\n")
    (tmp_path / "time.py").write_text("def quote(request):\n    return 1\n")
    exc = load_error(
        tmp_path,
        """
        services:
          - name: api
            match: {path: /api/*}
            price: python:json:quote
        """,
    )
    assert exc.line == 4
    assert "module 'json' is already imported from " in str(exc)
    assert f"so {tmp_path / 'json.py'} next to the rules is not used; rename yours" in str(exc)
    exc = load_error(
        tmp_path,
        """
        services:
          - name: api
            match: {path: /api/*}
            price: python:time:quote
        """,
    )
    assert "module 'time' is built into Python" in str(exc)


def test_a_module_imported_from_the_rules_directory_before_is_reused(
    tmp_path: Path, module_dir: Callable[[str], str]
) -> None:
    # A reload of the same file finds the module imported already: that is no shadowing.
    module = module_dir("def quote(request):\n    return 2\n")
    path = rules_file(
        tmp_path,
        f"services:\n  - name: a\n    match: {{path: /a}}\n    price: python:{module}:quote\n",
    )
    first = load_rules(path).rules[0]
    again = load_rules(path).rules[0]
    assert first.price is not None and again.price is not None
    assert first.price.function is again.price.function
    assert first == again and hash(first) == hash(again)


def test_rules_check_imports_the_price_function(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, module_dir: Callable[[str], str]
) -> None:
    module = module_dir("def quote(request):\n    return 2\n")
    good = rules_file(
        tmp_path,
        f"services:\n  - name: a\n    match: {{path: /a}}\n    price: python:{module}:quote\n",
    )
    assert main(["rules", "check", str(good)]) == 0
    capsys.readouterr()
    good.write_text(good.read_text().replace(":quote", ":qoute"))
    assert main(["rules", "check", str(good)]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"l402proxy: {good}:4: service 'a': price python:")
    assert "has no attribute 'qoute' (did you mean 'quote'?)" in captured.err


def test_price_and_price_sat_together_are_refused_at_the_later_line() -> None:
    exc = error(HEAD + "    price_sat: 5\n    price: python:os.path:join\n")
    assert exc.line == 5
    assert "price and price_sat are both set (price_sat on line 4): give price_sat" in str(exc)
    exc = error(HEAD + "    price: python:os.path:join\n    price_sat: 5\n")
    assert exc.line == 5 and "are both set (price on line 4)" in str(exc)
    # A null price_sat (say, over one merged in from an anchor) is no price_sat.
    rule = one(HEAD + "    price_sat: null\n    price: python:os.path:join\n")
    assert rule.price is not None and rule.price_sat == 0


def test_a_priced_service_needs_price_or_price_sat() -> None:
    exc = error(HEAD)
    assert exc.line == 2
    assert "missing 'price_sat' (price in satoshis; required for mode paywall) or 'price' " in (
        str(exc)
    )


def test_a_null_price_is_no_price() -> None:
    rule = one(HEAD + "    price:\n    price_sat: 3\n")
    assert (rule.price, rule.price_sat) == (None, 3)


# ---- bundle and single_use ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "bundle"),
    [
        ("{requests: 100}", Bundle("requests", 100, None)),
        ("{bytes: 500MB}", Bundle("bytes", 500_000_000, None)),
        ("{bytes: 1.5GB}", Bundle("bytes", 1_500_000_000, None)),
        ("{bytes: 10KiB}", Bundle("bytes", 10_240, None)),
        ("{bytes: 4096}", Bundle("bytes", 4096, None)),
        ("{units: 10000, usage_header: X-Usage}", Bundle("units", 10_000, "X-Usage")),
        ("{requests: 1, bytes: null}", Bundle("requests", 1, None)),
        (f"{{requests: {MAX_BUNDLE_SIZE}}}", Bundle("requests", MAX_BUNDLE_SIZE, None)),
    ],
)
def test_bundle(text: str, bundle: Bundle) -> None:
    rule = one(MINIMAL + f"    bundle: {text}\n")
    assert rule.bundle == bundle
    assert rule.single_use is False
    assert rule.price_sat == 21


def test_single_use_is_a_bundle_of_one_request() -> None:
    rule = one(MINIMAL + "    single_use: true\n")
    assert rule.single_use is True
    assert rule.bundle == Bundle("requests", 1, None)
    assert one(MINIMAL + "    single_use: false\n").bundle is None
    # false says nothing: a bundle next to it is fine.
    assert one(MINIMAL + "    single_use: false\n    bundle: {requests: 5}\n").bundle == Bundle(
        "requests", 5, None
    )


def test_the_pricing_keys_work_in_upgrade_mode_and_together() -> None:
    rule = one(
        """
        services:
          - name: api
            match: {path: /api/*}
            mode: upgrade
            price: python:os.path:basename
            single_use: true
            pass: {name: day, services: [api]}
        """
    )
    assert rule.mode == "upgrade"
    assert rule.price is not None and rule.bundle == Bundle("requests", 1, None)
    assert rule.pass_ == PassSpec("day", ("api",), 3600)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (1, 1),
        ("1", 1),
        ("1000B", 1000),
        ("1000 b", 1000),
        ("500MB", 500 * 10**6),
        ("500mb", 500 * 10**6),
        ("1.5GB", 1_500_000_000),
        ("2 MB", 2_000_000),
        (" 2MB ", 2_000_000),
        ("1.5kB", 1500),
        ("1.5KB", 1500),
        ("10KiB", 10_240),
        ("0.5KiB", 512),
        (".5MiB", 2**19),
        ("3MiB", 3 * 2**20),
        ("1GiB", 2**30),
        ("1TB", 10**12),
        ("1TiB", 2**40),
        ("1PB", 10**15),
        ("2.000MB", 2_000_000),
    ],
)
def test_parse_size(value: str | int, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "a size must be at least 1 byte, got 0"),
        (-5, "a size must be at least 1 byte, got -5"),
        ("0", "a size must be at least 1 byte, got '0'"),
        ("0MB", "a size must be at least 1 byte, got '0MB'"),
        ("-5MB", "a size must be at least 1 byte, got '-5MB'"),
        ("1.5B", "size '1.5B' is not a whole number of bytes"),
        ("1.0001kB", "is not a whole number of bytes"),
        ("0.3KiB", "is not a whole number of bytes"),
        ("500M", "size '500M': say 500MB (powers of 1000) or 500MiB (powers of 1024)"),
        ("10k", "say 10kB (powers of 1000) or 10KiB"),
        ("10Ki", "say 10KiB"),
        ("5XB", "unknown unit 'XB' in size '5XB'"),
        ("MB", "invalid size 'MB'"),
        ("1,000", "invalid size '1,000'"),
        ("1e9", "invalid size '1e9'"),
        ("", "invalid size ''"),
        ("9" * 40, "invalid size"),
        (1.5, "invalid size 1.5"),
        (True, "invalid size true"),
        (None, "invalid size null"),
    ],
)
def test_parse_size_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(value)  # type: ignore[arg-type]
    assert message in str(info.value)


BUNDLE_ERRORS = [
    pytest.param(
        "    bundle: 100\n",
        5,
        "bundle must be a mapping like {requests: 100}, {bytes: 500MB} or {units: 10000, "
        "usage_header: X-Usage}, got 100",
        id="not-a-mapping",
    ),
    pytest.param("    bundle: {}\n", 5, "bundle needs one of requests, bytes or units", id="empty"),
    pytest.param(
        "    bundle:\n      requests: 10\n      bytes: 1MB\n",
        7,
        "bundle has both 'requests' and 'bytes': a bundle counts one thing",
        id="two-units",
    ),
    pytest.param(
        "    bundle:\n      requets: 10\n",
        6,
        "unknown key 'requets' in bundle (did you mean 'requests'?)",
        id="typo",
    ),
    pytest.param(
        "    bundle:\n      requests: 1\n      valid_for: 1h\n",
        7,
        "unknown key 'valid_for' in bundle (it belongs to the service, not under 'bundle:')",
        id="service-key-inside",
    ),
    pytest.param(
        "    bundle: {requests: 0}\n",
        5,
        "bundle.requests must be a whole number from 1 to 1,000,000,000,000,000, got 0",
        id="zero-requests",
    ),
    pytest.param("    bundle: {requests: -3}\n", 5, "got -3", id="negative-requests"),
    pytest.param("    bundle: {requests: 1.5}\n", 5, "got 1.5", id="fraction-requests"),
    pytest.param("    bundle: {requests: true}\n", 5, "got true", id="bool-requests"),
    pytest.param("    bundle: {requests: '10'}\n", 5, "got '10'", id="string-requests"),
    pytest.param(
        f"    bundle: {{requests: {MAX_BUNDLE_SIZE + 1}}}\n", 5, "from 1 to", id="huge-requests"
    ),
    pytest.param(
        "    bundle:\n      bytes: 0\n",
        6,
        "bundle.bytes: a size must be at least 1 byte, got 0",
        id="zero-bytes",
    ),
    pytest.param(
        "    bundle: {bytes: -1MB}\n",
        5,
        "bundle.bytes: a size must be at least 1 byte",
        id="negative-bytes",
    ),
    pytest.param(
        "    bundle: {bytes: 1.5B}\n",
        5,
        "bundle.bytes: size '1.5B' is not a whole number",
        id="fraction-of-a-byte",
    ),
    pytest.param("    bundle: {bytes: 500M}\n", 5, "bundle.bytes: size '500M': say", id="500M"),
    pytest.param(
        "    bundle: {bytes: 2PB}\n",
        5,
        "bundle.bytes: 2,000,000,000,000,000 bytes is more than a petabyte (10^15)",
        id="huge-bytes",
    ),
    pytest.param(
        "    bundle:\n      units: 100\n",
        6,
        "bundle.units needs usage_header: the response header in which the origin reports",
        id="units-without-header",
    ),
    pytest.param(
        "    bundle:\n      requests: 10\n      usage_header: X-Usage\n",
        7,
        "bundle.usage_header goes with units only (a bundle of requests is counted by the "
        "paywall itself)",
        id="header-without-units",
    ),
    pytest.param(
        "    bundle:\n      units: 10\n      usage_header: 'X Usage'\n",
        7,
        "bundle.usage_header: 'X Usage' is not a valid header name",
        id="header-not-a-token",
    ),
    pytest.param(
        "    bundle:\n      units: 10\n      usage_header: 7\n",
        7,
        "bundle.usage_header must be a string, got 7",
        id="header-not-a-string",
    ),
    *[
        pytest.param(
            f"    bundle:\n      units: 10\n      usage_header: {name}\n",
            7,
            f"bundle.usage_header: {name} frames the message or belongs to one connection",
            id=f"header-{name}",
        )
        for name in ("Content-Length", "transfer-encoding", "Connection", "Proxy-Authorization")
    ],
    *[
        pytest.param(
            f"    bundle:\n      units: 10\n      usage_header: {name}\n",
            7,
            f"bundle.usage_header: {name} is one the paywall writes itself",
            id=f"header-{name}",
        )
        for name in ("X-L402-Balance", "WWW-Authenticate")
    ],
    pytest.param(
        "    single_use: true\n    bundle: {requests: 5}\n",
        6,
        "single_use and bundle are both set (single_use on line 5): single use is a bundle of 1 "
        "request; give one of them",
        id="single-use-and-bundle",
    ),
    pytest.param(
        "    bundle: {requests: 5}\n    single_use: true\n",
        6,
        "single_use and bundle are both set (bundle on line 5)",
        id="bundle-and-single-use",
    ),
    pytest.param(
        "    single_use: 1\n", 5, "single_use must be true or false, got 1", id="single-use-1"
    ),
    pytest.param(
        "    single_use: once\n", 5, "single_use must be true or false, got 'once'", id="once"
    ),
    pytest.param(
        "    usage_header: X-Usage\n",
        5,
        "unknown key 'usage_header' (it belongs under 'bundle:')",
        id="usage-header-outside",
    ),
    pytest.param(
        "    bytes: 1MB\n",
        5,
        "unknown key 'bytes' (it belongs under 'bundle:')",
        id="bytes-outside",
    ),
]


@pytest.mark.parametrize(("lines", "line", "message"), BUNDLE_ERRORS)
def test_bundle_errors_name_file_and_line(lines: str, line: int, message: str) -> None:
    exc = error(HEAD + "    price_sat: 1\n" + lines)  # price_sat on line 4, the case from 5
    assert exc.line == line, str(exc)
    assert str(exc).startswith(f"rules/test.yaml:{line}: service 'a': "), str(exc)
    assert message in str(exc)


@pytest.mark.parametrize("key", ["price", "bundle", "single_use", "pass"])
@pytest.mark.parametrize("mode", ["free", "deny"])
def test_the_pricing_keys_are_refused_where_nothing_is_sold(key: str, mode: str) -> None:
    value = {
        "price": "python:os.path:join",
        "bundle": "{requests: 5}",
        "single_use": "true",
        "pass": "{name: p, services: [a]}",
    }[key]
    exc = error(HEAD + f"    mode: {mode}\n    {key}: {value}\n")
    assert exc.line == 5
    assert f"'{key}' has no meaning with mode: {mode} (nothing is sold there)" in str(exc)


def test_the_pricing_keys_at_the_top_level_belong_to_a_service() -> None:
    exc = error("bundle: {requests: 5}\n" + HEAD + "    price_sat: 1\n")
    assert exc.line == 1
    assert "unknown key 'bundle' at the top level (it belongs to a service)" in str(exc)


# ---- pass --------------------------------------------------------------------------------

PASS_FILE = """
services:
  - name: podcast
    match: {path: /episodes/*}
    price_sat: 50
    valid_for: 1d
    pass: {name: premium, services: [podcast, articles], valid_for: 30d}
  - name: articles
    match: {path: /articles/*}
    price_sat: 10
"""


def test_pass() -> None:
    podcast, articles = parse(PASS_FILE).rules
    assert podcast.pass_ == PassSpec("premium", ("podcast", "articles"), 30 * 86400)
    assert articles.pass_ is None


@pytest.mark.parametrize(
    ("service_valid_for", "pass_valid_for", "seconds"),
    [
        ("", "", 3600),  # both defaults
        ("    valid_for: 1w\n", "", 604800),  # the service's
        ("    valid_for: never\n", "", None),  # the service's, never
        ("    valid_for: 1h\n", ", valid_for: never", None),
        ("    valid_for: 1h\n", ", valid_for: null", None),
        ("", ", valid_for: 90", 90),
    ],
)
def test_a_pass_lasts_its_own_valid_for_or_the_services(
    service_valid_for: str, pass_valid_for: str, seconds: int | None
) -> None:
    rule = one(HEAD + "    price_sat: 1\n" + service_valid_for + f"    pass: {{name: p, services: "
               f"[a]{pass_valid_for}}}\n")  # fmt: skip
    assert rule.pass_ == PassSpec("p", ("a",), seconds)


def test_a_pass_may_name_services_further_down() -> None:
    rules = parse(
        """
        services:
          - name: first
            match: {path: /1/*}
            price_sat: 1
            pass:
              name: both
              services:
                - first
                - second
          - name: second
            match: {path: /2/*}
            mode: upgrade
            price: python:os.path:join
        """
    ).rules
    assert rules[0].pass_ == PassSpec("both", ("first", "second"), 3600)


PASS_ERRORS = [
    pytest.param(
        "    pass: premium\n",
        5,
        "pass must be a mapping like {name: premium, services: [podcast, articles], valid_for: "
        "30d}, got 'premium'",
        id="not-a-mapping",
    ),
    pytest.param("    pass: {services: [a]}\n", 5, "pass needs 'name': {name:", id="no-name"),
    pytest.param("    pass: {name: p}\n", 5, "pass needs 'services': {name:", id="no-services"),
    pytest.param(
        "    pass:\n      name: 'a b'\n      services: [a]\n",
        6,
        "invalid pass name 'a b': use 1-64 letters",
        id="bad-name",
    ),
    pytest.param(
        "    pass:\n      name: 5\n      services: [a]\n",
        6,
        "pass.name must be a string, got 5",
        id="name-not-a-string",
    ),
    pytest.param(
        "    pass:\n      name: p\n      services: a\n",
        7,
        "pass.services must be a list, got 'a'",
        id="services-not-a-list",
    ),
    pytest.param(
        "    pass:\n      name: p\n      services: []\n",
        7,
        "pass.services is empty: list the services the pass opens, 'a' among them",
        id="services-empty",
    ),
    pytest.param(
        "    pass:\n      name: p\n      services:\n        - a\n        - a\n",
        9,
        "pass.services lists 'a' twice",
        id="listed-twice",
    ),
    pytest.param(
        "    pass:\n      name: p\n      services:\n        - a\n        - [b]\n",
        9,
        "pass.services item must be a string, got a list",
        id="item-not-a-string",
    ),
    pytest.param(
        "    pass:\n      name: p\n      services:\n        - b\n",
        8,
        "pass.services must include this service's own name 'a' (its 402 sells the pass)",
        id="own-name-missing",
    ),
    pytest.param(
        "    pass:\n      name: p\n      services:\n        - a\n        - podcats\n"
        "  - name: podcast\n    match: {path: /p}\n    price_sat: 1\n",
        9,
        "pass.services: no service named 'podcats' in this file (did you mean 'podcast'?)",
        id="unknown-service",
    ),
    pytest.param(
        "    pass:\n      name: p\n      services: [a, open]\n"
        "  - name: open\n    match: {path: /o}\n    mode: free\n",
        7,
        "pass.services: service 'open' (line 8) has mode free; a pass opens priced services",
        id="free-service",
    ),
    pytest.param(
        "    pass:\n      name: p\n      services: [a, shut]\n"
        "  - name: shut\n    match: {path: /s}\n    mode: deny\n",
        7,
        "pass.services: service 'shut' (line 8) has mode deny",
        id="deny-service",
    ),
    pytest.param(
        "    pass:\n      name: p\n      services: [a]\n      valid: 1d\n",
        8,
        "unknown key 'valid' in pass (did you mean 'valid_for'?)",
        id="typo",
    ),
    pytest.param(
        "    pass:\n      name: p\n      services: [a]\n      price_sat: 5\n",
        8,
        "unknown key 'price_sat' in pass (it belongs to the service, not under 'pass:')",
        id="service-key-inside",
    ),
    pytest.param(
        "    pass:\n      name: p\n      services: [a]\n      valid_for: soon\n",
        8,
        "pass.valid_for: invalid duration 'soon'",
        id="bad-valid-for",
    ),
    pytest.param(
        "    pass:\n      name: p\n      services: [a]\n      valid_for: 0\n",
        8,
        "pass.valid_for: duration must be more than 0 seconds",
        id="zero-valid-for",
    ),
]


@pytest.mark.parametrize(("lines", "line", "message"), PASS_ERRORS)
def test_pass_errors_name_file_and_line(lines: str, line: int, message: str) -> None:
    exc = error(HEAD + "    price_sat: 1\n" + lines)  # price_sat on line 4, the case from 5
    assert exc.line == line, str(exc)
    assert str(exc).startswith(f"rules/test.yaml:{line}: service 'a': "), str(exc)
    assert message in str(exc)


def test_two_services_cannot_sell_one_pass() -> None:
    exc = error(
        HEAD
        + "    price_sat: 1\n    pass: {name: p, services: [a]}\n"
        + "  - name: b\n    match: {path: /b}\n    price_sat: 1\n"
        + "    pass:\n      name: p\n      services: [b]\n"
    )
    assert str(exc) == (
        "rules/test.yaml:10: service 'b': duplicate pass name 'p' (first on line 5, sold by "
        "service 'a'); one service sells each pass"
    )


def test_pass_check_names_the_selling_service_even_when_a_later_one_is_read() -> None:
    # The services of a pass are looked up once all are read: the error still names the line
    # and the service that sells the pass, not the last service read.
    exc = error(PASS_FILE.replace("[podcast, articles]", "[podcast, artciles]"))
    assert (exc.line, exc.service) == (6, "podcast")
    assert "did you mean 'articles'?" in str(exc)


# ---- the Rule shape ----------------------------------------------------------------------


def test_existing_rule_constructions_keep_working() -> None:
    base = one(MINIMAL)
    rule = Rule(
        name="x",
        path=base.path,
        host=None,
        methods=None,
        price_sat=3,
        mode="paywall",
        paid=base.paid,
        valid_for=60,
        capabilities=None,
        description="x",
        invoice_expiry=600,
        line=1,
    )
    assert (rule.price, rule.bundle, rule.single_use, rule.pass_) == (None, None, False, None)
    assert (base.price, base.bundle, base.single_use, base.pass_) == (None, None, False, None)


def test_a_free_path_sells_nothing_of_the_rule() -> None:
    ruleset = parse(
        HEAD.replace("/a}", "/a/*}")
        + "    price: python:os.path:join\n    single_use: true\n    free_paths: [/a/free]\n"
        + "    pass: {name: p, services: [a]}\n"
    )
    free = ruleset.match("h", "/a/free", "GET")
    assert free is not None and free.mode == "free"
    assert (free.price, free.bundle, free.single_use, free.pass_) == (None, None, False, None)
    sold = ruleset.match("h", "/a/x", "GET")
    assert sold is not None and sold.price is not None and sold.single_use


def test_rules_with_the_new_keys_are_frozen_and_hashable() -> None:
    text = PASS_FILE.replace("price_sat: 10", "price_sat: 10\n    bundle: {bytes: 1MB}")
    podcast, articles = parse(text).rules
    assert hash(podcast) == hash(parse(text).rules[0])
    assert articles.bundle == Bundle("bytes", 10**6, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        articles.bundle.size = 5  # type: ignore[misc,union-attr]
    with pytest.raises(dataclasses.FrozenInstanceError):
        podcast.pass_.services = ()  # type: ignore[misc,union-attr]
    ref = PriceRef("python:m:f", len)
    assert ref.where == "<rules>" and (ref.source, ref.line) == (None, None)
    assert PriceRef("python:m:f", len, None, 3).where == "line 3"


def test_parse_rules_without_a_directory_leaves_sys_path_alone() -> None:
    before = list(sys.path)
    parse_rules(yaml_text(HEAD + "    price: python:os.path:join\n"), "x.yaml")
    assert sys.path == before
