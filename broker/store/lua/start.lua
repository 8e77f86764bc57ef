-- start.lua: the fence a worker passes before it runs a task.
--
-- A task runs only if its reservation is for this node and this attempt (the
-- delivery tag), and the worker asking is the node's current incarnation. A
-- redelivered, stale or cancelled message is refused, so a task never runs twice
-- at the same time; so is one taken by a replaced worker process that is still
-- alive (it hands the message back for its successor).
--
-- Transitions: RESERVED -> RUNNING
--
-- KEYS[1] task        hash of the task
-- KEYS[2] node        hash of the node the worker is pinned to
-- ARGV[1] node_id     the node the worker is pinned to
-- ARGV[2] tag         the message's delivery tag (task id . attempt)
-- ARGV[3] now         ms since epoch
-- ARGV[4] pid         the process that runs the attempt (its worker stops it there on a cancel or preemption)
-- ARGV[5] incarnation the worker process asking ('' to skip the check)
-- ARGV[6] log_file    where the attempt's whole output goes, <node>:<path> ('' records none;
--                     kept as log_file:<attempt>, as log.lua keeps it, so a quiet attempt needs no copy)
-- Returns {code, gpus}; gpus is the reserved GPU indices ("0,3") when code is OK:
--   0 OK
--   1 NOT_FOUND        no such task
--   2 CANCELLED        the task was cancelled
--   3 STALE            another attempt or node holds the task now
--   4 ALREADY_RUNNING  this attempt is running already (a redelivery)
--   5 FENCED           another incarnation of the node owns it now; nothing changed

local t = redis.call('HMGET', KEYS[1], 'state', 'node', 'tag', 'gpus')
if not t[1] then return {1, ''} end
if ARGV[5] ~= '' and redis.call('HGET', KEYS[2], 'incarnation') ~= ARGV[5] then return {5, ''} end
if t[1] == 'CANCELLED' then return {2, ''} end
if t[3] ~= ARGV[2] or t[2] ~= ARGV[1] then return {3, ''} end
if t[1] == 'RUNNING' then return {4, ''} end
if t[1] ~= 'RESERVED' then return {3, ''} end
redis.call('HSET', KEYS[1], 'state', 'RUNNING', 'started_at', ARGV[3], 'pid', ARGV[4])
if ARGV[6] and ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], 'log_file:' .. string.match(ARGV[2], '[^.]*$'), ARGV[6])
end
redis.call('HDEL', KEYS[1], 'retried') -- Celery's RETRY state ends when the retry starts
return {0, t[4] or ''}
