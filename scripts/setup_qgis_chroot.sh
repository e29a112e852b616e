#!/usr/bin/env bash
# Build, once and idempotently, a Debian 13 (trixie) chroot holding one QGIS version for the plugin's test runs:
#   scripts/setup_qgis_chroot.sh 3.40   trixie's own qgis (3.40 LTR)  -> /var/cache/geo-r1/qgis-3.40
#   scripts/setup_qgis_chroot.sh 3.44   trixie-backports' qgis (3.44 LTR) -> /var/cache/geo-r1/qgis-3.44
# Keyed on a hash of its suites and package list: a rerun with nothing to do takes well under a second.
# The QGIS it got must be the version asked for (apt may move on): otherwise it is not built.
# Where it cannot be built (not root, no debootstrap and no apt to install it), it says so in one line and exits 3,
# and `make test` reports that version's run as NOT RUN (never as passed).
set -euo pipefail
VERSION=${1:?usage: setup_qgis_chroot.sh 3.40|3.44}
PKGS=(python3-qgis qgis-providers python3-pytest python3-numpy)
case "$VERSION" in
  3.40) SUITES=(trixie); ROOT=${GEO_R1_QGIS340_ROOT:-/var/cache/geo-r1/qgis-3.40};;
  3.44) SUITES=(trixie trixie-backports); ROOT=${GEO_R1_QGIS344_ROOT:-/var/cache/geo-r1/qgis-3.44};;
  *) echo "setup_qgis_chroot.sh: no chroot for QGIS '$VERSION' (3.40 or 3.44)" >&2; exit 2;;
esac
say() { printf '[setup %s] %s\n' "$VERSION" "$*" >&2; }
want=$(printf '%s\n' "${SUITES[@]}" "${PKGS[@]}" | sha256sum | cut -c1-16)
if [[ "$(cat "$ROOT/.geo-r1-stamp" 2>/dev/null)" == "$want" ]]; then
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  say "not built: building the QGIS $VERSION chroot needs root (debootstrap, chroot); run 'sudo make test'"; exit 3
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
for suite in "${SUITES[@]:1}"; do
  echo "deb $mirror $suite main" >> "$tmp/etc/apt/sources.list"
done
target=()
[[ ${#SUITES[@]} -gt 1 ]] && target=(-t "${SUITES[-1]}")  # QGIS and what it needs from the newest suite
say "installing ${PKGS[*]} from ${SUITES[-1]} in the chroot (about five minutes)"
cp /etc/resolv.conf "$tmp/etc/resolv.conf" 2>/dev/null || true
mount -t proc proc "$tmp/proc"
trap 'umount "$tmp/proc" 2>/dev/null || true' EXIT
if ! chroot "$tmp" /bin/sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ${target[*]} ${PKGS[*]}" >>"$tmp.log" 2>&1; then
  say "not built: installing QGIS $VERSION failed; the last lines of $tmp.log:"; tail -n 5 "$tmp.log" >&2; exit 3
fi
umount "$tmp/proc"
trap - EXIT
chroot "$tmp" /usr/bin/python3 -c "import qgis.core; print(qgis.core.Qgis.QGIS_VERSION)" > "$tmp/.qgis-version"
got=$(cat "$tmp/.qgis-version")
if [[ "$got" != "$VERSION".* ]]; then
  say "not built: apt installed QGIS $got, not $VERSION (the suites ${SUITES[*]} moved on); $tmp kept"; exit 3
fi
chroot "$tmp" dpkg-query -W -f='${Package} ${Version}\n' > "$tmp/.packages"
echo "$want" > "$tmp/.geo-r1-stamp"
rm -rf "$ROOT"
mv "$tmp" "$ROOT"
rm -f "$tmp.log"
say "ready: QGIS $got in $ROOT, built in $(( $(date +%s) - t0 )) s"
