"""Render the "Set up the Geo-R1 engine" dialog to a PNG, headless (run with /usr/bin/python3).

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 scripts/render_setup_dialog.py OUT.png [--log SETUP.LOG]

The dialog as a user opens it on this machine (the Python it finds, what nvidia-smi says, the default venv
path). With ``--log``, the log view shows the end of a real setup log (``engine-setup.log``) and the status
line its last message, as the dialog looks when an install has finished.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qgis.core import QgsApplication


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--log", type=Path, default=None)
    ap.add_argument("--source", choices=("index", "wheel", "wheelhouse"), default="wheelhouse")
    ap.add_argument("--source-path", default="/media/usb/geo-r1-wheelhouse")
    args = ap.parse_args()
    app = QgsApplication([], True)
    app.initQgis()
    from geo_r1_qgis.engine_control.setup.dialog import SetupDialog

    dialog = SetupDialog(None)
    dialog._select(dialog.source_combo, args.source)
    dialog.source_path.setText(args.source_path)
    if args.log is not None:
        lines = args.log.read_text(encoding="utf-8").splitlines()
        for line in lines[-22:]:
            dialog.append_log(line)
        dialog.status.setText(lines[-1])
        dialog.progress.setValue(100)
    dialog.show()
    app.processEvents()
    dialog.grab().save(str(args.out))
    dialog.close()
    app.exitQgis()
    return 0


if __name__ == "__main__":
    sys.exit(main())
