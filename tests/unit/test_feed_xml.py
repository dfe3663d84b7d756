"""The private feed rewriter (engine/feed_xml.py), one rule a test:

- the demo origins' real feeds come out with every enclosure under private_base and are read
  back by feedparser as podcast apps read them (no bozo, same episodes);
- enclosure, media:content and an alternate enclosure's podcast:source of this host move under
  private_base, path and query exactly as written, the fragment dropped; other hosts, other
  schemes, relative references and every other URL-valued place are left as written;
- host matching: case-insensitive, a default port written or not on either side, Host header
  entries with a port, protocol-relative and path-absolute references, strict authorities;
- the channel's atom self link becomes self_url, itunes:new-feed-url is gone, no WebSub hub
  link is left (in any namespace, any spelling of the relation);
- exactly one podcast:block / itunes:block in the channel, the feed's own replaced, an item's
  itunes:block kept; namespace prefixes reused, declared on the root, or a free one on a clash;
- podcast:value and its recipients, CDATA, comments, other namespaces (xmlns="" too) and the
  declared encoding (ISO-8859-1) are kept; the output is deterministic;
- refused with FeedError: too large (before parsing), any DOCTYPE (billion laughs, XXE,
  external DTD), not XML, not RSS.
"""

from pathlib import Path
from xml.sax.saxutils import quoteattr

import feedparser
import pytest
from lxml import etree

from l402proxy import origin_asgi, podcast
from l402proxy.engine.feed_xml import (
    ATOM_NS,
    ITUNES_NS,
    MAX_FEED_BYTES,
    PODCAST_NS,
    FeedError,
    make_private,
)

HOST = "pod.example"
BASE = f"https://{HOST}/.l402/feed/Cap-abc_123"
SELF = f"{BASE}/feed.xml"
MEDIA_NS = "http://search.yahoo.com/mrss/"
NS = {"podcast": PODCAST_NS, "itunes": ITUNES_NS, "atom": ATOM_NS, "media": MEDIA_NS}


def private(feed: bytes, hosts: tuple[str, ...] = (HOST,), base: str = BASE) -> bytes:
    return make_private(feed, private_base=base, public_hosts=hosts, self_url=SELF)


def read(document: bytes) -> etree._Element:
    # The test's own reading: as safe as the module's, nothing resolved.
    return etree.fromstring(document, etree.XMLParser(resolve_entities=False, no_network=True))


def rss(channel: str, declarations: str = "", prolog: str = "") -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n{prolog}'
        f'<rss version="2.0"{declarations}>\n<channel>\n{channel}\n</channel>\n</rss>\n'
    ).encode()


def enclosure_feed(url: str) -> bytes:
    return rss(
        f'<title>T</title>\n<item><enclosure url={quoteattr(url)} type="audio/mpeg"/></item>'
    )


def enclosure_after(url: str, hosts: tuple[str, ...] = (HOST,)) -> str:
    return read(private(enclosure_feed(url), hosts)).find("channel/item/enclosure").get("url")


PODCASTING20 = f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- made by a podcast host -->
<rss version="2.0" xmlns:itunes="{ITUNES_NS}" xmlns:podcast="{PODCAST_NS}"
     xmlns:atom="{ATOM_NS}" xmlns:media="{MEDIA_NS}"
     xmlns:content="http://purl.org/rss/1.0/modules/content/">
  <channel>
    <title>Lightning Talks</title>
    <link>https://{HOST}/</link>
    <description><![CDATA[<p>Talks about <b>Lightning</b> & more</p>]]></description>
    <atom:link href="https://{HOST}/feed.xml" rel="self" type="application/rss+xml"/>
    <atom:link href="https://hub.example/" rel="hub"/>
    <itunes:new-feed-url>https://{HOST}/feed.xml</itunes:new-feed-url>
    <itunes:image href="https://{HOST}/cover.jpg"/>
    <image><url>https://{HOST}/cover.jpg</url><title>Lightning Talks</title>
      <link>https://{HOST}/</link></image>
    <podcast:guid>917393e3-1b1e-5cef-ace4-edaa54e1f810</podcast:guid>
    <podcast:value type="lightning" method="keysend" suggested="0.00000005000">
      <podcast:valueRecipient name="Host" type="node" split="90"
        address="02d5c1bf8b940dc9cadca86d1b0a3c37fbe39cee4c7e839e33bef9174531d27f52"/>
      <podcast:valueRecipient name="App" type="node" split="10" fee="true"
        address="03ae9f91a0cb8ff43840e3c322c4c61f019d8c1c3cea15a25cfc425ac605e61a4a"
        customKey="696969" customValue="eChoQbLiKsRFl2Ljn4l4"/>
    </podcast:value>
    <item>
      <title>Episode 1</title>
      <guid isPermaLink="false">ep1</guid>
      <description><![CDATA[Notes: <a href="https://{HOST}/notes/1">a link</a>]]></description>
      <content:encoded><![CDATA[<p>Full notes</p>]]></content:encoded>
      <enclosure url="https://{HOST}/episodes/1.mp3?src=rss&amp;v=2" type="audio/mpeg"
        length="1234"/>
      <media:content url="https://{HOST}/episodes/1.mp3" type="audio/mpeg" medium="audio"/>
      <podcast:alternateEnclosure type="audio/opus" length="999">
        <podcast:source uri="https://{HOST}/episodes/1.opus"/>
        <podcast:source uri="ipfs://QmdwGqd3d2gFPGeJNLLCshdiPert45fMu84552Y4XHTy4y"/>
        <podcast:source uri="https://cdn.example/episodes/1.opus"/>
      </podcast:alternateEnclosure>
      <podcast:transcript url="https://{HOST}/episodes/1.vtt" type="text/vtt"/>
      <podcast:chapters url="https://{HOST}/episodes/1.json" type="application/json+chapters"/>
    </item>
    <item>
      <title>Episode 2</title>
      <guid isPermaLink="false">ep2</guid>
      <enclosure url="/episodes/2.mp3#t=30" type="audio/mpeg" length="4321"/>
    </item>
  </channel>
</rss>
""".encode()


# --- the demo's feeds, read back as apps read them ----------------------------------------------


def demo_podcast_feed(tmp_path: Path, base: str) -> bytes:
    # podcast.feed_xml only reads the files' sizes: stand-ins spare rendering the audio.
    for episode in podcast.EPISODES:
        path = podcast.media_path(tmp_path, podcast.AD_SUPPORTED, episode.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"RIFF" + bytes(100))
    return podcast.feed_xml(base, tmp_path).encode()


@pytest.mark.parametrize("origin", ["podcast", "origin_asgi"])
def test_demo_feed_read_back_by_feedparser(tmp_path: Path, origin: str) -> None:
    public = "http://127.0.0.1:8080"
    base = f"{public}/.l402/feed/Cap"
    if origin == "podcast":
        feed = demo_podcast_feed(tmp_path, public)
        paths = [f"/episodes/{episode.name}.wav" for episode in podcast.EPISODES]
    else:
        feed = origin_asgi._feed(public)
        paths = [f"/episodes/{name}.mp3" for name in origin_asgi.EPISODES]
    before = feedparser.parse(feed)
    after = feedparser.parse(
        make_private(
            feed,
            private_base=base,
            public_hosts=["127.0.0.1:8080"],
            self_url=f"{base}/feed.xml",
        )
    )
    assert not after.bozo, after.get("bozo_exception")
    assert [link.href for entry in after.entries for link in entry.enclosures] == [
        base + path for path in paths
    ]
    # The same episodes, titles and details otherwise; the channel blocked from directories.
    assert [entry.get("title") for entry in after.entries] == [
        entry.get("title") for entry in before.entries
    ]
    assert [entry.get("id") for entry in after.entries] == [
        entry.get("id") for entry in before.entries
    ]
    assert after.feed.title == before.feed.title
    assert after.feed.itunes_block == 1


def test_podcasting20_feed_read_back_by_feedparser() -> None:
    parsed = feedparser.parse(private(PODCASTING20))
    assert not parsed.bozo, parsed.get("bozo_exception")
    first, second = parsed.entries
    assert [link.href for link in first.enclosures] == [f"{BASE}/episodes/1.mp3?src=rss&v=2"]
    assert first.media_content[0]["url"] == f"{BASE}/episodes/1.mp3"
    assert [link.href for link in second.enclosures] == [f"{BASE}/episodes/2.mp3"]
    assert "<b>Lightning</b>" in parsed.feed.description
    assert "itunes_new-feed-url" not in parsed.feed
    assert parsed.feed.itunes_block == 1


# --- what is rewritten, and what is not --------------------------------------------------------


def test_media_urls_of_this_host_point_under_private_base() -> None:
    root = read(private(PODCASTING20))
    first, second = root.findall("channel/item")
    # Query kept exactly (the &amp; is the XML for "&"), fragment dropped.
    assert first.find("enclosure").get("url") == f"{BASE}/episodes/1.mp3?src=rss&v=2"
    assert first.find("media:content", NS).get("url") == f"{BASE}/episodes/1.mp3"
    sources = [s.get("uri") for s in first.findall("podcast:alternateEnclosure/podcast:source", NS)]
    assert sources == [
        f"{BASE}/episodes/1.opus",
        "ipfs://QmdwGqd3d2gFPGeJNLLCshdiPert45fMu84552Y4XHTy4y",
        "https://cdn.example/episodes/1.opus",
    ]
    assert second.find("enclosure").get("url") == f"{BASE}/episodes/2.mp3"


def test_other_url_valued_places_are_left_as_written() -> None:
    root = read(private(PODCASTING20))
    channel = root.find("channel")
    item = channel.find("item")
    assert channel.findtext("link") == f"https://{HOST}/"
    assert channel.find("itunes:image", NS).get("href") == f"https://{HOST}/cover.jpg"
    assert channel.findtext("image/url") == f"https://{HOST}/cover.jpg"
    assert item.find("podcast:transcript", NS).get("url") == f"https://{HOST}/episodes/1.vtt"
    assert item.find("podcast:chapters", NS).get("url") == f"https://{HOST}/episodes/1.json"
    # The WebSub hub is gone (test_a_private_feed_names_no_websub_hub): it would be told the
    # private self URL.
    assert channel.find("atom:link[@rel='hub']", NS) is None
    # Links inside show notes are text, not attributes of ours.
    assert f'<a href="https://{HOST}/notes/1">' in item.findtext("description")


def test_podcast_value_and_recipients_are_kept_exactly() -> None:
    def value(document: bytes) -> bytes:
        return etree.tostring(read(document).find("channel/podcast:value", NS), method="c14n")

    assert value(private(PODCASTING20)) == value(PODCASTING20)
    recipients = read(private(PODCASTING20)).findall(
        "channel/podcast:value/podcast:valueRecipient", NS
    )
    assert [r.get("split") for r in recipients] == ["90", "10"]
    assert recipients[1].get("customValue") == "eChoQbLiKsRFl2Ljn4l4"


def test_cdata_comments_and_namespace_prefixes_are_kept() -> None:
    out = private(PODCASTING20)
    assert b"<![CDATA[<p>Talks about <b>Lightning</b> & more</p>]]>" in out
    assert b"<content:encoded><![CDATA[<p>Full notes</p>]]></content:encoded>" in out
    assert b"<!-- made by a podcast host -->" in out
    assert read(out).nsmap == read(PODCASTING20).nsmap  # declared, so nothing added
    assert [item.findtext("guid") for item in read(out).iter("item")] == ["ep1", "ep2"]


def test_other_host_enclosures_are_left_as_written() -> None:
    for url in (
        "https://cdn.example/episodes/1.mp3",
        f"https://{HOST}.cdn.example/1.mp3",
        f"https://cdn.example/{HOST}/1.mp3",
        f"https://cdn.example/?u=https://{HOST}/1.mp3",
        "//cdn.example/1.mp3",
    ):
        assert enclosure_after(url) == url


@pytest.mark.parametrize(
    "url",
    [
        f"ftp://{HOST}/1.mp3",  # only http(s) is served through a capability
        f"ipfs://{HOST}/1.mp3",
        f"https:{HOST}/1.mp3",  # no authority: not an absolute URL of a host
        "episodes/1.mp3",  # relative to the feed's folder: not ours to judge
        "../1.mp3",
        "",
        f"https://evil.example\\@{HOST}/1.mp3",  # a WHATWG parser's host is evil.example
        f"https://{HOST}:99999/1.mp3",
        f"https://{HOST}:8o/1.mp3",
        f"https://{HOST} /1.mp3",
    ],
)
def test_anything_but_an_http_url_or_reference_of_this_host_is_left_as_written(url: str) -> None:
    assert enclosure_after(url) == url


@pytest.mark.parametrize(
    ("url", "path"),
    [
        (f"https://{HOST}/a%2Fb%20c.mp3?x=%41&y", "/a%2Fb%20c.mp3?x=%41&y"),  # as written
        (f"https://{HOST}/1.mp3#t=1,2", "/1.mp3"),
        ("HTTPS://Pod.Example/Ep.mp3", "/Ep.mp3"),  # host and scheme any case, path as is
        (f"https://{HOST}", "/"),
        (f"https://{HOST}?x=1", "/?x=1"),
        (f"https://user:pw@{HOST}/1.mp3", "/1.mp3"),  # the capability is the credential now
        (f"  https://{HOST}/1.mp3\n", "/1.mp3"),
        ("/episodes/1.mp3?a=1#frag", "/episodes/1.mp3?a=1"),  # path-absolute: this host
        (f"//{HOST}/1.mp3", "/1.mp3"),  # protocol-relative: the host is checked
        (f"//{HOST}:443/1.mp3", "/1.mp3"),  # ...with the feed's scheme (https here)
    ],
)
def test_urls_of_this_host_keep_path_and_query(url: str, path: str) -> None:
    assert enclosure_after(url) == BASE + path


@pytest.mark.parametrize(
    ("url", "host", "ours"),
    [
        (f"https://{HOST}:443/1.mp3", HOST, True),
        (f"http://{HOST}:80/1.mp3", HOST, True),
        (f"https://{HOST}/1.mp3", f"{HOST}:443", True),
        (f"http://{HOST}/1.mp3", f"{HOST}:80", True),
        (f"https://{HOST}:/1.mp3", HOST, True),  # an empty port is the default one
        (f"http://{HOST}/1.mp3", HOST, True),  # an origin writing http behind TLS: same host
        (f"http://{HOST}/1.mp3", f"{HOST}:443", False),  # http's default is 80
        (f"http://{HOST}:443/1.mp3", HOST, False),
        (f"https://{HOST}:8443/1.mp3", HOST, False),
        (f"https://{HOST}/1.mp3", f"{HOST}:8443", False),
        (f"https://{HOST}:8443/1.mp3", f"{HOST}:8443", True),
        (f"https://{HOST}/1.mp3", "POD.EXAMPLE", True),
        ("http://127.0.0.1:8080/1.mp3", "127.0.0.1:8080", True),
        ("http://[::1]:8080/1.mp3", "[::1]:8080", True),
        ("http://[::1]/1.mp3", "[::1]:80", True),
        ("http://[::1]:8080/1.mp3", "[::1]", False),
    ],
)
def test_default_ports_match_a_host_without_one_and_back(url: str, host: str, ours: bool) -> None:
    assert enclosure_after(url, (host,)) == (BASE + "/1.mp3" if ours else url)


def test_any_of_several_public_hosts_matches() -> None:
    hosts = ("pod.example", "www.pod.example:8443")
    assert enclosure_after("https://www.pod.example:8443/1.mp3", hosts) == f"{BASE}/1.mp3"
    assert enclosure_after("https://www.pod.example/1.mp3", hosts) == (
        "https://www.pod.example/1.mp3"
    )


def test_a_protocol_relative_reference_takes_the_private_feeds_scheme() -> None:
    feed = enclosure_feed(f"//{HOST}:80/1.mp3")
    http_base = f"http://{HOST}/.l402/feed/Cap"
    assert read(private(feed, base=http_base)).find(".//enclosure").get("url") == (
        f"{http_base}/1.mp3"
    )
    # Under https, :80 is not the default port: another service on the host.
    assert enclosure_after(f"//{HOST}:80/1.mp3") == f"//{HOST}:80/1.mp3"


def test_only_an_alternate_enclosures_source_and_no_namespace_enclosure_are_media() -> None:
    feed = rss(
        '<item><other:enclosure url="/1.mp3"/>'
        '<podcast:source uri="/2.mp3"/>'
        '<podcast:alternateEnclosure type="audio/mpeg"><podcast:source uri="/3.mp3"/>'
        "</podcast:alternateEnclosure></item>",
        f' xmlns:podcast="{PODCAST_NS}" xmlns:other="urn:other"',
    )
    item = read(private(feed)).find("channel/item")
    assert item.find("{urn:other}enclosure").get("url") == "/1.mp3"
    assert item.find("podcast:source", NS).get("uri") == "/2.mp3"
    assert item.find("podcast:alternateEnclosure/podcast:source", NS).get("uri") == (
        f"{BASE}/3.mp3"
    )


# --- the channel: self link, new-feed-url, block tags --------------------------------------------


def test_self_link_is_the_private_feed_and_new_feed_url_is_gone() -> None:
    channel = read(private(PODCASTING20)).find("channel")
    assert [link.get("href") for link in channel.findall("atom:link[@rel='self']", NS)] == [SELF]
    assert channel.find("itunes:new-feed-url", NS) is None
    assert b"new-feed-url" not in private(PODCASTING20)


HUB_FEED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<rss version="2.0" '
    b'xmlns:atom="http://www.w3.org/2005/Atom"><channel><title>T</title>'
    b'<atom:link rel="self" type="application/rss+xml" href="https://pod.example/feed.xml"/>'
    b'<atom:link rel="hub" href="https://pubsubhubbub.appspot.com/"/>'
    b'<item><enclosure url="https://pod.example/episodes/ep1.mp3" type="audio/mpeg" '
    b'length="9"/></item></channel></rss>\n'
)


def test_a_private_feed_names_no_websub_hub() -> None:
    """WebSub (W3C): a subscriber that finds rel="hub" subscribes at the hub with
    hub.topic = the rel="self" URL. The self link is the private URL, so a kept hub would make
    a WebSub-aware app or aggregator hand the capability to a third party (the hub), which
    keeps it in its subscription records."""
    made = private(HUB_FEED)
    assert b'rel="self"' in made and SELF.encode() in made
    assert b'rel="hub"' not in made and b"pubsubhubbub" not in made, made.decode()


IANA = "http://www.iana.org/assignments/relation/"


@pytest.mark.parametrize(
    ("tag", "rel", "inside"),
    [
        ("atom:link", "hub", ""),
        ("atom:link", " HUB ", ""),
        ("atom:link", f"{IANA}hub", ""),
        ("atom:link", "self hub", ""),
        ("atom03:link", "hub", ""),  # Atom 0.3
        ("link", "hub", ""),  # no namespace: feedparser reads it all the same
        ("atom:link", "hub", "item"),
    ],
)
def test_every_hub_link_is_removed_whatever_its_spelling(tag: str, rel: str, inside: str) -> None:
    link = f'<{tag} rel="{rel}" href="https://hub.example/"/>'
    if inside:
        link = f"<{inside}>{link}</{inside}>"
    feed = rss(
        f"<title>T</title><!-- kept -->{link}"
        '<atom:link rel="self" href="https://pod.example/feed.xml"/>'
        "<link>https://pod.example/</link>",
        f' xmlns:atom="{ATOM_NS}" xmlns:atom03="http://purl.org/atom/ns#"',
    )
    made = private(feed)
    assert b"hub.example" not in made, made.decode()
    channel = read(made).find("channel")
    assert [link.get("href") for link in channel.findall("atom:link[@rel='self']", NS)] == [SELF]
    assert channel.findtext("link") == "https://pod.example/"  # RSS's own link: no rel
    assert b"<!-- kept -->" in made


@pytest.mark.parametrize("rel", ["SELF", f"{IANA}self", " self "])
def test_a_self_link_in_any_spelling_becomes_the_private_feed(rel: str) -> None:
    feed = rss(
        f'<title>T</title><atom:link rel="{rel}" href="https://pod.example/feed.xml"/>',
        f' xmlns:atom="{ATOM_NS}"',
    )
    channel = read(private(feed)).find("channel")
    assert channel.find("atom:link", NS).get("href") == SELF


def test_existing_block_tags_are_replaced_by_exactly_one_of_each() -> None:
    feed = rss(
        "<title>T</title>\n"
        "<podcast:block>no</podcast:block>\n"
        '<podcast:block id="spotify">yes</podcast:block>\n'
        "<itunes:block>No</itunes:block>\n"
        "<item><title>hidden</title><itunes:block>Yes</itunes:block></item>\n"
        "<itunes:block>no</itunes:block>",
        f' xmlns:podcast="{PODCAST_NS}" xmlns:itunes="{ITUNES_NS}"',
    )
    channel = read(private(feed)).find("channel")
    podcast_blocks = channel.findall("podcast:block", NS)
    assert [(b.text, dict(b.attrib)) for b in podcast_blocks] == [("yes", {})]
    assert [b.text for b in channel.findall("itunes:block", NS)] == ["Yes"]
    # An item's own itunes:block hides that episode: kept.
    assert channel.find("item/itunes:block", NS).text == "Yes"
    assert channel.findtext("title") == "T"


def test_block_tags_come_before_the_first_item_with_the_feeds_indentation() -> None:
    out = private(rss("  <title>T</title>\n  <item><title>one</title></item>"))
    assert (
        b"<title>T</title>\n  <podcast:block>yes</podcast:block>\n"
        b"  <itunes:block>Yes</itunes:block>\n  <item>" in out
    )
    channel = read(private(rss("<title>no items</title>"))).find("channel")
    assert [etree.QName(child).localname for child in channel] == ["title", "block", "block"]


def test_namespaces_are_declared_on_the_root_when_missing() -> None:
    out = private(rss("<title>T</title>"))
    assert read(out).nsmap == {"podcast": PODCAST_NS, "itunes": ITUNES_NS}
    assert b"<podcast:block>yes</podcast:block>" in out
    assert b"<itunes:block>Yes</itunes:block>" in out


def test_an_existing_prefix_for_the_namespace_is_reused() -> None:
    feed = rss(
        '<item xmlns:pi="' + PODCAST_NS + '"><pi:season>1</pi:season></item>',
        f' xmlns:it="{ITUNES_NS}"',
    )
    out = private(feed)
    # `it` was on the root already; `pi` was only on an item and now is on the root as well.
    assert read(out).nsmap == {"it": ITUNES_NS, "pi": PODCAST_NS}
    assert b"<pi:block>yes</pi:block>" in out
    assert b"<it:block>Yes</it:block>" in out
    assert b"xmlns:podcast" not in out and b"xmlns:itunes" not in out


def test_a_prefix_taken_by_another_namespace_is_not_used() -> None:
    feed = rss(
        "<podcast:thing>kept</podcast:thing>"
        '<item xmlns:itunes2="urn:also-taken"><itunes:x>kept</itunes:x></item>',
        ' xmlns:podcast="urn:not-podcastindex" xmlns:itunes="urn:not-itunes"',
    )
    out = private(feed)
    root = read(out)
    assert root.nsmap == {
        "podcast": "urn:not-podcastindex",
        "itunes": "urn:not-itunes",
        "podcast2": PODCAST_NS,
        "itunes3": ITUNES_NS,  # itunes2 is bound deeper down, to another URI
    }
    channel = root.find("channel")
    assert channel.find("{urn:not-podcastindex}thing").text == "kept"
    assert channel.find("item/{urn:not-itunes}x").text == "kept"
    assert channel.find("podcast:block", NS).text == "yes"
    assert channel.find("itunes:block", NS).text == "Yes"
    assert b"<podcast2:block>yes</podcast2:block>" in out


def test_a_prefix_rebound_on_the_channel_is_not_used_on_the_root() -> None:
    # Declared on the root, `podcast` would be shadowed inside the channel.
    feed = (
        b'<rss version="2.0"><channel xmlns:podcast="urn:other">'
        b"<podcast:x>1</podcast:x></channel></rss>"
    )
    root = read(private(feed))
    assert root.nsmap == {"podcast2": PODCAST_NS, "itunes": ITUNES_NS}
    assert root.find("channel/podcast:block", NS).text == "yes"


def test_declaring_a_namespace_keeps_everything_else() -> None:
    # A new root is built to declare the namespaces: attributes, top-level comments and
    # processing instructions, and declarations like xmlns="" must all survive it.
    feed = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<?xml-stylesheet href="/s.xsl"?>\n<!-- a -->\n'
        b'<rss version="2.0" xml:lang="en" xmlns:x="urn:x" xmlns:unused="urn:unused" x:a="1">'
        b'<channel><x:h xmlns="urn:html"><p xmlns=""><q/></p></x:h></channel></rss>\n<!-- z -->'
    )
    out = private(feed)
    root = read(out)
    assert root.attrib == {
        "version": "2.0",
        "{http://www.w3.org/XML/1998/namespace}lang": "en",
        "{urn:x}a": "1",
    }
    assert root.nsmap == {
        "x": "urn:x",
        "unused": "urn:unused",
        "podcast": PODCAST_NS,
        "itunes": ITUNES_NS,
    }
    # Without its xmlns="", <p> would fall into urn:html (etree.cleanup_namespaces does that).
    assert [element.tag for element in root.find("channel/{urn:x}h").iter()] == [
        "{urn:x}h",
        "p",
        "q",
    ]
    tree = root.getroottree()
    assert [str(node) for node in root.itersiblings(preceding=True)][::-1] == [
        '<?xml-stylesheet href="/s.xsl"?>',
        "<!-- a -->",
    ]
    assert [str(node) for node in root.itersiblings()] == ["<!-- z -->"]
    assert tree.docinfo.encoding == "UTF-8"


# --- encodings and determinism ----------------------------------------------------------------


def test_an_iso_8859_1_feed_stays_iso_8859_1() -> None:
    feed = (
        '<?xml version="1.0" encoding="ISO-8859-1"?>\n'
        '<rss version="2.0"><channel><title>Caf\xe9 Cr\xe8me</title>'
        f'<item><title>\xc9pisode \xfc</title><enclosure url="https://{HOST}/\xe9t\xe9.mp3"'
        ' type="audio/mpeg" length="1"/></item></channel></rss>'
    ).encode("iso-8859-1")
    out = private(feed)
    assert out.startswith(b"<?xml version='1.0' encoding='ISO-8859-1'?>")
    assert b"<title>Caf\xe9 Cr\xe8me</title>" in out  # one byte per letter, not UTF-8
    parsed = feedparser.parse(out)
    assert not parsed.bozo, parsed.get("bozo_exception")
    assert parsed.feed.title == "Café Crème"
    assert parsed.entries[0].title == "Épisode ü"
    # The path is kept as written: an IRI stays an IRI, in the document's encoding.
    assert parsed.entries[0].enclosures[0].href == f"{BASE}/été.mp3"


def test_a_feed_without_declaration_gets_a_utf8_one_and_standalone_is_kept() -> None:
    out = private(b"<rss><channel><title>\xc3\xa9</title></channel></rss>")
    assert out.startswith(b"<?xml version='1.0' encoding='UTF-8'?>\n<rss")
    assert b"<title>\xc3\xa9</title>" in out
    standalone = b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><rss><channel/></rss>'
    assert private(standalone).startswith(
        b"<?xml version='1.0' encoding='UTF-8' standalone='yes'?>"
    )


def test_the_rewrite_is_deterministic() -> None:
    # The door keeps the origin's ETag: the same feed must give the same private bytes.
    assert private(PODCASTING20) == private(PODCASTING20)


# --- refused ------------------------------------------------------------------------------------

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<rss version="2.0"><channel><title>&lol9;</title></channel></rss>
"""


@pytest.mark.parametrize(
    "feed",
    [
        BILLION_LAUGHS,
        b'<!DOCTYPE rss [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
        b"<rss><channel><title>&xxe;</title></channel></rss>",
        b'<!DOCTYPE rss [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]><rss><channel/></rss>',
        b'<!DOCTYPE rss SYSTEM "http://127.0.0.1:9/rss.dtd"><rss><channel/></rss>',
        b'<!DOCTYPE rss PUBLIC "-//Netscape Communications//DTD RSS 0.91//EN" '
        b'"http://my.netscape.com/publish/formats/rss-0.91.dtd"><rss><channel/></rss>',
        b"<!DOCTYPE rss><rss><channel/></rss>",
        # Refused before the internal subset is read: its errors are never reached.
        b"<!DOCTYPE rss [ <!ENTITY broken ]><rss><channel/></rss>",
        '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE rss><rss><channel/></rss>'.encode(
            "utf-16"
        ),
    ],
    ids=["billion-laughs", "xxe", "parameter-entity", "external-dtd", "rss-091", "bare",
         "broken-subset", "utf-16"],
)  # fmt: skip
def test_a_doctype_is_refused(feed: bytes) -> None:
    with pytest.raises(FeedError, match=r"^feed has a DOCTYPE \(\w+\): DTDs and entities"):
        private(feed)


@pytest.mark.parametrize(
    "feed",
    [
        b"",
        b"   \n",
        b"not xml at all",
        b"<rss><channel><title>unclosed</channel></rss>",
        b"<rss><channel>",
        b"<rss><channel><title>&undefined;</title></channel></rss>",
        b"<rss><channel/></rss><rss/>",
        b'<?xml version="1.0" encoding="no-such-encoding"?><rss><channel/></rss>',
        b'<?xml version="1.0" encoding="UTF-8"?><rss><channel><title>\xff</title></channel></rss>',
        b"\x00\x01\x02",
    ],
)
def test_not_xml_is_refused_in_one_line(feed: bytes) -> None:
    with pytest.raises(FeedError, match=r"^feed is not XML: ") as raised:
        private(feed)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("feed", "found"),
    [
        (
            b'<feed xmlns="http://www.w3.org/2005/Atom"><title>t</title></feed>',
            "the root element is <feed> (namespace http://www.w3.org/2005/Atom)",
        ),
        (
            b'<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"'
            b' xmlns="http://purl.org/rss/1.0/"><channel/></rdf:RDF>',
            "the root element is <RDF> (namespace http://www.w3.org/1999/02/22-rdf-syntax-ns#)",
        ),
        (b"<html><body>502 Bad Gateway</body></html>", "the root element is <html>"),
        (b'<rss xmlns="urn:x"><channel/></rss>', "the root element is <rss> (namespace urn:x)"),
        (b'<rss version="2.0"/>', "<rss> has no <channel>"),
        (b"<rss><x:channel xmlns:x='urn:x'/></rss>", "<rss> has no <channel>"),
    ],
)
def test_not_rss_is_refused_saying_what_was_found(feed: bytes, found: str) -> None:
    with pytest.raises(FeedError) as raised:
        private(feed)
    assert str(raised.value) == f"not an RSS feed: {found}"


def test_too_large_is_refused_before_parsing() -> None:
    # Well-formed RSS padded past the limit: only the size can refuse it. Padded with comments:
    # libxml2 refuses a single run of text over 10 MB (huge_tree off) on its own.
    feed = rss("<title>T</title>")
    line = b"<!--" + b"x" * 4000 + b"-->\n"
    lines, rest = divmod(MAX_FEED_BYTES - len(feed), len(line))
    at_limit = feed + line * lines + b" " * rest
    assert len(at_limit) == MAX_FEED_BYTES
    assert read(private(at_limit)).find("channel/title").text == "T"
    with pytest.raises(FeedError, match=rf"^feed too large: {MAX_FEED_BYTES + 1} bytes"):
        private(at_limit + b" ")


def test_public_hosts_given_as_one_string_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="public_hosts"):
        make_private(rss(""), private_base=BASE, public_hosts=HOST, self_url=SELF)
