"""gpubroker's worker side: the Celery app, the node agent and the built-in tasks."""
