-- drain.lua: stop placing tasks on a node, or place on it again (undrain).
--
-- A draining node keeps its lease and its running tasks, which finish; reserve.lua refuses
-- it, so nothing new is placed there. An operator's drain outlives a restart of the node's
-- worker (register.lua keeps it); a worker's own drain at shutdown does not. At shutdown the
-- worker also hands back what was reserved for it but has not started: those tasks go back
-- in line uncharged (their queued messages no longer match, so start.lua drops them) and
-- another node takes them at once, instead of waiting for this one to finish or expire.
--
-- Transitions: RESERVED -> PENDING | CANCELLED (shutdown: the node's tasks not started yet)
-- Includes: _lib.lua _release.lua
--
-- KEYS[1] prefix      the pool prefix (carries the hash tag) for the node's task keys
-- KEYS[2] node        hash of the node
-- KEYS[3] node_tasks  that node's task set
-- KEYS[4] pending     zset of pending tasks
-- KEYS[5] requests    hash task id -> request of pending tasks
-- KEYS[6] wake        channel dispatchers listen on
-- KEYS[7] changes     zset node id -> sequence of its last change
-- ARGV[1] node_id
-- ARGV[2] now         ms since epoch
-- ARGV[3] by          'operator' | 'shutdown' (drain and hand back) | '' (undrain)
-- ARGV[4] incarnation only this worker process's node may be changed ('' for any)
-- Returns {code, tasks handed back}:
--   0 OK
--   1 NOT_FOUND  no such node
--   2 FENCED     another worker process owns the node id now; nothing changed

local node_key, node_id, now, by = KEYS[2], ARGV[1], ARGV[2], ARGV[3]
local inc = redis.call('HGET', node_key, 'incarnation')
if not inc then return {1, 0} end
if ARGV[4] ~= '' and inc ~= ARGV[4] then return {2, 0} end
local handed = 0
if by == '' then
  redis.call('HDEL', node_key, 'draining', 'draining_at')
else
  redis.call('HSET', node_key, 'draining', by, 'draining_at', now)
end
if by == 'shutdown' then
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    local task_key = KEYS[1] .. 'task:' .. id
    if redis.call('HGET', task_key, 'state') == 'RESERVED' then
      unhold(task_key, node_key, KEYS[3], id)
      recover(KEYS[1], task_key, KEYS[4], KEYS[5], id, now, 'node ' .. node_id .. ' shut down', false)
      handed = handed + 1
    end
  end
end
touch(KEYS[7], node_id)
redis.call('PUBLISH', KEYS[6], 'drain')
return {0, handed}
