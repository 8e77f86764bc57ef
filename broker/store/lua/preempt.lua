-- preempt.lua: stop a running or reserved task so that a more urgent one fits.
--
-- A RESERVED victim has not started: its reservation is released and it goes back
-- in line at once (its queued message no longer matches its tag, so start.lua
-- drops it). A RUNNING victim is marked: its worker is told to stop it, and
-- finish.lua releases it and requeues it uncharged when it ends. Either way the
-- preemptor is recorded as waiting for this node, so that the dispatcher keeps the
-- node for it. The victim keeps its original place in line (its score). A gang member
-- is not requeued alone: it ends, and settle_gang.lua requeues its gang, uncharged.
--
-- Transitions: RESERVED -> PENDING (a RUNNING victim is marked; finish.lua requeues it)
-- Includes: _lib.lua _release.lua
--
-- KEYS[1] task        hash of the victim
-- KEYS[2] node        hash of the node it holds capacity on
-- KEYS[3] node_tasks  that node's task set
-- KEYS[4] pending     zset of pending tasks
-- KEYS[5] requests    hash task id -> request of pending tasks
-- KEYS[6] preempting  hash preemptor id -> node it waits for
-- KEYS[7] wake        channel dispatchers listen on
-- KEYS[8] changes     zset node id -> sequence of its last change
-- ARGV[1] task_id     the victim
-- ARGV[2] node_id     the node the dispatcher saw it on
-- ARGV[3] preemptor   id of the task it makes room for
-- ARGV[4] grace_ms    how long its worker waits after SIGTERM before SIGKILL
-- ARGV[5] now         ms since epoch
-- Returns {code}:
--   0 REQUEUED   it had not started: released and pending again
--   1 STOPPING   it is running: marked; its worker must stop it
--   2 NOT_FOUND  no such task
--   3 NOT_HELD   it no longer holds capacity on that node; nothing changed
--   4 ALREADY    it is already being stopped; nothing changed

local task_key, id, now = KEYS[1], ARGV[1], ARGV[5]
local t = redis.call('HMGET', task_key, 'state', 'node', 'preempt_at')
if not t[1] then return {2} end
if (t[1] ~= 'RUNNING' and t[1] ~= 'RESERVED') or t[2] ~= ARGV[2] then return {3} end
if t[3] then return {4} end
redis.call('HSET', KEYS[6], ARGV[3], ARGV[2])
if t[1] == 'RESERVED' then
  unhold(task_key, KEYS[2], KEYS[3], id)
  touch(KEYS[8], ARGV[2])
  redis.call('HINCRBY', task_key, 'preemptions', 1)
  redis.call('HSET', task_key, 'preempt_by', ARGV[3]) -- a gang member keeps it: settle_gang.lua reads it
  requeue(task_key, KEYS[4], KEYS[5], id, now, 'preempted')
  redis.call('PUBLISH', KEYS[7], 'preempt')
  return {0}
end
redis.call('HSET', task_key, 'preempt_at', now, 'preempt_by', ARGV[3], 'preempt_grace', ARGV[4])
return {1}
