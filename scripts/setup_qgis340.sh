#!/usr/bin/env bash
# The QGIS 3.40 chroot (kept for the commands that name it): scripts/setup_qgis_chroot.sh 3.40.
exec "$(dirname "$0")/setup_qgis_chroot.sh" 3.40 "$@"
