-- settle_gang.lua: one fate for the members of a reserved gang (issue 13).
--
-- A rank cannot make progress without the others, so once any member has ended other than
-- SUCCEEDED (its code failed, it was cancelled, or its node was lost: _release.lua ends such
-- a member FAILED rather than requeue it alone) every live member is told to stop: a running
-- one is marked as cancel.lua marks it (its worker sends SIGTERM, waits grace_ms, then
-- SIGKILLs its process group; finish.lua releases it), a reserved one is handed to
-- expire.lua, which releases it. Once every member is final, the gang goes back in line
-- whole at its place (one retry counted) or, past max_retries, ends FAILED; no member of
-- its last attempt holds anything then. Every member SUCCEEDED: the gang SUCCEEDED, its
-- result rank 0's. Preempted (a member ended with preempt_by, none failed): back uncharged,
-- as a preempted task, `preemptions` counted. The dispatcher runs this per gang every cycle.
--
-- Transitions: RESERVED -> PENDING | SUCCEEDED | FAILED
-- Includes: _lib.lua _release.lua
--
-- KEYS[1] gang      hash of the gang
-- KEYS[2] gangs     set of reserved gangs
-- KEYS[3] pending   zset of pending tasks
-- KEYS[4] requests  hash task id -> request of pending tasks
-- KEYS[5] wake      channel dispatchers listen on
-- KEYS[6] prefix    the pool prefix (carries the hash tag): expiring, outcomes, finished
-- KEYS[7+r]         member r's task hash, for each member of this attempt (its `granted`)
-- ARGV[1] gang_id
-- ARGV[2] now       ms since epoch
-- ARGV[3] grace_ms  a running member's time between SIGTERM and SIGKILL
-- Returns {code}:
--   0 RUNNING    nothing to do: every member is live or has succeeded
--   1 STOPPING   a member ended: the live ones were told to stop
--   2 REQUEUED   every member ended: the gang is pending again, one retry counted (none if preempted)
--   3 FAILED     every member ended and the gang is past its retries
--   4 SUCCEEDED  every member succeeded
--   5 NOT_LIVE   the gang is not reserved (cancelled, ended): it leaves `gangs`

local gang, id, now, prefix = KEYS[1], ARGV[1], ARGV[2], KEYS[6]
local g = redis.call('HMGET', gang, 'state', 'replicas', 'retries', 'max_retries', 'score', 'req', 'granted')
local members = tonumber(g[7] or g[2]) -- an elastic gang's attempt has the members it was granted
if g[1] ~= 'RESERVED' then
  redis.call('SREM', KEYS[2], id)
  return {5}
end
local states, ended, live, preempted = {}, nil, 0, false
for r = 0, members - 1 do
  local m = redis.call('HMGET', KEYS[7 + r], 'state', 'preempt_by')
  states[r] = m[1] or 'FAILED' -- a record gone (expired) counts as lost
  if states[r] == 'RESERVED' or states[r] == 'RUNNING' then
    live = live + 1
  elseif states[r] ~= 'SUCCEEDED' and m[2] then
    preempted = true -- stopped for a more urgent task
  elseif states[r] ~= 'SUCCEEDED' and (ended == nil or (states[r] == 'FAILED' and states[ended] ~= 'FAILED')) then
    ended = r -- the cause: a member that failed, rather than one stopped for it
  end
end
if preempted and ended ~= nil and states[ended] ~= 'FAILED' then ended = nil end -- stopped for the preemption
if ended == nil and not preempted and live > 0 then return {0} end
if ended == nil and not preempted then
  redis.call('SREM', KEYS[2], id)
  conclude(prefix, gang, id, 'SUCCEEDED', now, 'result', redis.call('HGET', KEYS[7], 'result') or 'null')
  return {4}
end
if live > 0 then
  for r = 0, members - 1 do
    local member = KEYS[7 + r]
    if states[r] == 'RUNNING' and redis.call('HSETNX', member, 'cancel_at', now) == 1 then
      redis.call('HSET', member, 'cancel_grace', ARGV[3])
    elseif states[r] == 'RESERVED' and redis.call('HSETNX', member, 'cancel_req', 'cancel') == 1 then
      redis.call('HSET', member, 'cancel_grace', ARGV[3])
      redis.call('ZADD', prefix .. 'expiring', now, redis.call('HGET', member, 'id'))
    end
  end
  redis.call('PUBLISH', KEYS[5], 'cancel')
  return {1}
end
local why, outcome = 'preempted', 'preempted'; redis.call('SREM', KEYS[2], id)
if ended == nil then -- preempted: back in line uncharged
  redis.call('HINCRBY', gang, 'preemptions', 1)
else
  why, outcome = 'member ' .. ended .. ' ' .. states[ended] .. ': ' .. (redis.call('HGET', KEYS[7 + ended], 'error') or ''), 'requeued'
  if num(g[3]) + 1 > num(g[4]) then
    conclude(prefix, gang, id, 'FAILED', now, 'error', why .. ' (retry limit reached)', 'retries', num(g[3]) + 1)
    return {3}
  end
  redis.call('HSET', gang, 'retries', num(g[3]) + 1)
end
tally(prefix .. 'outcomes', gang, outcome, tonumber(now))
redis.call('HSET', gang, 'state', 'PENDING', 'requeued_at', now, 'last_error', why)
redis.call('HDEL', gang, 'node', 'reserved_at', 'granted') -- granted afresh
redis.call('ZADD', KEYS[3], g[5], id); redis.call('HSET', KEYS[4], id, g[6])
redis.call('PUBLISH', KEYS[5], 'requeue')
return {2}
