"""Setting up the engine's own venv from inside QGIS (issue 12).

- :mod:`.venv`: where the engine venv and its ``geo-r1`` are, its install record, "Check" (stdlib only)
- :mod:`.installer`: find a Python, choose torch, plan and run the steps, swap the venvs (stdlib only)
- :mod:`.task`: the setup and the check as QgsTasks
- :mod:`.dialog`: the "Set up the Geo-R1 engine" dialog
"""
