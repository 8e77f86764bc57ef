-- log.lua: keep the last part of a running attempt's output (stdout and stderr) with its task.
--
-- Fenced by the delivery tag like progress.lua: only the attempt that holds the task may
-- write, so a stale attempt cannot overwrite the live one's log. The worker calls it while the
-- attempt runs (at most once per task_log_flush_s) and once more just before finish.lua, so
-- the fields outlive the attempt (no transition clears them; they expire with the record).
--
-- Transitions: none (a RUNNING task stays RUNNING)
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
--   2 STALE      this attempt does not hold a running task; nothing changed

local t = redis.call('HMGET', KEYS[1], 'state', 'tag')
if not t[1] then return {1} end
if t[1] ~= 'RUNNING' or t[2] ~= ARGV[1] then return {2} end
redis.call('HSET', KEYS[1], 'log:' .. ARGV[2], ARGV[3], 'log_size:' .. ARGV[2], ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'log_file:' .. ARGV[2], ARGV[5]) end
return {0}
