-- reap.lua: reclaim the nodes whose lease has expired.
--
-- A node whose worker stopped heartbeating is marked down (`down_at`: now; the
-- dispatcher forgets it node_forget_after_s later, forget.lua); its reserved tasks go
-- back to PENDING, its running tasks too while retries remain (else FAILED), its
-- queue is dropped and its capacity freed. Kombu's visibility timeout is never the
-- recovery path, so a long task is not redelivered while it is still healthy.
--
-- Transitions: RESERVED | RUNNING -> PENDING | FAILED | CANCELLED (the tasks of an expired node)
-- Includes: _lib.lua _release.lua
--
-- KEYS[1] prefix      the pool prefix (carries the hash tag) for node and task keys
-- KEYS[2] leases      zset node id -> lease expiry (ms)
-- KEYS[3] pending     zset of pending tasks
-- KEYS[4] requests    hash task id -> request of pending tasks
-- KEYS[5] wake        channel dispatchers listen on
-- KEYS[6] changes     zset node id -> sequence of its last change
-- ARGV[1] now         ms since epoch
-- ARGV[2] limit       most nodes to reap in this call
-- Returns {code, node ids reaped...}:
--   0 OK

local now = tonumber(ARGV[1])
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, node_id in ipairs(expired) do
  reclaim_node(KEYS[1], node_id, KEYS[3], KEYS[4], now, 'node ' .. node_id .. ' lease expired')
  redis.call('HSET', KEYS[1] .. 'node:' .. node_id, 'state', 'down', 'down_at', ARGV[1])
  redis.call('ZREM', KEYS[2], node_id)
  touch(KEYS[6], node_id)
end
if #expired > 0 then redis.call('PUBLISH', KEYS[5], 'reap') end
local out = {0}
for _, node_id in ipairs(expired) do out[#out + 1] = node_id end
return out
