"""Flower settings for gpubroker: ``celery -A broker.celery_conf:app flower --conf=config/flowerconfig.py``.

Flower executes this file and reads its module-level names as options (``flower/options.py``
lists them all). Precedence, lowest first: FLOWER_* environment variables, then this file, then
the command line. So an option set here overrides its FLOWER_* variable.

Authentication: ``basic_auth`` is deliberately NOT set here (setting it would override the
environment). It comes from the environment variable FLOWER_BASIC_AUTH="user:password" (several
users: "alice:pw1,bob:pw2"), and it MUST be set: without it Flower's UI and API, which can revoke
tasks and shut workers down, are open to anyone who can reach the port. docker-compose.yml
refuses to start without it. Flower leaves ``/metrics`` and ``/healthcheck`` unauthenticated.

The broker connection is not configured here: the ``broker.celery_conf:app`` application reads
GPUBROKER_REDIS_URL and carries the transport options every gpubroker process shares.

This directory is deployable configuration, not a Python package (no ``__init__.py``).
"""

# Listen on every interface inside the container; docker-compose.yml publishes the port.
address = "0.0.0.0"
port = 5555

# Keep Flower stateless: task history lives in memory only (gpubroker's own task records in
# Redis are the source of truth; see `gpubroker status` and `gpubroker queue`).
persistent = False

# Bound Flower's memory: the most recent tasks and workers it keeps.
max_tasks = 10000
max_workers = 1000

# Compose workers take their node id from the container hostname, so a recreated container is a
# new node; drop workers that have been offline for 10 minutes from the dashboard.
purge_offline_workers = 600

# Milliseconds Flower waits for workers to answer inspect commands.
inspect_timeout = 2000.0

# The columns of the /tasks page.
tasks_columns = "name,uuid,state,received,started,runtime,worker,retries"

# Behind a reverse proxy that sets X-Real-Ip / X-Scheme, and serving under a path prefix:
# xheaders = True
# url_prefix = "flower"
