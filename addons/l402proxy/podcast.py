"""The demo's sample podcast with real audio: an RSS feed, an HTML page with a player per episode,
and WAV files a player or browser can play.

    python -m l402proxy.podcast --port 8080 --media ~/.l402proxy/demo-media

Every episode is a little melody. The ad-supported copy (/episodes/<ep>.wav, what every player
gets) starts with a buzzy two-tone jingle, the "ad"; the ad-free copy (/adfree/<ep>.wav, what a
paying player gets) is the melody alone; /bonus/<ep>.wav is the melody an octave up. The files are
made with the standard library only, byte for byte the same on every run, and remade when one is
missing or damaged.
"""

import argparse
import io
import logging
import math
import os
import struct
import sys
import wave
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from html import escape
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape
from xml.sax.saxutils import quoteattr

from aiohttp import web

log = logging.getLogger(__name__)

RATE = 11025  # Hz; mono, 16-bit: small files every player and browser decodes
SAMPLE_WIDTH = 2
FULL_SCALE = 32767
AUDIO_TYPE = "audio/wav"
# The three kinds of file and the folder (= URL path) each lives under.
AD_SUPPORTED = "episodes"
AD_FREE = "adfree"
BONUS = "bonus"
KINDS = (AD_SUPPORTED, AD_FREE, BONUS)
DEFAULT_PRICE_SAT = 21  # what rules/podcast.yaml asks for an ad-free episode; shown on the page
PAY_PATH = "/.l402/pay"  # the server addon's paywall page, which starts a browser payment

# Note frequencies (equal temperament, A4 = 440 Hz).
C4, D4, E4, F4, G4, A4, B4 = 261.63, 293.66, 329.63, 349.23, 392.00, 440.00, 493.88
C5, D5, E5, G5 = 523.25, 587.33, 659.26, 783.99
REST = 0.0


@dataclass(frozen=True)
class Episode:
    name: str
    title: str
    summary: str
    published: str  # RFC 822, for the feed
    melody: tuple[tuple[float, float], ...]  # (frequency Hz or REST, seconds)


EPISODES: tuple[Episode, ...] = (
    Episode(
        "ep1",
        "Episode 1: Rising",
        "A C major arpeggio climbs and comes home.",
        "Mon, 06 Jan 2025 08:00:00 +0000",
        (
            (C4, 0.3), (E4, 0.3), (G4, 0.3), (C5, 0.6), (G4, 0.3), (E4, 0.3),
            (C4, 0.6), (REST, 0.2), (G4, 0.3), (C5, 0.9),
        ),
    ),
    Episode(
        "ep2",
        "Episode 2: Falling",
        "A slow minor line walks down.",
        "Mon, 13 Jan 2025 08:00:00 +0000",
        (
            (E5, 0.45), (D5, 0.45), (C5, 0.45), (A4, 0.9), (REST, 0.15), (B4, 0.45),
            (G4, 0.45), (E4, 1.2),
        ),
    ),
    Episode(
        "ep3",
        "Episode 3: Waltz",
        "Three-four time, one two three.",
        "Mon, 20 Jan 2025 08:00:00 +0000",
        (
            (D4, 0.5), (F4, 0.25), (A4, 0.25), (D4, 0.5), (G4, 0.25), (B4, 0.25),
            (C4, 0.5), (E4, 0.25), (G4, 0.25), (C5, 1.0),
        ),
    ),
)  # fmt: skip
BY_NAME = {episode.name: episode for episode in EPISODES}

# The "ad": a buzzy two-tone chime, unmistakably not part of any episode, then a short pause.
AD_TONES = (988.0, 740.0)  # B5, F#5
AD_NOTE_SECONDS = 0.25
AD_NOTES = 8  # 2 s of chime
AD_PAUSE_SECONDS = 0.2


def _note(frequency: float, seconds: float, harmonics: Iterable[tuple[int, float]]) -> list[float]:
    """One note as floats in [-1, 1], with a soft attack and a decay, so notes do not click."""
    count = round(seconds * RATE)
    if frequency == REST:
        return [0.0] * count
    parts = tuple(harmonics)
    norm = sum(weight for _, weight in parts)
    attack = max(1, round(0.01 * RATE))
    release = max(1, round(0.03 * RATE))
    samples = []
    for i in range(count):
        t = i / RATE
        envelope = min(1.0, i / attack) * math.exp(-2.5 * t) * min(1.0, (count - i) / release)
        value = sum(w * math.sin(2 * math.pi * frequency * k * t) for k, w in parts) / norm
        samples.append(value * envelope)
    return samples


# A mellow tone for the episodes; odd harmonics (a band-limited square) make the ad buzz.
MELLOW = ((1, 1.0), (2, 0.3), (3, 0.1))
BUZZY = ((1, 1.0), (3, 0.33), (5, 0.2))


def melody_samples(melody: Iterable[tuple[float, float]], transpose: float = 1.0) -> list[float]:
    samples: list[float] = []
    for frequency, seconds in melody:
        samples += _note(frequency * transpose, seconds, MELLOW)
    return samples


def ad_samples() -> list[float]:
    samples: list[float] = []
    for i in range(AD_NOTES):
        samples += _note(AD_TONES[i % 2], AD_NOTE_SECONDS, BUZZY)
    return samples + [0.0] * round(AD_PAUSE_SECONDS * RATE)


def ad_frames() -> int:
    """How many frames longer an ad-supported copy is than the ad-free one."""
    return AD_NOTES * round(AD_NOTE_SECONDS * RATE) + round(AD_PAUSE_SECONDS * RATE)


def wav_bytes(samples: list[float], volume: float = 0.6) -> bytes:
    frames = struct.pack(
        f"<{len(samples)}h", *(round(max(-1.0, min(1.0, s)) * volume * FULL_SCALE) for s in samples)
    )
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(SAMPLE_WIDTH)
        out.setframerate(RATE)
        out.writeframes(frames)
    return buffer.getvalue()


def render(kind: str, episode: Episode) -> bytes:
    """The exact bytes of one file."""
    if kind == AD_FREE:
        return wav_bytes(melody_samples(episode.melody))
    if kind == AD_SUPPORTED:
        return wav_bytes(ad_samples() + melody_samples(episode.melody))
    if kind == BONUS:
        return wav_bytes(melody_samples(episode.melody, transpose=2.0))
    raise ValueError(f"unknown kind {kind!r}")


def media_path(media: Path, kind: str, name: str) -> Path:
    return media / kind / f"{name}.wav"


def ensure_media(media: Path) -> dict[tuple[str, str], Path]:
    """Write every file that is missing or differs from what it should be; return all paths."""
    made: dict[tuple[str, str], Path] = {}
    for kind in KINDS:
        (media / kind).mkdir(parents=True, exist_ok=True)
        for episode in EPISODES:
            path = media_path(media, kind, episode.name)
            wanted = render(kind, episode)
            try:
                current = path.read_bytes()
            except FileNotFoundError:
                current = None
            if current != wanted:
                # Write beside and rename, so a reader never sees half a file.
                partial = path.with_suffix(".wav.partial")
                partial.write_bytes(wanted)
                os.replace(partial, path)
                log.info("podcast: wrote %s (%d bytes)", path, len(wanted))
            made[kind, episode.name] = path
    return made


def duration(path: Path) -> float:
    """Seconds of audio in a WAV file."""
    with wave.open(str(path), "rb") as wav:
        return wav.getnframes() / wav.getframerate()


def _base_url(request: web.Request) -> str:
    # The Host the request came in on: read through the paywall proxy (keep_host_header), the
    # feed points players at the proxy, not at this origin behind it.
    return f"{request.scheme}://{request.host}"


def feed_xml(base: str, media: Path) -> str:
    items = []
    for episode in EPISODES:
        url = f"{base}/{AD_SUPPORTED}/{episode.name}.wav"
        size = media_path(media, AD_SUPPORTED, episode.name).stat().st_size
        items.append(
            "<item>"
            f"<title>{xml_escape(episode.title)}</title>"
            f"<description>{xml_escape(episode.summary)}</description>"
            f"<pubDate>{episode.published}</pubDate>"
            f'<guid isPermaLink="false">l402proxy-demo-{episode.name}</guid>'
            f"<enclosure url={quoteattr(url)} type={quoteattr(AUDIO_TYPE)} "
            f'length="{size}"/>'
            "</item>"
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<rss version="2.0"><channel>'
        "<title>Sample podcast</title>"
        f"<link>{xml_escape(base)}/</link>"
        "<description>The l402proxy demo podcast: free with ads, ad-free for a few sats."
        "</description>"
        "<language>en</language>"
        f"{''.join(items)}"
        "</channel></rss>\n"
    )


def index_html(price_sat: int) -> str:
    episodes = []
    for episode in EPISODES:
        src = f"/{AD_SUPPORTED}/{episode.name}.wav"
        pay = f"{PAY_PATH}?path={src}&return=/"
        episodes.append(
            f"<section><h2>{escape(episode.title)}</h2><p>{escape(episode.summary)}</p>"
            f'<audio controls preload="none" src="{escape(src)}"></audio>'
            f'<p><a href="{escape(pay)}">Go ad-free for {price_sat} sats</a></p></section>'
        )
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>Sample podcast</title>"
        '<link rel="alternate" type="application/rss+xml" title="Sample podcast" href="/feed.xml">'
        "<style>body{font-family:system-ui,sans-serif;max-width:40rem;margin:2rem auto;"
        "padding:0 1rem;line-height:1.5}section{border-top:1px solid #ddd;padding:.5rem 0}"
        "audio{width:100%}.note{color:#555}</style></head><body>"
        "<h1>Sample podcast</h1>"
        "<p>Every player gets the episodes free, with a short ad up front.</p>"
        f'<p class="note">A player or browser using the l402proxy client proxy pays {price_sat}'
        " sats once and gets the ad-free file automatically, at the same address.</p>"
        f"{''.join(episodes)}"
        f'<p class="subscribe"><a href="{escape(subscribe_link())}">Subscribe ad-free</a>: pay '
        f"{price_sat} sats once and the page gives you a private feed address for any podcast "
        "app, every episode without the ad.</p>"
        '<p class="note"><a href="/feed.xml">RSS feed</a> (with the ads)</p>'
        "</body></html>\n"
    )


def subscribe_link() -> str:
    """The paywall page for an episode: paying there shows the private feed's URL (the rules'
    `feed: /feed.xml`), then leads back to this page; a browser that paid already is shown its
    feed's URL at once (subscribe=1)."""
    return f"{PAY_PATH}?path=/{AD_SUPPORTED}/{EPISODES[0].name}.wav&return=/&subscribe=1"


def seen(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    # Which file the origin served: through the paywall, /episodes/... shows up here as
    # /adfree/... for a paying client.
    response.headers["X-Origin-Path"] = request.path_qs
    return response


def _audio(kind: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        episode = BY_NAME.get(name.removesuffix(".wav")) if name.endswith(".wav") else None
        if episode is None:
            return seen(request, web.Response(status=404, text="no such episode\n"))
        path = media_path(request.app["media"], kind, episode.name)
        # FileResponse answers Range requests (players and <audio> send "Range: bytes=0-").
        # no-cache: the same URL is the ad-free file once the listener has paid, so a browser
        # must not replay the ad version from its cache.
        headers = {"Content-Type": AUDIO_TYPE, "Cache-Control": "no-cache"}
        response = web.FileResponse(path, headers=headers)
        return seen(request, response)

    return handler


async def _index(request: web.Request) -> web.StreamResponse:
    page = index_html(request.app["price_sat"])
    return seen(request, web.Response(text=page, content_type="text/html"))


async def _feed(request: web.Request) -> web.StreamResponse:
    rss = feed_xml(_base_url(request), request.app["media"])
    return seen(request, web.Response(text=rss, content_type="application/rss+xml"))


def make_app(media: Path, price_sat: int = DEFAULT_PRICE_SAT) -> web.Application:
    """The podcast origin serving the files under `media` (see ensure_media)."""
    app = web.Application()
    app["media"] = media
    app["price_sat"] = price_sat
    app.router.add_get("/", _index)
    app.router.add_get("/feed.xml", _feed)
    for kind in KINDS:
        app.router.add_get(f"/{kind}/{{name}}", _audio(kind))
    return app


def command(
    port: int, media: Path, *, host: str = "127.0.0.1", price_sat: int = DEFAULT_PRICE_SAT
) -> list[str]:
    """How to start this origin as its own process (what the demo and the tests run)."""
    return [
        sys.executable, "-m", "l402proxy.podcast",
        "--host", host, "--port", str(port), "--media", str(media),
        "--price-sat", str(price_sat),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="sample podcast origin with real audio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--media", type=Path, required=True, help="folder for the WAV files")
    parser.add_argument("--price-sat", type=int, default=DEFAULT_PRICE_SAT, help="shown on /")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ensure_media(args.media)
    web.run_app(
        make_app(args.media, args.price_sat),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
    )


if __name__ == "__main__":
    main()
