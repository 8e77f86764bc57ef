-- cancel.lua: move a live task to CANCELLED and release what it holds.
--
-- Harmless on a task that is already final. The caller passes the keys of the node
-- it believes holds the task; if the task moved meanwhile the script changes
-- nothing and says where it is now, so the caller can retry with the right keys.
--
-- Transitions: PENDING | RESERVED | RUNNING -> CANCELLED
-- Includes: _lib.lua _release.lua
--
-- KEYS[1] task        hash of the task
-- KEYS[2] node        hash of the node the caller believes holds it (any key of the pool if none)
-- KEYS[3] node_tasks  that node's task set
-- KEYS[4] pending     zset of pending tasks
-- KEYS[5] requests    hash task id -> request of pending tasks
-- KEYS[6] wake        channel dispatchers listen on
-- KEYS[7] changes     zset node id -> sequence of its last change (any key of the pool if none)
-- ARGV[1] task_id
-- ARGV[2] node_id     node the caller believes holds the task, '' for none
-- ARGV[3] now         ms since epoch
-- Returns {code, detail}:
--   0 CANCELLED      detail = the state it was cancelled from
--   1 NOT_FOUND      no such task
--   2 ALREADY_FINAL  detail = its final state; nothing changed
--   3 MOVED          detail = the node that holds it now ('' for none); nothing changed

local task_key, id = KEYS[1], ARGV[1]
local t = redis.call('HMGET', task_key, 'state', 'node')
local state, node = t[1], t[2] or ''
if not state then return {1, ''} end
if state == 'SUCCEEDED' or state == 'FAILED' or state == 'CANCELLED' then return {2, state} end
if state == 'PENDING' then
  redis.call('ZREM', KEYS[4], id)
  redis.call('HDEL', KEYS[5], id)
else
  if node ~= ARGV[2] then return {3, node} end
  unhold(task_key, KEYS[2], KEYS[3], id)
  touch(KEYS[7], node)
end
redis.call('HSET', task_key, 'state', 'CANCELLED', 'finished_at', ARGV[3])
redis.call('PUBLISH', KEYS[6], 'cancel')
return {0, state}
