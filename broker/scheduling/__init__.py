"""The scheduling wing: pure policy. It imports nothing from Redis, Celery, kombu or
``broker.store`` (tests/test_layout.py holds that rule).

- ``config``: the pool's ``SchedulingConfig`` (ordering, mode, placement, preemption, tenants);
- ``model``: the value types a pass works on (``Snapshot`` in, ``Plan`` out, ``NodeFree``);
- ``ordering``: one function per ordering (``ORDERINGS``);
- ``planner``: the pass (estimate, order, admit, explain);
- ``preemption`` (``gang_preemption``: a gang's victims on several nodes), ``explain``,
  ``timeline`` (backfill holds, earliest starts), ``fairshare``;
- ``placement/``: one module per placer (``PLACERS``);
- ``demand``: more nodes of each shape the planner would use now (``gpubroker_wanted_nodes``).
"""
