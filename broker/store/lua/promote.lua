-- promote.lua: move tasks whose start time has come from `delayed` to the pending queue.
--
-- A delayed task (countdown, ETA, a retry waiting out its countdown) holds nothing and is
-- invisible to planning until now >= its start time; it then joins the queue at its
-- original place in line (its score keeps priority and submit order).
--
-- Transitions: PENDING -> PENDING (delayed to ready)
--
-- KEYS[1] prefix      the pool prefix (carries the hash tag) for task keys
-- KEYS[2] delayed     zset of tasks not to start before their score (ms)
-- KEYS[3] pending     zset of pending tasks
-- KEYS[4] requests    hash task id -> request of pending tasks
-- KEYS[5] wake        channel dispatchers listen on
-- ARGV[1] now         ms since epoch
-- ARGV[2] limit       most tasks to move in this call
-- Returns {code, tasks moved}:
--   0 OK

local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local moved = 0
for _, id in ipairs(due) do
  local task_key = KEYS[1] .. 'task:' .. id
  local t = redis.call('HMGET', task_key, 'state', 'score', 'req')
  redis.call('ZREM', KEYS[2], id)
  if t[1] == 'PENDING' and t[2] then
    redis.call('ZADD', KEYS[3], t[2], id)
    redis.call('HSET', KEYS[4], id, t[3])
    redis.call('HDEL', task_key, 'not_before')
    moved = moved + 1
  end
end
if moved > 0 then redis.call('PUBLISH', KEYS[5], 'promote') end
return {0, moved}
