#!/usr/bin/env bash
# Install or upgrade peerfed as a system service. Safe to run again: it never overwrites
# the config or the identity key, and restarts the service only if it is running.
#
#   sudo deploy/install.sh              # install from the repository this script lives in
#   sudo deploy/install.sh peerfed==0.2 # or from PyPI (any pip requirement or path)
#
# Environment: PYTHON (default python3), PEERFED_PREFIX (default /opt/peerfed).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source_spec=${1:-$(dirname "$here")}
python=${PYTHON:-python3}
prefix=${PEERFED_PREFIX:-/opt/peerfed}
venv=$prefix/venv
user=peerfed
config_dir=/etc/peerfed
config=$config_dir/peerfed.toml
state_dir=/var/lib/peerfed
cache_dir=/var/cache/peerfed
unit_dir=/etc/systemd/system

say() { printf '==> %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0 ${*:-})"
command -v systemd-sysusers >/dev/null || die "systemd-sysusers not found; this script needs systemd"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || die "$python is missing or older than 3.11 (set PYTHON=/path/to/python3.11+)"

say "service account '$user'"
install -D -m 0644 "$here/peerfed.sysusers" /etc/sysusers.d/peerfed.conf
systemd-sysusers /etc/sysusers.d/peerfed.conf

if [ ! -x "$venv/bin/python" ]; then
    say "virtual environment $venv"
    "$python" -m venv "$venv" || die "could not create $venv (Debian/Ubuntu: apt install python3-venv)"
fi
say "installing peerfed from $source_spec"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet --upgrade "$source_spec"
install -m 0644 "$here/README.md" "$prefix/README.md"

# Created here too (systemd creates them at start) because `peerfed init` needs the state dir.
install -d -m 0700 -o "$user" -g "$user" "$state_dir" "$cache_dir"
install -d -m 0755 "$config_dir"
if [ ! -e "$config" ]; then
    say "config $config (from peerfed.example.toml)"
    install -m 0640 -o root -g "$user" "$here/peerfed.example.toml" "$config"
else
    say "keeping existing config $config"
fi

if [ ! -e "$state_dir/identity.key" ]; then
    # `init` writes the key and a node config next to it, and refuses if either exists.
    [ ! -e "$state_dir/peerfed.toml" ] \
        || die "$state_dir/peerfed.toml exists but no identity key: move it away and run again"
    say "identity key $state_dir/identity.key"
    (cd / && umask 077 && runuser -u "$user" -- "$venv/bin/peerfed" init --home "$state_dir" >/dev/null)
    # The service reads $config; the copy init wrote would only mislead whoever edits it.
    rm -f "$state_dir/peerfed.toml"
else
    say "keeping existing identity key $state_dir/identity.key"
fi

install -m 0644 "$here/peerfed.service" "$unit_dir/peerfed.service"
if [ -d /etc/ufw/applications.d ]; then
    install -m 0644 "$here/ufw-peerfed" /etc/ufw/applications.d/peerfed
fi

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable peerfed.service
    systemctl try-restart peerfed.service  # an upgrade: running nodes pick up the new code
else
    say "systemd is not running here: skipped daemon-reload/enable"
fi

say "this node:"
"$venv/bin/peerfed" id --config "$config" || say "(fix $config, then: $venv/bin/peerfed id --config $config)"

cat <<EOF

peerfed is installed. Next:
  edit $config (bootstrap peers, network), then: peerfed config check --config $config
  sudo systemctl start peerfed
  journalctl -u peerfed -f
  open the ports if you use ufw: sudo ufw allow peerfed
EOF
