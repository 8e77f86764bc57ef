-- heartbeat.lua: renew a node's lease.
--
-- Only the incarnation that registered last may renew, so a stale worker process
-- (replaced under the same node id) learns it is fenced off instead of keeping a
-- lease for capacity that is no longer its own.
--
-- It runs even while Redis is out of memory (a few bytes each): a full Redis must not
-- look like a lost node, whose running tasks would stop themselves (workers/fence.py).
--
-- Transitions: none
-- Flags: allow-oom
-- Includes: _lib.lua
--
-- KEYS[1] node        hash of the node
-- KEYS[2] leases      zset node id -> lease expiry (ms)
-- ARGV[1] node_id
-- ARGV[2] incarnation the renewing worker process
-- ARGV[3] now         ms since epoch
-- ARGV[4] lease_ms    lease length (ms)
-- Returns {code}:
--   0 OK
--   1 NOT_REGISTERED  no such node (e.g. Redis lost its data): register again
--   2 FENCED          another incarnation owns the node id now: stop
--   3 REAPED          the lease had expired and the node was reaped: register again

local node = redis.call('HMGET', KEYS[1], 'incarnation', 'state')
if not node[1] then return {1} end
if node[1] ~= ARGV[2] then return {2} end
if node[2] ~= 'up' then return {3} end
local now = tonumber(ARGV[3])
redis.call('ZADD', KEYS[2], int(now + tonumber(ARGV[4])), ARGV[1])
redis.call('HSET', KEYS[1], 'heartbeat_at', now)
return {0}
