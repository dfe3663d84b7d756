"""A podcast feed made private: the listener's own copy of the public RSS feed (no I/O at all).

A podcast app cannot send a credential or answer a 402, so a paying listener subscribes to a
personal URL, `<private_base><feed path>`, and every enclosure of the feed must point under
`<private_base>` too, where the engine judges it with the listener's stored credential. This
module rewrites the feed document the origin sent; the door calls `make_private` in a thread
and answers 502 with the FeedError's one line when the document cannot be rewritten.

What changes (everything else is kept: other namespaces and their prefixes, CDATA, comments,
item order, `<podcast:value>` and its recipients, the encoding):
- URLs of this host (absolute http(s) URLs whose host[:port] is in `public_hosts`, path-absolute
  `/...` references and protocol-relative `//host/...` ones) in `<enclosure url>`,
  `<media:content url>` and `<podcast:alternateEnclosure>`'s `<podcast:source uri>` become
  `private_base + path[?query]` (path and query exactly as written, the fragment dropped).
- The channel's `<atom:link rel="self" href>` becomes `self_url`; `<itunes:new-feed-url>` is
  removed (an app would move the subscriber back to the public feed).
- Every `rel="hub"` link is removed (WebSub): a subscriber that finds a hub subscribes there
  with hub.topic = the self URL, which is now the private one, so a WebSub-aware app or
  aggregator would hand the capability to the hub, a third party that keeps it in its
  subscription records. A private feed has no pushes anyway: the hub knows only the public one.
- The channel gets exactly one `<podcast:block>yes</podcast:block>` and one
  `<itunes:block>Yes</itunes:block>` (a private feed must not be listed by a directory that
  somehow learns its URL), the feed's own block tags removed first.

Untrusted input rules: at most MAX_FEED_BYTES, no DOCTYPE at all (so no entity expansion, no
external entity, no DTD loading: billion laughs and XXE cannot happen), no network, lxml's
default size limits (huge_tree off).
"""

import re
from collections.abc import Collection, Iterable

from lxml import etree

MAX_FEED_BYTES = 16 * 1024 * 1024

PODCAST_NS = "https://podcastindex.org/namespace/1.0"
ITUNES_NS = "http://www.itunes.com/dtds/podcast-1.0.dtd"
ATOM_NS = "http://www.w3.org/2005/Atom"
# A link element in any namespace or none (Atom 1.0, Atom 0.3, a bare <link rel=... href=...>
# that feedparser reads all the same); RSS's own <link> has no rel, so it never matches a rel.
ANY_LINK = "{*}link"
# Atom (RFC 4287 4.2.7.2): a relation may be written as this IRI followed by its name.
IANA_RELATIONS = "http://www.iana.org/assignments/relation/"
# Other spellings readers accept for the same namespaces (feedparser and the Podcasting 2.0
# project list them): a feed using one is still read as podcast/itunes by apps, so its
# new-feed-url and block tags are found under them too. The canonical URI comes first.
PODCAST_NAMESPACES = (
    PODCAST_NS,
    "https://github.com/Podcastindex-org/podcast-namespace/blob/main/docs/1.0.md",
)
ITUNES_NAMESPACES = (
    ITUNES_NS,
    "http://www.itunes.com/DTDs/PodCast-1.0.dtd",
    "http://example.com/DTDs/PodCast-1.0.dtd",
)
MEDIA_NAMESPACES = ("http://search.yahoo.com/mrss/", "http://search.yahoo.com/mrss")

DEFAULT_PORTS = {"http": 80, "https": 443}
# The prefix a new declaration gets when the document has none for that namespace.
PREFIXES = {PODCAST_NS: "podcast", ITUNES_NS: "itunes"}

# How much of the document the DOCTYPE scan feeds the parser at a time: it stops at the root
# element's start tag, so a feed is read once more only up to there.
_SCAN_CHUNK = 64 * 1024
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_AUTHORITY_END = re.compile(r"[/?#]")
# RFC 3986 userinfo, reg-name and IP literal characters. A URL that breaks them is left as it
# is: a WHATWG parser (browsers, many apps) reads `https://a.example\@ours/x` as host
# a.example, so only a strictly valid authority may be called ours.
_USERINFO = re.compile(r"[A-Za-z0-9._~%!$&'()*+,;=:-]*")
_REG_NAME = re.compile(r"[A-Za-z0-9._~%!$&'()*+,;=-]+")
_IP_LITERAL = re.compile(r"\[[0-9A-Fa-f:.]+\]")

Host = tuple[str, int | None]  # lowercased host ("[::1]" keeps its brackets), port or None


class FeedError(ValueError):
    """The feed cannot be made private; the message is one line saying why."""


def make_private(
    feed: bytes, *, private_base: str, public_hosts: Collection[str], self_url: str
) -> bytes:
    """The feed document as a listener's private feed (see the module docstring).

    `private_base`: `<scheme>://<host>/.l402/feed/<capability>` (no trailing slash needed);
    `public_hosts`: the Host header values this feed is public under (`host` or `host:port`);
    `self_url`: the private feed's own URL. Raises FeedError (one line) for a document that is
    too large, not XML, not RSS, or has a DOCTYPE.
    """
    if isinstance(public_hosts, str):
        # A lone string is a Collection[str] of its characters: never what was meant.
        raise TypeError("public_hosts must be a collection of host names, not one string")
    if not isinstance(feed, bytes):
        raise TypeError(f"feed must be bytes, not {type(feed).__name__}")
    if len(feed) > MAX_FEED_BYTES:
        raise FeedError(f"feed too large: {len(feed)} bytes, at most {MAX_FEED_BYTES}")
    _refuse_doctype(feed)
    tree = _parse(feed)
    # Read now: declaring a namespace moves everything into a new document.
    encoding = tree.docinfo.encoding or "UTF-8"
    # lxml reads a missing standalone flag as False (same meaning as "no"): only "yes" is kept.
    standalone = True if tree.docinfo.standalone else None
    root = tree.getroot()
    rewriter = _Rewriter(private_base, public_hosts)
    for element, attribute in _url_places(root):
        value = element.get(attribute)
        if value is not None and (private := rewriter.private(value)) is not None:
            element.set(attribute, private)
    root = _declare(root)
    for link in list(root.iter(ANY_LINK)):
        if "hub" in _relations(link):
            _remove(link)
    for channel in _channels(root):
        _fix_channel(channel, self_url)
    return _serialize(root.getroottree(), encoding, standalone)


# --- reading -------------------------------------------------------------------------------


def _parser(target: object | None = None) -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        huge_tree=False,
        remove_blank_text=False,
        strip_cdata=False,
        target=target,
    )


class _RootReached(Exception):
    """The scan saw the root element's start tag: no DOCTYPE can come after it."""


class _DoctypeFound(Exception):
    pass


class _DoctypeScan:
    """A parser target that fails at a DOCTYPE. libxml2 reports the DOCTYPE's name before it
    reads the internal subset, so no entity declaration is ever looked at: a billion-laughs or
    XXE document is refused before any of it is processed, with the same message every time."""

    def doctype(self, name: str | None, public_id: str | None, system_url: str | None) -> None:
        raise _DoctypeFound(name or "")

    def start(self, tag: str, attrib: object, nsmap: object = None) -> None:
        raise _RootReached

    def end(self, tag: str) -> None:
        pass

    def data(self, data: str) -> None:
        pass

    def close(self) -> None:
        return None


def _refuse_doctype(feed: bytes) -> None:
    parser = _parser(target=_DoctypeScan())
    try:
        for start in range(0, len(feed), _SCAN_CHUNK):
            parser.feed(feed[start : start + _SCAN_CHUNK])
        parser.close()
    except _RootReached:
        return
    except _DoctypeFound as found:
        raise FeedError(
            f"feed has a DOCTYPE ({found.args[0] or 'unnamed'}): DTDs and entities are refused"
        ) from None
    except etree.XMLSyntaxError as error:
        raise FeedError(f"feed is not XML: {_one_line(error)}") from None
    # Fed to the end without a start tag: the parse below says what is wrong.


def _parse(feed: bytes) -> etree._ElementTree:
    try:
        root = etree.fromstring(feed, _parser())
    except etree.XMLSyntaxError as error:
        raise FeedError(f"feed is not XML: {_one_line(error)}") from None
    if root is None:
        raise FeedError("feed is not XML: no root element")
    tree = root.getroottree()
    docinfo = tree.docinfo
    # The scan above already refused any DOCTYPE; this keeps the rule should the two parses
    # ever disagree.
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise FeedError("feed has a DOCTYPE: DTDs and entities are refused")
    if root.tag != "rss":
        qname = etree.QName(root)
        where = f" (namespace {qname.namespace})" if qname.namespace else ""
        raise FeedError(f"not an RSS feed: the root element is <{qname.localname}>{where}")
    if not _channels(root):
        raise FeedError("not an RSS feed: <rss> has no <channel>")
    return tree


def _one_line(error: etree.XMLSyntaxError) -> str:
    # error.msg has no "(<string>, line 1)" tail; both may span lines in odd cases.
    text = error.msg or str(error) or "unreadable"
    return " ".join(text.split())


def _channels(root: etree._Element) -> list[etree._Element]:
    # RSS has one channel; should a feed have more, each is a channel some app reads.
    return [child for child in root if child.tag == "channel"]


def _url_places(root: etree._Element) -> list[tuple[etree._Element, str]]:
    """Every (element, attribute) whose URL is an episode's media file."""
    media = [f"{{{uri}}}content" for uri in MEDIA_NAMESPACES]
    sources = [f"{{{uri}}}source" for uri in PODCAST_NAMESPACES]
    alternates = {f"{{{uri}}}alternateEnclosure" for uri in PODCAST_NAMESPACES}
    places: list[tuple[etree._Element, str]] = []
    for element in root.iter("enclosure", *media, *sources):
        tag = element.tag
        if tag == "enclosure" or tag in media:
            places.append((element, "url"))
        elif tag in sources:
            # podcast:source also has other meanings elsewhere; only an alternate enclosure's
            # source is a media file.
            parent = element.getparent()
            if parent is not None and parent.tag in alternates:
                places.append((element, "uri"))
    return places


# --- URLs ------------------------------------------------------------------------------------


def _host(authority: str) -> Host | None:
    """`[userinfo@]host[:port]` as (host, port); None when it is not one."""
    userinfo, _, hostport = authority.rpartition("@")
    if not _USERINFO.fullmatch(userinfo):
        return None
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            return None
        host, after = hostport[: end + 1], hostport[end + 1 :]
        if after and not after.startswith(":"):
            return None
        port_text = after[1:]
    else:
        host, _, port_text = hostport.partition(":")
    if not (_IP_LITERAL.fullmatch(host) or _REG_NAME.fullmatch(host)):
        return None
    if not port_text:
        return host.lower(), None  # "host:" is the default port (RFC 3986 3.2.3)
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        return None
    return host.lower(), int(port_text)


class _Rewriter:
    def __init__(self, private_base: str, public_hosts: Iterable[str]) -> None:
        # Without the trailing slash: every path we append starts with one.
        self.base = private_base.rstrip("/")
        self.hosts = {host for entry in public_hosts if (host := _host(entry.strip()))}
        # A protocol-relative reference takes the feed's scheme, which is the request's: the
        # scheme of private_base.
        match = _SCHEME.match(private_base)
        scheme = match[1].lower() if match else ""
        self.scheme = scheme if scheme in DEFAULT_PORTS else None

    def ours(self, scheme: str, authority: str) -> bool:
        host = _host(authority)
        if host is None:
            return False
        name, port = host
        default = DEFAULT_PORTS[scheme]
        effective = default if port is None else port
        # "host:443" (as a Host header may have it) is https://host; "host" is the default
        # port of either scheme, written or not.
        return (name, effective) in self.hosts or (
            effective == default and (name, None) in self.hosts
        )

    def private(self, value: str) -> str | None:
        """The private URL for a URL of this host; None for any other (left as written)."""
        ref = value.strip()  # attribute whitespace around a URL: apps ignore it
        if match := _SCHEME.match(ref):
            scheme = match[1].lower()
            rest = ref[match.end() :]
            if scheme not in DEFAULT_PORTS or not rest.startswith("//"):
                return None
        elif ref.startswith("//"):
            if self.scheme is None:
                return None
            scheme, rest = self.scheme, ref
        elif ref.startswith("/"):
            return self.base + ref.partition("#")[0]
        else:
            return None  # a relative reference, or empty: not ours to judge
        rest = rest[2:]
        end = _AUTHORITY_END.search(rest)
        authority, tail = (rest[: end.start()], rest[end.start() :]) if end else (rest, "")
        if not self.ours(scheme, authority):
            return None
        # Exactly as written: a player asks for these bytes, the engine judges them.
        path_query = tail.partition("#")[0]
        if not path_query.startswith("/"):
            path_query = "/" + path_query  # "https://host?x" is "https://host/?x"
        return self.base + path_query


# --- the channel -----------------------------------------------------------------------------


def _in_root(root: etree._Element, uris: Iterable[str]) -> str | None:
    """The first of `uris` the root declares with a prefix."""
    declared = {uri for prefix, uri in root.nsmap.items() if prefix}
    return next((uri for uri in uris if uri in declared), None)


def _block_namespaces(root: etree._Element) -> tuple[str, str]:
    # The block tags go in the podcast/itunes namespace the feed already declares (an app
    # reading the feed's own tags reads ours the same way), else in the canonical one.
    return (
        _in_root(root, PODCAST_NAMESPACES) or PODCAST_NS,
        _in_root(root, ITUNES_NAMESPACES) or ITUNES_NS,
    )


def _declare(root: etree._Element) -> etree._Element:
    """Declare the podcast and itunes namespaces on the root when it does not; the root to use
    from now on (a new element: lxml cannot add a declaration to an existing one)."""
    missing = [uri for uri in _block_namespaces(root) if _in_root(root, (uri,)) is None]
    if not missing:
        return root
    # Every prefix the document binds, anywhere, to which URIs (in document order).
    bound: dict[str, set[str]] = {}
    for element in root.iter(etree.Element):
        for prefix, uri in element.nsmap.items():
            if prefix:
                bound.setdefault(prefix, set()).add(uri)
    added: dict[str, str] = {}
    for uri in missing:
        name = PREFIXES[uri]
        # A prefix the feed already uses for this URI deeper down, else the usual name, else
        # the first numbered one no element binds to another URI (that would be shadowed).
        candidates = [prefix for prefix, uris in bound.items() if uri in uris]
        candidates += [name, *(f"{name}{n}" for n in range(2, len(bound) + 3))]
        added[next(p for p in candidates if bound.get(p, {uri}) == {uri} and p not in added)] = uri
    return _with_declarations(root, added)


def _with_declarations(root: etree._Element, added: dict[str, str]) -> etree._Element:
    # etree.cleanup_namespaces(top_nsmap=...) could declare them but also drops declarations it
    # thinks unused, `xmlns=""` among them, which moves an element into its parent's default
    # namespace. A new root with the same declarations, attributes and children keeps them all.
    new = etree.Element(root.tag, nsmap={**root.nsmap, **added})
    for name, value in root.attrib.items():
        new.set(name, value)
    new.text = root.text
    new.extend(list(root))
    # The comments and processing instructions around the root, in their order.
    for node in reversed(list(root.itersiblings(preceding=True))):
        new.addprevious(node)
    for node in reversed(list(root.itersiblings())):
        new.addnext(node)
    return new


def _fix_channel(channel: etree._Element, self_url: str) -> None:
    root = channel.getroottree().getroot()
    podcast_ns, itunes_ns = _block_namespaces(root)
    blocks = {f"{{{uri}}}block" for uri in (*PODCAST_NAMESPACES, *ITUNES_NAMESPACES)}
    moves = {f"{{{uri}}}new-feed-url" for uri in ITUNES_NAMESPACES}
    for child in list(channel):
        if child.tag in blocks or child.tag in moves:
            _remove(child)
        elif (
            isinstance(child.tag, str)  # not a comment or processing instruction
            and etree.QName(child).localname == "link"
            and child.get("href") is not None
            and "self" in _relations(child)
        ):
            # The URL an app re-subscribes to and a directory dedupes on: the private one.
            child.set("href", self_url)
    # Before the first item, where a channel's own tags are written; at the end without one.
    first_item = next((child for child in channel if child.tag == "item"), None)
    for uri, text in ((podcast_ns, "yes"), (itunes_ns, "Yes")):
        block = etree.Element(f"{{{uri}}}block")
        block.text = text
        if first_item is not None:
            first_item.addprevious(block)
        else:
            channel.append(block)
        # The indentation the feed uses between channel tags, so the result reads the same.
        previous = block.getprevious()
        space = previous.tail if previous is not None else channel.text
        block.tail = space if space and not space.strip() else None


def _relations(link: etree._Element) -> set[str]:
    """The relation names of a link element's rel, lowercased: HTML-style lists of several
    ("self hub") split, the IANA IRI form ("http://www.iana.org/assignments/relation/hub") read
    as its name."""
    names = set()
    for name in (link.get("rel") or "").split():
        name = name.lower()
        names.add(name.removeprefix(IANA_RELATIONS))
    return names


def _remove(element: etree._Element) -> None:
    """Remove an element; lxml would remove its tail text with it, so text (never whitespace
    alone) moves to what came before."""
    parent = element.getparent()
    if parent is None:
        return
    tail = element.tail
    if tail and tail.strip():
        previous = element.getprevious()
        if previous is not None:
            previous.tail = (previous.tail or "") + tail
        else:
            parent.text = (parent.text or "") + tail
    parent.remove(element)


# --- writing ---------------------------------------------------------------------------------


def _serialize(tree: etree._ElementTree, encoding: str, standalone: bool | None) -> bytes:
    # The document's own encoding and standalone flag: an ISO-8859-1 feed stays ISO-8859-1.
    try:
        return etree.tostring(tree, xml_declaration=True, encoding=encoding, standalone=standalone)
    except (LookupError, ValueError, etree.LxmlError) as error:
        raise FeedError(f"feed cannot be written in its encoding {encoding}: {error}") from None
