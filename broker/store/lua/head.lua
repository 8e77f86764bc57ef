-- head.lua: the first tasks of the pending queue, with their scores and stored requests.
--
-- Reads only. The dispatcher sends it in its cycle's first round trip (timers.upkeep), so the
-- lazy planner has the head of the queue and what each task asks for without a round trip of
-- its own (issue 14: a submit on an idle node waited for one more). Read in one script, an id
-- and its request are of the same instant: a task placed in between is in neither.
--
-- Flags: no-writes
-- Transitions: none (reads only)
--
-- KEYS[1] pending     zset of pending tasks
-- KEYS[2] requests    hash task id -> request of pending tasks
-- ARGV[1] first       how many tasks to read from the head (at least 1)
-- Returns {code, {id, score, id, score...}, {request...}}; a missing request is nil:
--   0 OK

local head = redis.call('ZRANGE', KEYS[1], 0, math.max(1, tonumber(ARGV[1])) - 1, 'WITHSCORES')
local ids = {}
for i = 1, #head, 2 do ids[#ids + 1] = head[i] end
if #ids == 0 then return {0, head, {}} end
return {0, head, redis.call('HMGET', KEYS[2], unpack(ids))}
