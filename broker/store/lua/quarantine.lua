-- quarantine.lua: take a pending task whose stored request cannot be read out of the queue.
--
-- Invariant: one unreadable record never stops scheduling. A request written by hand or by an
-- older version (not JSON, a field missing, of the wrong type or out of range) would make every
-- dispatcher that reads it fail; the dispatcher finds it (records.decode_request) and this
-- script ends the task FAILED with the reason, in one step: it leaves the pending queue and
-- `requests`. A pending task holds no capacity, so nothing is released. When the task hash
-- cannot take that state (no hash, another type, or a state other than PENDING: a RESERVED or
-- RUNNING task keeps what it holds), only the queue entry leaves, into `deadletter`, and the
-- task hash is left as it is. Only the request text the dispatcher judged is taken: one that
-- changed meanwhile is left for the next read.
--
-- Transitions: PENDING -> FAILED
-- Includes: _lib.lua _release.lua
--
-- KEYS[1] task        hash of the task
-- KEYS[2] pending     zset of pending tasks
-- KEYS[3] requests    hash task id -> request of pending tasks
-- KEYS[4] deadletter  hash task id -> JSON {reason, at, request, found} of queue entries dropped
-- KEYS[5] prefix      the pool prefix (carries the hash tag): delayed, expiring, idempotency keys
-- ARGV[1] task_id
-- ARGV[2] request     the request text the dispatcher could not read
-- ARGV[3] reason      what was wrong with it (the field and why)
-- ARGV[4] now         ms since epoch
-- Returns {code}:
--   0 FAILED         the task ended FAILED, its error the reason
--   1 DEAD_LETTERED  its queue entry moved to `deadletter`; the task hash is unchanged
--   2 NOT_PENDING    not queued with that request any more; nothing changed

local id, task_key = ARGV[1], KEYS[1]
if not redis.call('ZSCORE', KEYS[2], id) or redis.call('HGET', KEYS[3], id) ~= ARGV[2] then return {2} end
redis.call('ZREM', KEYS[2], id)
redis.call('HDEL', KEYS[3], id)
local state = redis.pcall('HGET', task_key, 'state') -- a key of another type: an error reply, caught
if state == 'PENDING' then
  conclude(KEYS[5], task_key, id, 'FAILED', ARGV[4], 'error', ARGV[3])
  return {0}
end
local found = type(state) == 'table' and 'not a hash' or ('state ' .. tostring(state or 'missing'))
redis.call('HSET', KEYS[4], id, cjson.encode({reason = ARGV[3], at = tonumber(ARGV[4]), request = ARGV[2],
  found = found}))
return {1}
