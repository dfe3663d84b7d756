"""Where a rule's price is shown (rules check, the admin API, the upgrade banner): a price:
function's rule is never shown as costing 0 sat, and bundles, single use and passes show."""

import json
from pathlib import Path

import pytest

from l402proxy import paywall
from l402proxy.cli import main
from l402proxy.ops.admin import service_json
from l402proxy.rules import load_rules

RULES = """
services:
  - name: articles
    description: Articles
    match: {path: "/articles/*"}
    price: python:display_price:quote
    mode: upgrade
  - name: podcast
    match: {path: "/episodes/*"}
    price_sat: 21
    bundle: {requests: 10}
    pass: {name: premium, services: [podcast, articles], valid_for: 30d}
  - name: api
    match: {path: "/api/*"}
    price_sat: 2
    single_use: true
"""


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    # A module name of its own per test: Python imports a module name once per process.
    module = f"display_price_{abs(hash(tmp_path.name))}"
    (tmp_path / f"{module}.py").write_text("def quote(request):\n    return 5\n")
    path = tmp_path / "rules.yaml"
    path.write_text(RULES.replace("display_price", module))
    return path


def test_rules_check_and_the_admin_api_say_how_each_rule_sells(
    rules_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["rules", "check", str(rules_file)]) == 0
    shown = {s["name"]: s for s in json.loads(capsys.readouterr().out)["services"]}
    rules = {rule.name: rule for rule in load_rules(str(rules_file)).rules}
    for name, listed in shown.items():
        assert {k: listed[k] for k in rules[name].pricing_json()} == rules[name].pricing_json()
        admin = service_json(rules[name])
        assert {k: admin[k] for k in rules[name].pricing_json()} == rules[name].pricing_json()
    assert shown["articles"]["price_sat"] is None
    assert shown["articles"]["price"].startswith("python:display_price_")
    assert shown["podcast"]["bundle"] == {"unit": "requests", "size": 10, "usage_header": None}
    assert shown["podcast"]["pass"] == {
        "name": "premium",
        "services": ["podcast", "articles"],
        "valid_for": 30 * 86400,
    }
    assert shown["api"]["single_use"] is True and shown["api"]["price_sat"] == 2
    assert service_json(rules["articles"])["price_sat"] is None


def test_the_upgrade_banner_of_a_priced_per_request_rule_names_no_price(rules_file: Path) -> None:
    rule = load_rules(str(rules_file)).rules[0]
    banner = paywall.upgrade_banner(rule, "/articles/a")
    assert "Articles" in banner and "sat" not in banner
