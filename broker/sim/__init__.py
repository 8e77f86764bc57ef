"""The simulation wing: tools that run the broker offline or locally; nothing in the core imports it.

- ``engine``: trace replay through the real dispatcher and Lua scripts under a virtual clock;
- ``traces`` (and ``trace_rows``): trace and cluster readers; ``results``: what a run returns;
- ``report``: figures, tables and plots; ``capacity``: how many nodes meet a target;
- ``localcluster``: a private redis-server and gpubroker processes on this machine.
"""
