#!/usr/bin/env bash
# The plugin's test suite under a Debian 13 chroot's QGIS (scripts/setup_qgis_chroot.sh builds it):
#   scripts/test_plugin_chroot.sh 3.40 [pytest options]   QGIS 3.40 LTR (trixie)
#   scripts/test_plugin_chroot.sh 3.44 [pytest options]   QGIS 3.44 LTR (trixie-backports)
# The repository, ../shared and /tmp are bind-mounted at the same paths, so both sides see the same files; the
# engine's venv commands the tests need run on the host through scripts/host_exec_server.py (the chroot shares
# the host's loopback). A chroot that cannot be built is reported as NOT RUN and fails the run, never passes it
# (set GEO_R1_ALLOW_NO_QGIS340=1 / GEO_R1_ALLOW_NO_QGIS344=1 to accept that on a machine without root).
set -euo pipefail
VERSION=${1:?usage: test_plugin_chroot.sh 3.40|3.44 [pytest options]}
shift
cd "$(dirname "$0")/.."
REPO=$(pwd -P)
case "$VERSION" in
  3.40) ROOT=${GEO_R1_QGIS340_ROOT:-/var/cache/geo-r1/qgis-3.40}; DEBIAN="Debian 13";;
  3.44) ROOT=${GEO_R1_QGIS344_ROOT:-/var/cache/geo-r1/qgis-3.44}; DEBIAN="Debian 13 + trixie-backports";;
  *) echo "test_plugin_chroot.sh: no chroot for QGIS '$VERSION' (3.40 or 3.44)" >&2; exit 2;;
esac
allow_var="GEO_R1_ALLOW_NO_QGIS${VERSION//./}"
SHARED=$(cd .. && pwd -P)/shared
set +e
scripts/setup_qgis_chroot.sh "$VERSION"
rc=$?
set -e
if [[ $rc -ne 0 ]]; then
  echo "=================================================================================="
  echo "QGIS $VERSION plugin tests: NOT RUN (the chroot could not be built; see the line above)"
  echo "=================================================================================="
  [[ "${!allow_var:-0}" == 1 ]] && exit 0
  exit 1
fi
mounts=()
cleanup() {
  [[ -n "${helper_pid:-}" ]] && kill "$helper_pid" 2>/dev/null || true
  for ((i=${#mounts[@]}-1; i>=0; i--)); do umount -l "${mounts[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
bind() {  # bind SRC at the same path inside the chroot
  mkdir -p "$ROOT$1"
  mount --bind "$1" "$ROOT$1"
  mounts+=("$ROOT$1")
}
mount -t proc proc "$ROOT/proc"; mounts+=("$ROOT/proc")
bind /dev
bind /tmp
bind "$REPO"
[[ -d "$SHARED" ]] && bind "$SHARED"
portfile=$(mktemp)
.venv/bin/python scripts/host_exec_server.py "$portfile" &
helper_pid=$!
for _ in $(seq 50); do [[ -s "$portfile" ]] && break; sleep 0.1; done
read -r port token < "$portfile"
rm -f "$portfile"
echo "QGIS $(cat "$ROOT/.qgis-version") ($DEBIAN chroot $ROOT): the plugin's test suite"
args=""  # pytest options, quoted for the shell inside the chroot; none is no argument (pytest 9 reads '' as '.')
(( $# )) && args=$(printf ' %q' "$@")
chroot "$ROOT" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8 QT_QPA_PLATFORM=offscreen \
  GEO_R1_HOST_EXEC="127.0.0.1:$port" GEO_R1_HOST_EXEC_TOKEN="$token" \
  /bin/sh -c "cd '$REPO' && python3 -m pytest tests/geo_r1_qgis --ignore=tests/geo_r1_qgis/core -p no:cacheprovider$args"
