"""The store wing: everything that knows Redis bytes.

- ``keys``: every key name, the key table, the fields of the task and node hashes;
- ``records``: every stored format, encoded and decoded (and the state transition table);
- ``connection``: the one way to connect, and the two raw fast paths below redis-py;
- ``scripts``: typed wrappers around ``lua/`` (one script per state change);
- ``reads``: read-only views for the client, the CLI and the dispatcher.
"""
