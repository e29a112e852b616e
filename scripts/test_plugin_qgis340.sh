#!/usr/bin/env bash
# The plugin's test suite under QGIS 3.40 (kept for the commands that name it): scripts/test_plugin_chroot.sh 3.40.
exec "$(dirname "$0")/test_plugin_chroot.sh" 3.40 "$@"
