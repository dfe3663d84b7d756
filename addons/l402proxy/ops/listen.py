"""Where an operations endpoint (metrics, admin API) listens: `host:port` parsed, checked, and
kept on loopback unless the operator says otherwise. Plain functions, no I/O but the bind."""

import ipaddress
import socket

LOOPBACK_NAMES = ("localhost",)


class ListenError(ValueError):
    """A listen address that cannot be used, as one line for the option's error."""


def parse_listen(value: str, *, option: str, allow_remote: bool = False) -> tuple[str, int]:
    """`127.0.0.1:9402`, `[::1]:9402`, `localhost:9402` or `:9402` (loopback) -> (host, port).

    Anything but a loopback address is refused unless `allow_remote`: these endpoints show
    revenue and can revoke tokens, and an operator who opens one to the network must say so.
    """
    text = value.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ListenError(f"{option}: {value!r} is not [IPv6]:port (e.g. [::1]:9402)")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ListenError(f"{option}: {value!r} is not host:port (e.g. 127.0.0.1:9402)")
        if ":" in host:
            raise ListenError(f"{option}: write an IPv6 address in brackets: [{host}]:{port_text}")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ListenError(f"{option}: port {port_text!r} is not a number from 1 to 65535")
    host = host or "127.0.0.1"
    if not allow_remote and not is_loopback(host):
        raise ListenError(
            f"{option}: {host} is not a loopback address; listen on 127.0.0.1 or ::1, or allow "
            "other machines explicitly (and put TLS in front)"
        )
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int, *, option: str) -> socket.socket:
    """A listening TCP socket on (host, port); ListenError (one line) when it cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ListenError(f"{option}: cannot resolve {host}: {exc}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        why = exc.strerror or exc
        raise ListenError(f"{option}: cannot listen on {host}:{port}: {why}") from exc
    return sock
