"""The paywall engine stands alone: no door's library is needed to import or run it."""

import subprocess
import sys

from l402proxy.engine.answers import Answer, mark_variant
from l402proxy.engine.request import drop_upgrade, set_one, take_our_cookies


def test_engine_imports_without_mitmproxy() -> None:
    # A door-less process: mitmproxy made unimportable before anything of ours is imported.
    code = (
        "import sys; sys.modules['mitmproxy'] = None\n"
        "import l402proxy.engine, l402proxy.engine.core, l402proxy.engine.endpoints\n"
        "assert not any(name.startswith('mitmproxy') and sys.modules[name] is not None "
        "for name in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_head_answers_keep_the_length_a_get_would_get() -> None:
    answer = Answer.make(200, b"hello", {"Content-Type": "text/plain"}).for_method("HEAD")
    assert answer.body == b"" and answer.header("Content-Length") == "5"


def test_header_writes_keep_the_first_field_in_place() -> None:
    fields = ((b"a", b"1"), (b"X-Y", b"2"), (b"b", b"3"), (b"x-y", b"4"))
    assert set_one(fields, "x-y", "9") == ((b"a", b"1"), (b"X-Y", b"9"), (b"b", b"3"))
    assert set_one(fields, "New", "v")[-1] == (b"New", b"v")


def test_plain_helpers_leave_unrelated_fields_alone() -> None:
    fields = ((b"Host", b"h"), (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"))
    assert drop_upgrade(fields) is fields
    assert drop_upgrade(((b"Upgrade", b"H2C"), (b"Connection", b"Upgrade, close"))) == (
        (b"Connection", b"close"),
    )
    assert take_our_cookies(((b"Cookie", b"a=b"),)) == (((b"Cookie", b"a=b"),), {})
    marked = mark_variant(((b"Content-Type", b"text/html"),), paid=True)
    assert (b"Cache-Control", b"private") in marked
