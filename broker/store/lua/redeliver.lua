-- redeliver.lua: queue again the message of each task reserved on a node that is nowhere.
--
-- reserve.lua pushes a reserved task's message onto the node queue; the worker's BRPOP takes
-- it and kombu then records it in the node's unacked hash. A failover between the two (the
-- new master saw the pop, not the unacked write), or a Redis restart that lost the tail of
-- its AOF, leaves a RESERVED task whose message is in neither: holding capacity, never run.
-- This finds each such task (its delivery tag in neither the queue nor the unacked hash) and
-- pushes its stored message again, as reserve.lua built it. A duplicate is harmless: start.lua
-- fences every delivery on the tag (ALREADY_RUNNING or STALE are dropped unrun), but a worker
-- that acknowledged a message and has not started it yet also has its tag nowhere: so a periodic
-- look passes the ids it found missing last time (ARGV[2]) and only those, still missing with
-- the same tag, are queued; "*" queues every missing one at once (on a (re)connect).
--
-- Transitions: none (a RESERVED task stays RESERVED; only its message is queued again)
-- Includes: _lib.lua
--
-- KEYS[1] prefix       the pool's key prefix (task keys are prefix .. 'task:' .. id)
-- KEYS[2] node_tasks   set of the ids of tasks reserved or running on the node
-- KEYS[3] queue        the node's queue (kombu list)
-- KEYS[4] unacked      the node queue's kombu unacked hash (delivery tag -> message)
-- ARGV[1] node_id      the node
-- ARGV[2] confirm      "*", or the "id:tag" pairs (space-separated) found missing by the last look
-- Returns {code, n, id..., missing...}: the n ids queued again, then every id:tag found missing
--   0 OK

local queued = {}
for _, message in ipairs(redis.call('LRANGE', KEYS[3], 0, -1)) do
  local tag = string.match(message, '"delivery_tag":"([^"]*)"')
  if tag then queued[tag] = true end
end
local confirm = {}
for pair in string.gmatch(ARGV[2], '%S+') do confirm[pair] = true end
local pushed, missing, route = {}, {}, queue_route(KEYS[3])
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local t = redis.call('HMGET', KEYS[1] .. 'task:' .. id, 'state', 'node', 'tag', 'message', 'gpus', 'tenant')
  if t[1] == 'RESERVED' and t[2] == ARGV[1] and t[3] and t[4] and not queued[t[3]]
      and redis.call('HEXISTS', KEYS[4], t[3]) == 0 then
    missing[#missing + 1] = id .. ':' .. t[3]
    if ARGV[2] == '*' or confirm[id .. ':' .. t[3]] then
      redis.call('LPUSH', KEYS[3], queued_message(route, t[4], t[3], t[5] or '', t[6]))
      pushed[#pushed + 1] = id
    end
  end
end
local out = {0, #pushed}
for _, id in ipairs(pushed) do out[#out + 1] = id end
for _, pair in ipairs(missing) do out[#out + 1] = pair end
return out
