#!/usr/bin/env bash
# Set up both environments, idempotently. Rerunning it when nothing changed takes seconds.
#   1. QGIS's Python: Debian's python3-qgis + qgis-providers (+ python3-pytest for the plugin tests).
#   2. The engine/train venv (.venv): the ML stack, torch pinned to the local CPU wheel by constraints.txt.
#   --venv: the venv only (what `make demo` and `make demo-train` use): of the Debian packages, only python3-venv.
#   The QGIS 3.40 chroot is built by `make test-plugin-340` (scripts/setup_qgis340.sh), the only target using it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_ONLY=0
[[ "${1:-}" == "--venv" ]] && VENV_ONLY=1

SYSTEM_PKGS=(python3-qgis qgis-providers python3-pytest python3-venv gdal-bin
             qgis xvfb xdotool)  # the last three: the desktop test (tests/geo_r1_qgis/test_desktop.py)
((VENV_ONLY)) && SYSTEM_PKGS=(python3-venv)
VENV=.venv
SYS_PY=/usr/bin/python3

say() { printf '[setup] %s\n' "$*" >&2; }

missing=()
for pkg in "${SYSTEM_PKGS[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO=(sudo)
  else
    say "ERROR: these Debian packages are missing: ${missing[*]}"
    say "Installing them needs root. Run:  sudo apt-get install -y ${missing[*]}"
    say "then run this command again (or run 'sudo make setup')."
    exit 1
  fi
  say "installing Debian packages: ${missing[*]}"
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating $VENV with $SYS_PY"
  "$SYS_PY" -m venv "$VENV"
fi

stamp_want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
stamp_file="$VENV/.geo-r1-setup"
if [[ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp_want" ]]; then
  say "installing the engine/train environment into $VENV (torch pinned by constraints.txt)"
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  log="$VENV/setup.log"
  pipi() {
    if ! "$VENV/bin/pip" install -c constraints.txt "$@" >>"$log" 2>&1; then
      say "ERROR: pip install $* failed; the last lines of $log:"; tail -n 25 "$log" >&2; exit 1
    fi
  }
  : >"$log"
  pipi --upgrade pip
  # torch first, pinned, so nothing later resolves a CUDA build.
  pipi "torch==2.13.0"
  pipi -e ".[dev]"
  "$VENV/bin/python" - <<'PY'
import importlib.util, sys
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert not torch.version.cuda, "a CUDA torch build was installed; check constraints.txt"
for mod in ("transformers", "peft", "trl", "rasterio", "pyogrio", "fastapi", "uvicorn", "ray"):
    if importlib.util.find_spec(mod) is None:
        sys.exit(f"[setup] ERROR: {mod} did not install")
PY
  echo "$stamp_want" > "$stamp_file"
fi
if ((VENV_ONLY)); then
  say "ready: venv $VENV"
else
  say "ready: QGIS Python $($SYS_PY -c 'import qgis.core; print(qgis.core.Qgis.QGIS_VERSION)' 2>/dev/null | cut -d- -f1), venv $VENV"
fi
