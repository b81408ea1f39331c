"""``make bench``: the worker's throughput, latency and memory against a no-op Celery task and
a naive relay, measured in one run on the same brokers (see ``bench/run.py``)."""
