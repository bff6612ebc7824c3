"""py-libp2p's log records in ours: one line each, at WARNING at most, rate-limited; and its
nested errors as one line (``error_chain``).

Owner: none; ``adopt_libp2p_logger()`` is idempotent and called when net/p2p.py is imported.
"""

from __future__ import annotations

import logging

from peerfed.net.quiet import OneLineRelay


def adopt_libp2p_logger() -> None:
    """py-libp2p cuts its logger off from ours when imported (unless LIBP2P_DEBUG is set),
    which would hide its warnings; call again after importing it. Its records go to our
    handlers through OneLineRelay (one line each, rate-limited), not by propagation."""
    libp2p_logger = logging.getLogger("libp2p")
    libp2p_logger.propagate = False
    libp2p_logger.setLevel(logging.NOTSET)
    if not any(isinstance(h, OneLineRelay) for h in libp2p_logger.handlers):
        # Its errors are about a connection or a peer (often the peer's doing), not our node's
        # health: at most WARNING, like our own lines about a peer's bad input.
        libp2p_logger.addHandler(OneLineRelay(max_level=logging.WARNING))
    # Every failed dial to a peer that is down logs an ERROR here, several a second; the
    # membership service logs each failed attempt once, with its reason.
    logging.getLogger("libp2p.transport.tcp.tcp").setLevel(logging.CRITICAL)
    logging.getLogger("libp2p.network.auto_connector").setLevel(logging.WARNING)  # we stop it
    for name in ("libp2p.host.basic_host", "libp2p.network.swarm"):
        stream_log = logging.getLogger(name)
        if not any(isinstance(f, _RefusedProtocolFilter) for f in stream_log.filters):
            stream_log.addFilter(_RefusedProtocolFilter())


class _RefusedProtocolFilter(logging.Filter):
    """Drops py-libp2p's multi-line ERROR for a stream the peer refused (_trio_request raises
    ForeignPeer for it and membership logs it once, in one line) or hung up on while it was
    being negotiated (a foreign peer closing the connection: the caller gets the error)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not (text.startswith("Failed to open stream")
                    and ("not supported" in text or "protocol read failed" in text)
                    # a peer's AutoNAT dial-back (net/autonat.py) hangs up after the handshake
                    or text.startswith("fail to upgrade mux"))


def error_chain(exc: BaseException) -> str:
    """The innermost useful message of a libp2p dial error (they nest several deep)."""
    messages = []
    while exc is not None and len(messages) < 4:
        messages.append(str(exc) or type(exc).__name__)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return "; ".join(dict.fromkeys(messages))
