#!/usr/bin/env bash
# Run a command in a private network namespace whose loopback is rate-limited, so that the
# link, not this machine's CPU, is the bottleneck (as between two homes). Needs root (ip, tc).
#   benchmarks/shaped_loopback.sh RATE command...    e.g. RATE = 2gbit
# Both directions of a loopback transfer share the one qdisc: 2gbit there models a full-duplex
# 1 Gbit/s link when both directions are busy at once. Nothing leaves the namespace.
set -euo pipefail
rate=${1:?usage: shaped_loopback.sh RATE command...}
shift
ns="peerfed-bench-$$"
ip netns add "$ns"
trap 'ip netns del "$ns"' EXIT
ip netns exec "$ns" ip link set lo up
# burst must hold lo's 64 KiB segments; latency bounds the queue.
ip netns exec "$ns" tc qdisc add dev lo root tbf rate "$rate" burst 1mb latency 100ms
ip netns exec "$ns" "$@"
