"""peerfed: a peer-to-peer training daemon (gossip weight averaging over signed messages)."""

__version__ = "0.1.0"
