-- log.lua: keep the last part of an attempt's output (stdout and stderr) with its task.
--
-- Fenced by attempt number: attempt n writes only its own fields (log:n ...), and only if the
-- task has had n attempts, so no attempt can write another's log and a record that expired or
-- was forgotten is not brought back. State is not checked: the worker copies while the attempt
-- runs (at most once per task_log_flush_s), once just before finish.lua, and, when that copy
-- failed in a Redis outage, once more after it. The fields outlive the attempt (no transition
-- clears them; they expire with the record).
--
-- Transitions: none (any state; the task's state is left as it is)
--
-- KEYS[1] task        hash of the task
-- ARGV[1] tag         delivery tag of the attempt, <task id>.<attempt>
-- ARGV[2] attempt     the attempt's number (the tag's suffix)
-- ARGV[3] tail        the last bytes of its output (at most task_log_tail_bytes)
-- ARGV[4] size        bytes it has written in all, so a reader knows what the tail leaves out
-- ARGV[5] file        where the whole log is, <node>:<path> ("" leaves it as it is)
-- Returns {code}:
--   0 OK
--   1 NOT_FOUND  no such task
--   2 STALE      the task has had fewer attempts than ARGV[2]; nothing changed

local t = redis.call('HMGET', KEYS[1], 'state', 'attempts')
if not t[1] then return {1} end
local n = tonumber(ARGV[2])
if not n or n < 1 or n > (tonumber(t[2]) or 0) then return {2} end
redis.call('HSET', KEYS[1], 'log:' .. ARGV[2], ARGV[3], 'log_size:' .. ARGV[2], ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'log_file:' .. ARGV[2], ARGV[5]) end
return {0}
