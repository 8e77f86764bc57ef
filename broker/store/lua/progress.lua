-- progress.lua: record what a running task says of itself (Celery's update_state).
--
-- Fenced by the delivery tag like finish.lua: only the attempt that holds the task may
-- write, so a stale attempt cannot overwrite the live one's progress. The custom state and
-- its meta are kept with the task until the attempt ends (a requeue clears them). A
-- checkpoint (ARGV[5], workers.checkpoint) also keeps its meta as the task's last checkpoint,
-- across attempts: the preemption planner counts work at risk from checkpoint_at, and a later
-- attempt reads it back to resume.
--
-- Transitions: none (a RUNNING task stays RUNNING)
--
-- KEYS[1] task        hash of the task
-- ARGV[1] tag         delivery tag of the attempt
-- ARGV[2] state       the custom state, e.g. PROGRESS
-- ARGV[3] meta        its meta as JSON
-- ARGV[4] now         ms since epoch
-- ARGV[5] checkpoint  "1": the meta is also the task's last checkpoint, stamped now
-- Returns {code}:
--   0 OK
--   1 NOT_FOUND  no such task
--   2 STALE      this attempt does not hold a running task; nothing changed

local t = redis.call('HMGET', KEYS[1], 'state', 'tag')
if not t[1] then return {1} end
if t[1] ~= 'RUNNING' or t[2] ~= ARGV[1] then return {2} end
redis.call('HSET', KEYS[1], 'progress_state', ARGV[2], 'progress', ARGV[3], 'progress_at', ARGV[4])
if ARGV[5] == '1' then
  redis.call('HSET', KEYS[1], 'checkpoint', ARGV[3], 'checkpoint_at', ARGV[4])
end
return {0}
