-- expire.lua: cancel the tasks whose `expires` time passed before they started.
--
-- As Celery's `expires`: a task not started by then never runs. A pending one leaves the
-- queue; a reserved one gives its reservation back (its queued message is then refused by
-- start.lua). A running one is left to finish. The same set carries the cancels a producer
-- asked for (cancel.lua, `cancel_req`: a producer may not write node state): those are
-- cancelled here alike, and one that started meanwhile is marked as cancel.lua marks it.
--
-- Transitions: PENDING | RESERVED -> CANCELLED (a RUNNING one asked to cancel is marked)
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
  local t = redis.call('HMGET', task_key, 'state', 'node', 'cancel_req', 'cancel_at')
  redis.call('ZREM', KEYS[2], id)
  if t[1] == 'PENDING' or t[1] == 'RESERVED' then
    if t[1] == 'PENDING' then
      redis.call('ZREM', KEYS[3], id)
      redis.call('HDEL', KEYS[4], id)
    else
      unhold(task_key, prefix .. 'node:' .. t[2], prefix .. 'node:' .. t[2] .. ':tasks', id)
      touch(KEYS[6], t[2])
    end
    local why = t[3] and (t[3] == 'revoke' and 'revoked' or 'cancelled') or
      'expired: not started before its expires time'
    conclude(prefix, task_key, id, 'CANCELLED', now, 'error', why)
    out[#out + 1] = id
  elseif t[1] == 'RUNNING' and t[3] == 'revoke' then
    redis.call('HSET', task_key, 'revoked', now)
  elseif t[1] == 'RUNNING' and t[3] and not t[4] then
    redis.call('HSET', task_key, 'cancel_at', now)
  end
end
if #out > 1 then redis.call('PUBLISH', KEYS[5], 'expire') end
return out
