"""Engine management: start, stop and watch the local engine (QProcess), set up its venv (setup/), the
fine-tuning jobs client, and a panel run as a QgsTask."""
