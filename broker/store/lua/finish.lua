-- finish.lua: end one attempt of a task and release its reservation.
--
-- Called by the worker on success, an exception, a Celery retry, replace or Ignore, a time
-- limit, a lost process. Fenced by the delivery tag (a finish for an attempt that no longer
-- holds the task changes nothing: no double release) and the worker's incarnation. Next:
-- SUCCEEDED (or FAILED) passing its reservation to the head of the queue when that asks the
-- same (_handoff.lua); CANCELLED if being cancelled (or revoked and would run again), or on Ignore;
-- back in line uncharged if being preempted; PENDING for a retry (its new message, not before
-- its countdown); PENDING `awaiting` (in no queue) the message sent under its id after
-- Task.replace (submit.lua takes it); FAILED; or, lost, requeued while retries remain.
--
-- Transitions: RESERVED | RUNNING | PENDING -> SUCCEEDED | FAILED | CANCELLED | PENDING | RESERVED (the head)
-- Includes: _lib.lua _release.lua _handoff.lua
--
-- KEYS[1] task        hash of the task
-- KEYS[2] node        hash of the node the attempt ran on
-- KEYS[3] node_tasks  set of the node's tasks
-- KEYS[4] pending     zset of pending tasks
-- KEYS[5] requests    hash task id -> request of pending tasks
-- KEYS[6] wake        channel dispatchers listen on
-- KEYS[7] runtimes    hash of succeeded runs' count and seconds per task name and GPU kind
-- KEYS[8] changes     zset node id -> sequence of its last change
-- KEYS[9] prefix      the pool prefix (carries the hash tag): delayed, expiring, idempotency keys
-- ARGV[1] task_id
-- ARGV[2] node_id
-- ARGV[3] tag         delivery tag of the attempt
-- ARGV[4] outcome     'succeeded' | 'failed' | 'retry' | 'lost' | 'replaced' | 'ignored'
-- ARGV[5] payload     result JSON (succeeded), error text (failed, lost, ignored), new message (retry),
--                     what replaced it (replaced)
-- ARGV[6] now         ms since epoch
-- ARGV[7] detail      failed: the exception as JSON; retry: why; '' otherwise
-- ARGV[8] not_before  retry: ms before which it is not placed again (0: at once)
-- ARGV[9] incarnation the worker process reporting ('' to skip the check)
-- Returns {code, state, head}: the task's state afterwards, the task it passed its place to (or ''):
--   0 OK
--   1 NOT_FOUND  no such task
--   2 STALE      this attempt no longer holds the task; nothing changed
--   3 BAD_OUTCOME unknown outcome; nothing changed

local task_key, id, now, prefix, outcome = KEYS[1], ARGV[1], tonumber(ARGV[6]), KEYS[9], ARGV[4]
local t = redis.call('HMGET', task_key, 'state', 'tag', 'node', 'preempt_at', 'started_at', 'name', 'gpu_kind',
  'cancel_at', 'revoked', 'req', 'alloc', 'gpus', 'gang')
if not t[1] then return {1, ''} end
if t[2] ~= ARGV[3] or t[3] ~= ARGV[2] or (t[1] ~= 'RUNNING' and t[1] ~= 'RESERVED')
    or (ARGV[9] ~= '' and redis.call('HGET', KEYS[2], 'incarnation') ~= ARGV[9]) then
  return {2, t[1]}
end
local OUTCOMES = {succeeded = true, failed = true, lost = true, retry = true, replaced = true, ignored = true}
if not OUTCOMES[outcome] then return {3, t[1]} end

local final = not t[13] and (outcome == 'succeeded' or (outcome == 'failed' and not t[4] and not t[8]))
local passed = release_or_pass(prefix, task_key, KEYS[2], KEYS[3], ARGV[2], id, final, t[10], t[11], t[12], now)
if not passed then touch(KEYS[8], ARGV[2]) end -- passed on: its node's free capacity is as it was
local state
if outcome == 'succeeded' then
  state = conclude(prefix, task_key, id, 'SUCCEEDED', now, 'result', ARGV[5])
  if t[5] then -- learn the runtime, per task name and GPU kind, and per name alone
    local seconds = string.format('%.3f', (now - tonumber(t[5])) / 1000)
    for _, key in ipairs({t[6] .. '|' .. (t[7] or ''), t[6] .. '|'}) do
      redis.call('HINCRBY', KEYS[7], 'n:' .. key, 1)
      redis.call('HINCRBYFLOAT', KEYS[7], 's:' .. key, seconds)
    end
  end
elseif t[8] or (t[9] and outcome ~= 'failed') then -- stopped for a cancel, or revoked: runs no more
  state = conclude(prefix, task_key, id, 'CANCELLED', now, 'error', t[8] and 'cancelled' or 'revoked')
elseif outcome == 'replaced' then -- its code is done; what replaced it comes under its id (submit.lua)
  redis.call('HSET', task_key, 'state', 'PENDING', 'requeued_at', now, 'awaiting', 1, 'replaced_by', ARGV[5])
  redis.call('HDEL', task_key, 'retried', unpack(ATTEMPT))
  state = 'PENDING'
elseif outcome == 'ignored' then -- Celery's Ignore: the task asked that no outcome be recorded
  state = conclude(prefix, task_key, id, 'CANCELLED', now, 'error', ARGV[5])
elseif t[4] then -- stopped for a more urgent task: back in line, no retry charged
  redis.call('HINCRBY', task_key, 'preemptions', 1)
  requeue(task_key, KEYS[4], KEYS[5], id, now, 'preempted')
  state = 'PENDING'
elseif outcome == 'retry' then -- Celery's self.retry(): the attempt ends, a new message waits its turn
  redis.call('HSET', task_key, 'message', ARGV[5], 'retried', 1, 'retry_reason', ARGV[7])
  if tonumber(ARGV[8]) > now then
    delay(task_key, prefix .. 'delayed', id, now, tonumber(ARGV[8]))
  else
    requeue(task_key, KEYS[4], KEYS[5], id, now)
  end
  state = 'PENDING'
elseif outcome == 'failed' then
  state = conclude(prefix, task_key, id, 'FAILED', now, 'error', ARGV[5], 'exc', ARGV[7])
else
  state = recover(prefix, task_key, KEYS[4], KEYS[5], id, now, ARGV[5], true)
end
if not passed then redis.call('PUBLISH', KEYS[6], 'finish') end -- passed on: nothing changed to plan
return {0, state, passed or ''}
