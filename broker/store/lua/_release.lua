-- _release.lua: giving capacity back and putting tasks back in line (needs _lib.lua).
--
-- Invariant kept by every helper: for each node, free + the sum of the `alloc`
-- of the tasks in its `:tasks` set = capacity, per GPU index, CPU, RAM and slots.

-- kombu's priority bucket separator and the buckets besides 0 (kombu/transport/redis.py).
local BUCKETS = {'\6\22' .. '3', '\6\22' .. '6', '\6\22' .. '9'}

-- Give back everything a reservation holds. alloc = {g = {{index, milli, mem_mb}...}, c = cpu_milli, r = mem_mb}
local function release(node_key, alloc_json)
  if not alloc_json then return end
  local a = cjson.decode(alloc_json)
  for _, g in ipairs(a.g) do
    incr(node_key, 'g' .. g[1] .. '_milli', g[2])
    incr(node_key, 'g' .. g[1] .. '_mem', g[3])
  end
  incr(node_key, 'free_cpu_m', a.c)
  incr(node_key, 'free_mem', a.r)
  incr(node_key, 'free_slots', 1)
end

-- Release a task's reservation and take it off its node.
local function unhold(task_key, node_key, node_tasks_key, task_id)
  release(node_key, redis.call('HGET', task_key, 'alloc'))
  redis.call('HDEL', task_key, 'alloc')
  redis.call('SREM', node_tasks_key, task_id)
end

-- Set every free amount of a node back to its capacity (no reservations left).
local function reset_free(node_key)
  local cap = redis.call('HMGET', node_key, 'cap_gpus', 'gpu_mem', 'cap_cpu_m', 'cap_mem', 'cap_slots')
  for i = 0, num(cap[1]) - 1 do
    redis.call('HSET', node_key, 'g' .. i .. '_milli', MILLI, 'g' .. i .. '_mem', cap[2])
  end
  redis.call('HSET', node_key, 'free_cpu_m', cap[3], 'free_mem', cap[4], 'free_slots', cap[5])
end

-- Fields of an attempt: gone when the task goes back in line.
local ATTEMPT = {'node', 'gpus', 'tag', 'pid', 'reserved_at', 'started_at', 'preempt_at', 'preempt_by',
  'preempt_grace', 'progress_state', 'progress', 'progress_at'}

-- Outcome counters for the metrics (``P outcomes``, read by broker.store.stats): per tenant,
-- tasks ended or sent back per outcome, and for a task that ran, histograms of its wait (submit
-- to the start of its last attempt) and run (that start to its end) in the buckets below (s;
-- the last is +Inf). Kept in Redis, not in a worker, so cancels and requeues that no worker sees
-- (client, expire, reap, preempt) count too.
local BUCKETS_S = {1, 5, 15, 60, 300, 900, 3600, 14400, 86400}

local function bucket(seconds)
  for i, bound in ipairs(BUCKETS_S) do
    if seconds <= bound then return i end
  end
  return #BUCKETS_S + 1
end

-- `outcomes_key` is P outcomes; `outcome` one of succeeded failed cancelled preempted requeued.
local function tally(outcomes_key, task_key, outcome, now)
  local t = redis.call('HMGET', task_key, 'tenant', 'submitted_at', 'started_at')
  local tenant = t[1] or 'default'
  redis.call('HINCRBY', outcomes_key, outcome .. '|' .. tenant, 1)
  if t[3] and outcome ~= 'requeued' and outcome ~= 'preempted' then
    local wait, run = math.max(0, (num(t[3]) - num(t[2])) / 1000), math.max(0, (now - num(t[3])) / 1000)
    redis.call('HINCRBY', outcomes_key, 'wait:' .. bucket(wait) .. '|' .. tenant, 1)
    redis.call('HINCRBYFLOAT', outcomes_key, 'wait_sum|' .. tenant, string.format('%.3f', wait))
    redis.call('HINCRBY', outcomes_key, 'run:' .. bucket(run) .. '|' .. tenant, 1)
    redis.call('HINCRBYFLOAT', outcomes_key, 'run_sum|' .. tenant, string.format('%.3f', run))
  end
end

-- P outcomes from P pending: both carry the pool's hash tag (KEYS has no room for it in every
-- script that requeues).
local function outcomes_of(pending_key)
  return string.sub(pending_key, 1, #pending_key - #'pending') .. 'outcomes'
end

-- A task reached a final state: its record and its idempotency key expire after the record's
-- result_ttl (ms; 0: kept), and it leaves the timer sets. prefix carries the pool's hash tag.
local function finalize(prefix, task_key, task_id)
  local t = redis.call('HMGET', task_key, 'result_ttl', 'idempotency_key')
  local ttl = num(t[1])
  if ttl > 0 then
    redis.call('PEXPIRE', task_key, int(ttl))
    if t[2] then redis.call('PEXPIRE', prefix .. 'idem:' .. t[2], int(ttl)) end
  end
  redis.call('ZREM', prefix .. 'delayed', task_id)
  redis.call('ZREM', prefix .. 'expiring', task_id)
end

-- End a task: state `final` with `fields` (name, value, ...), then finalize. It enters the
-- history index (P finished, scored by finished_at) in the same script, so `gpubroker tasks`
-- and `usage` never miss an end; the dispatcher trims entries whose record expired.
local function conclude(prefix, task_key, task_id, final, now, ...)
  tally(prefix .. 'outcomes', task_key, string.lower(final), tonumber(now))
  redis.call('HSET', task_key, 'state', final, 'finished_at', now, ...)
  redis.call('ZADD', prefix .. 'finished', now, task_id)
  finalize(prefix, task_key, task_id)
  return final
end

-- A gang member never goes back in line alone (issue 13): it ends FAILED instead (CANCELLED
-- when preempted: its record keeps preempt_by), and settle_gang.lua puts its whole gang back
-- in line. True when `task_key` was a member.
local function member_ended(prefix, task_key, task_id, now, why)
  if not redis.call('HGET', task_key, 'gang') then return false end
  conclude(prefix, task_key, task_id, why == 'preempted' and 'CANCELLED' or 'FAILED', now, 'error',
    'gang member ' .. (why or 'requeued') .. ': its gang goes back in line whole')
  return true
end

-- Back to PENDING at its original place in line (the score keeps its submit order); counted
-- as `why` ('requeued' when nil: lost, retried) in P outcomes.
local function requeue(task_key, pending_key, requests_key, task_id, now, why)
  if member_ended(string.sub(pending_key, 1, #pending_key - #'pending'), task_key, task_id, now, why) then return end
  tally(outcomes_of(pending_key), task_key, why or 'requeued', now)
  local t = redis.call('HMGET', task_key, 'score', 'req')
  redis.call('HSET', task_key, 'state', 'PENDING', 'requeued_at', now)
  redis.call('HDEL', task_key, unpack(ATTEMPT))
  redis.call('ZADD', pending_key, t[1], task_id)
  redis.call('HSET', requests_key, task_id, t[2])
end

-- Back to PENDING, but not placed before `not_before` (ms): it waits in `delayed` until
-- promote.lua moves it to the pending queue at its original place in line.
local function delay(task_key, delayed_key, task_id, now, not_before)
  if member_ended(string.sub(delayed_key, 1, #delayed_key - #'delayed'), task_key, task_id, now, 'retried') then return end
  tally(string.sub(delayed_key, 1, #delayed_key - #'delayed') .. 'outcomes', task_key, 'requeued', now)
  redis.call('HSET', task_key, 'state', 'PENDING', 'requeued_at', now, 'not_before', int(not_before))
  redis.call('HDEL', task_key, unpack(ATTEMPT))
  redis.call('ZADD', delayed_key, int(not_before), task_id)
end

-- A task whose process or node was lost. `charge` counts it against max_retries (it had
-- started). A task being cancelled, or revoked, ends CANCELLED instead of running again.
-- Returns the task's new state.
local function recover(prefix, task_key, pending_key, requests_key, task_id, now, reason, charge)
  local t = redis.call('HMGET', task_key, 'cancel_at', 'revoked', 'max_retries')
  if t[1] or t[2] then
    return conclude(prefix, task_key, task_id, 'CANCELLED', now, 'error', reason .. ' (cancelled)')
  end
  if charge and redis.call('HINCRBY', task_key, 'retries', 1) > num(t[3]) then
    return conclude(prefix, task_key, task_id, 'FAILED', now, 'error', reason .. ' (retry limit reached)')
  end
  requeue(task_key, pending_key, requests_key, task_id, now)
  return 'PENDING'
end

-- Take back everything held on a node whose worker is gone: its tasks are recovered,
-- its queue and kombu bookkeeping dropped (those messages are stale), capacity freed.
-- Keys are built from the pool prefix, which carries the pool's hash tag.
local function reclaim_node(prefix, node_id, pending_key, requests_key, now, reason)
  local node_key = prefix .. 'node:' .. node_id
  local tasks_key = node_key .. ':tasks'
  local ids = redis.call('SMEMBERS', tasks_key)
  for _, id in ipairs(ids) do
    local task_key = prefix .. 'task:' .. id
    local state = redis.call('HGET', task_key, 'state')
    redis.call('HDEL', task_key, 'alloc')
    recover(prefix, task_key, pending_key, requests_key, id, now, reason, state == 'RUNNING')
  end
  local q = prefix .. 'q:' .. node_id
  redis.call('DEL', tasks_key, q, q .. ':unacked', q .. ':unacked_index', q .. ':unacked_mutex')
  for _, suffix in ipairs(BUCKETS) do
    redis.call('DEL', q .. suffix)
  end
  reset_free(node_key)
  return #ids
end
