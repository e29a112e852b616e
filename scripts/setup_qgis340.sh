#!/usr/bin/env bash
# Build, once and idempotently, a Debian 13 (trixie) chroot holding QGIS 3.40 for the plugin's second test run.
# Keyed on a hash of its package list: a rerun with nothing to do takes well under a second.
# Where it cannot be built (not root, no debootstrap and no apt to install it), it says so in one line and exits 3,
# and `make test` reports the 3.40 run as NOT RUN (never as passed).
set -euo pipefail
ROOT=${GEO_R1_QGIS340_ROOT:-/var/cache/geo-r1/qgis-3.40}
PKGS=(python3-qgis qgis-providers python3-pytest python3-numpy)
say() { printf '[setup 3.40] %s\n' "$*" >&2; }
want=$(printf '%s\n' trixie "${PKGS[@]}" | sha256sum | cut -c1-16)
if [[ "$(cat "$ROOT/.geo-r1-stamp" 2>/dev/null)" == "$want" ]]; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  say "not built: building the QGIS 3.40 chroot needs root (debootstrap, chroot); run 'sudo make setup'"; exit 3
fi
if ! command -v debootstrap >/dev/null; then
  if command -v apt-get >/dev/null; then
    say "installing debootstrap"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  else
    say "not built: no debootstrap and no apt-get to install it"; exit 3
  fi
fi
t0=$(date +%s)
tmp="$ROOT.tmp"
rm -rf "$tmp"
mkdir -p "$(dirname "$ROOT")"
say "debootstrap --variant=minbase trixie -> $ROOT (about a minute)"
# The host's own Debian mirror (this project names no package host itself).
mirror=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[[ -n "$mirror" ]] || mirror=$(awk '/^deb / && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[[ -n "$mirror" ]] || { say "not built: no Debian mirror found in /etc/apt"; exit 3; }
debootstrap --variant=minbase trixie "$tmp" "$mirror" >"$tmp.log" 2>&1 || {
  say "not built: debootstrap failed; the last lines of $tmp.log:"; tail -n 5 "$tmp.log" >&2; exit 3; }
say "installing ${PKGS[*]} in the chroot (about five minutes)"
cp /etc/resolv.conf "$tmp/etc/resolv.conf" 2>/dev/null || true
mount -t proc proc "$tmp/proc"
trap 'umount "$tmp/proc" 2>/dev/null || true' EXIT
if ! chroot "$tmp" /bin/sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ${PKGS[*]}" >>"$tmp.log" 2>&1; then
  say "not built: installing QGIS 3.40 failed; the last lines of $tmp.log:"; tail -n 5 "$tmp.log" >&2; exit 3
fi
umount "$tmp/proc"
trap - EXIT
chroot "$tmp" /usr/bin/python3 -c "import qgis.core; print(qgis.core.Qgis.QGIS_VERSION)" > "$tmp/.qgis-version"
echo "$want" > "$tmp/.geo-r1-stamp"
rm -rf "$ROOT"
mv "$tmp" "$ROOT"
rm -f "$tmp.log"
say "ready: QGIS $(cat "$ROOT/.qgis-version") in $ROOT, built in $(( $(date +%s) - t0 )) s"
