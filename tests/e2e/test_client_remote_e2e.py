"""The client proxy pays only for its user, end to end (real mitmdump, server proxy and ledger).

The client proxy listens on 127.0.0.1 and may pay only for 10.0.0.0/8: to it, this test's
loopback player is someone else on the network, who must get nothing of the user's money or
tokens.
"""

from pathlib import Path

from . import procs
from . import test_client_e2e as base

pytestmark = base.pytestmark

# The server stack and client proxies of the client end-to-end tests.
confdir = base.confdir
server = base.server
clients = base.clients


def test_a_client_outside_l402_clients_never_spends_the_users_money_or_tokens(
    server: base.Server, clients: base.Clients, tmp_path: Path
) -> None:
    store = tmp_path / "client.sqlite"
    # The user, on this machine, buys the podcast scope: a token in the store.
    mine = clients.start(store=store)
    paid = procs.fetch(mine, server.url("/episodes/ep1.mp3"))
    assert paid.content == base.ad_free("ep1"), paid.text + base.tail(mine)
    mine.stop()

    proxy = clients.start("l402_clients=10.0.0.0/8", store=store)
    assert procs.wait_until(lambda: "paying for clients on 10.0.0.0/8 only" in proxy.log(), 30)
    before = base.Ledger.now(server.home)

    # In the token's scope: no token went along and no Accept-Authenticate was added, so the
    # server in upgrade mode answered as to any player that cannot pay.
    episode = procs.fetch(proxy, server.url("/episodes/ep2.mp3"))
    assert episode.status_code == 200, episode.text + base.tail(proxy)
    assert episode.content == base.ad_supported("ep2")

    # A paywalled file (within every limit): the 402 comes back unpaid, saying why.
    bonus = procs.fetch(proxy, server.url("/bonus/ep1.mp3"))
    assert bonus.status_code == 402, bonus.text + base.tail(proxy)
    assert bonus.headers["X-L402-Refused"] == (
        "client_not_allowed; client 127.0.0.1 is not in l402_clients (10.0.0.0/8)"
    )
    assert "X-L402-Paid" not in bonus.headers

    # A player asking to pay by itself is still not paid for.
    asked = procs.fetch(
        proxy, server.url("/episodes/ep3.mp3"), headers={"Accept-Authenticate": "L402"}
    )
    assert asked.status_code == 402
    assert asked.headers["X-L402-Refused"].startswith("client_not_allowed; ")

    after = base.Ledger.now(server.home)
    assert after.settled == before.settled  # nothing paid
    assert after.listener_msat == before.listener_msat
    assert len(after.invoices - before.invoices) == 2  # the two challenges, left unpaid
    assert proxy.log().count("not paying for client 127.0.0.1") == 1
