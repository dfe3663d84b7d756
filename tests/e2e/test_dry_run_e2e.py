"""Dry run through the three front doors (tests/e2e/doors.py: real mitmdump, the ASGI door under
uvicorn, nginx with serve-auth), with rules/podcast.yaml run as `mode: dry_run`: every request
reaches the origin, its answer says what the paywall would have done in X-L402-Dry-Run, a paying
client still gets the paid variant, and no invoice is ever made."""

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from l402proxy.origin_asgi import episode_bytes

from . import procs
from .doors import Door, DoorKind, start_door
from .test_doors_behaviour import BROWSER_ACCEPT, OPTED_IN, ask, kind, minted

pytestmark = pytest.mark.e2e

__all__ = ["kind"]  # the module-scoped fixture over the three doors, shared with that suite

DRY_RUN = "X-L402-Dry-Run"
DAY = 86400


@pytest.fixture(scope="module")
def dry_rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rules = tmp_path_factory.mktemp("dry-run-rules") / "podcast.yaml"
    podcast = (procs.REPO / "rules" / "podcast.yaml").read_text()
    rules.write_text("mode: dry_run\n" + podcast)
    return rules


@pytest.fixture(scope="module")
def door(
    kind: DoorKind, dry_rules: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Door]:
    work = tmp_path_factory.mktemp(f"dry-run-{kind}")
    with start_door(kind, work, work / "home", dry_rules) as started:
        yield started


def reached_origin(response: httpx.Response, path: str) -> None:
    """The origin's own answer (its X-Origin-Path), never one of the paywall's."""
    assert response.headers.get("X-Origin-Path") == path, (
        response.status_code,
        dict(response.headers),
        response.text[:300],
    )
    assert "WWW-Authenticate" not in response.headers
    assert response.status_code not in (401, 402, 429, 503)


def no_invoices(door: Door) -> None:
    assert procs.ledger_invoices(door.home) == [], "the dry run made an invoice"


@pytest.mark.parametrize(
    ("path", "headers", "body"),
    [
        ("/bonus/b1.mp3", {}, episode_bytes("BONUS", "b1")),
        ("/bonus/b1.mp3", {"Accept": BROWSER_ACCEPT}, episode_bytes("BONUS", "b1")),
        ("/episodes/ep1.mp3", OPTED_IN, episode_bytes("AD-SUPPORTED", "ep1")),
    ],
    ids=["json", "browser", "opted-in"],
)
def test_a_client_that_would_get_a_402_gets_the_origins_answer(
    door: Door, path: str, headers: dict[str, str], body: bytes
) -> None:
    response = ask(door, path, **headers)
    reached_origin(response, path)
    assert response.status_code == 200 and response.content == body
    assert response.headers.get(DRY_RUN) == "challenge"
    no_invoices(door)


def test_a_paying_client_gets_the_paid_variant(door: Door) -> None:
    credential = minted(door, "podcast", int(time.time()) + DAY)
    response = ask(door, "/episodes/ep2.mp3", Authorization=credential)
    reached_origin(response, "/adfree/ep2.mp3")
    assert response.content == episode_bytes("AD-FREE", "ep2")
    assert response.headers["X-Origin-Authorization"] == "absent"  # our credential stays here
    assert response.headers.get(DRY_RUN) == "grant"
    bonus = ask(door, "/bonus/b2.mp3", Authorization=minted(door, "bonus", int(time.time()) + DAY))
    reached_origin(bonus, "/bonus/b2.mp3")
    assert bonus.headers.get(DRY_RUN) == "grant"


def test_a_free_listener_is_told_free(door: Door) -> None:
    response = ask(door, "/episodes/ep3.mp3")
    reached_origin(response, "/episodes/ep3.mp3")
    assert response.content == episode_bytes("AD-SUPPORTED", "ep3")
    assert response.headers.get(DRY_RUN) == "free"


@pytest.mark.parametrize(
    ("method", "path", "headers", "would_be"),
    [
        ("GET", "/bonus/x.mp3", {"Authorization": "L402 bogus:00"}, "challenge"),  # a 401
        ("HEAD", "/bonus/x.mp3", {}, "challenge"),
        ("GET", "/adfree/ep1.mp3", {}, "denied"),  # mode: deny
        ("GET", "/bonus/x.mp3", {"Authorization": "<expired podcast token>"}, "challenge"),
    ],
    ids=["bad-token", "head", "denied", "expired"],
)
def test_no_request_is_ever_blocked(
    door: Door, method: str, path: str, headers: dict[str, str], would_be: str
) -> None:
    if headers.get("Authorization", "").startswith("<expired"):
        headers = {"Authorization": minted(door, "bonus", int(time.time()) - 10)}
    response = ask(door, path, method, **headers)
    reached_origin(response, path)
    assert response.headers.get(DRY_RUN) == would_be
    no_invoices(door)


def test_nothing_was_sold_in_the_whole_run(door: Door) -> None:
    for _ in range(3):
        assert ask(door, "/bonus/again.mp3").headers.get(DRY_RUN) == "challenge"
    no_invoices(door)
