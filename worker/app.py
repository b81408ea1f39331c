"""What ``celery -A worker.app worker`` (and ``flower``) loads: the app, built from the
environment's settings. Nothing else imports this module; code that needs an app calls
``worker.application.create_app``."""

from worker.application import create_app

app = create_app()
