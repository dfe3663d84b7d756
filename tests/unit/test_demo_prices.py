"""The demo's index page states the price the rules really ask."""

from pathlib import Path

from l402proxy import podcast
from l402proxy.demo import DEFAULT_RULES, episode_price


def test_the_price_comes_from_the_rules(tmp_path: Path) -> None:
    assert episode_price(DEFAULT_RULES) == 21
    dearer = tmp_path / "dearer.yaml"
    dearer.write_text(DEFAULT_RULES.read_text().replace("price_sat: 21", "price_sat: 42"))
    assert episode_price(dearer) == 42


def test_broken_or_free_rules_fall_back_to_the_default(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("services: [")
    assert episode_price(broken) == podcast.DEFAULT_PRICE_SAT
    free = tmp_path / "free.yaml"
    free.write_text(
        'services:\n  - name: podcast\n    match: {path: "/episodes/*"}\n    mode: free\n'
    )
    assert episode_price(free) == podcast.DEFAULT_PRICE_SAT
    assert "Go ad-free for 42 sats" in podcast.index_html(42)
