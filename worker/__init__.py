"""totango-worker: a Celery worker that relays events to Totango's HTTP collection gateway."""

__version__ = "0.1.0"
