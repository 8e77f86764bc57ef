-- forget.lua: remove a node from the pool (gpubroker nodes remove, a worker leaving, or a
-- node down for longer than node_forget_after_s).
--
-- An operator or the dispatcher may remove only a node that is down: its reaper already
-- took its tasks back, so nothing is held there. A worker leaving (warm shutdown) removes
-- its own node, fenced by its incarnation: whatever is still on it is reclaimed first as
-- the reaper would (tasks requeued, queue dropped), so capacity and tasks stay whole.
-- Afterwards the node is in no key of the pool; `P changes` keeps its id, since that
-- sequence must never go back.
--
-- Transitions: RESERVED | RUNNING -> PENDING | FAILED | CANCELLED (what a leaving worker left)
-- Includes: _lib.lua _release.lua
--
-- KEYS[1] prefix      the pool prefix (carries the hash tag) for task and queue keys
-- KEYS[2] node        hash of the node
-- KEYS[3] nodes       set of node ids
-- KEYS[4] leases      zset node id -> lease expiry (ms)
-- KEYS[5] pending     zset of pending tasks
-- KEYS[6] requests    hash task id -> request of pending tasks
-- KEYS[7] wake        channel dispatchers listen on
-- KEYS[8] changes     zset node id -> sequence of its last change
-- ARGV[1] node_id
-- ARGV[2] now         ms since epoch
-- ARGV[3] incarnation the leaving worker process ('' for a down node)
-- Returns {code, tasks reclaimed}:
--   0 REMOVED
--   1 NOT_FOUND  no such node
--   2 UP         the node is up (its worker is running): nothing changed
--   3 FENCED     another worker process owns the node id now; nothing changed

local node_key, node_id = KEYS[2], ARGV[1]
local n = redis.call('HMGET', node_key, 'incarnation', 'state')
if not n[1] then return {1, 0} end
if ARGV[3] == '' then
  if n[2] == 'up' then return {2, 0} end
elseif n[1] ~= ARGV[3] then
  return {3, 0}
end
local reclaimed = reclaim_node(KEYS[1], node_id, KEYS[5], KEYS[6], tonumber(ARGV[2]),
  'node ' .. node_id .. ' left the pool')
redis.call('DEL', node_key)
redis.call('SREM', KEYS[3], node_id)
redis.call('ZREM', KEYS[4], node_id)
touch(KEYS[8], node_id)
redis.call('PUBLISH', KEYS[7], 'forget')
return {0, reclaimed}
