-- expire.lua: cancel the tasks whose `expires` time passed before they started.
--
-- As Celery's `expires`: a task not started by then never runs. A pending one leaves the
-- queue; a reserved one gives its reservation back (its queued message is then refused by
-- start.lua). A running one is left to finish.
--
-- Transitions: PENDING | RESERVED -> CANCELLED
-- Includes: _lib.lua _release.lua
--
-- KEYS[1] prefix      the pool prefix (carries the hash tag) for task, node and idempotency keys
-- KEYS[2] expiring    zset of tasks cancelled if still pending at their score (ms)
-- KEYS[3] pending     zset of pending tasks
-- KEYS[4] requests    hash task id -> request of pending tasks
-- KEYS[5] wake        channel dispatchers listen on
-- KEYS[6] changes     zset node id -> sequence of its last change
-- ARGV[1] now         ms since epoch
-- ARGV[2] limit       most tasks to look at in this call
-- Returns {code, ids of the tasks cancelled...}:
--   0 OK

local now, prefix = ARGV[1], KEYS[1]
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local out = {0}
for _, id in ipairs(due) do
  local task_key = prefix .. 'task:' .. id
  local t = redis.call('HMGET', task_key, 'state', 'node')
  redis.call('ZREM', KEYS[2], id)
  if t[1] == 'PENDING' or t[1] == 'RESERVED' then
    if t[1] == 'PENDING' then
      redis.call('ZREM', KEYS[3], id)
      redis.call('HDEL', KEYS[4], id)
    else
      unhold(task_key, prefix .. 'node:' .. t[2], prefix .. 'node:' .. t[2] .. ':tasks', id)
      touch(KEYS[6], t[2])
    end
    conclude(prefix, task_key, id, 'CANCELLED', now, 'error', 'expired: not started before its expires time')
    out[#out + 1] = id
  end
end
if #out > 1 then redis.call('PUBLISH', KEYS[5], 'expire') end
return out
