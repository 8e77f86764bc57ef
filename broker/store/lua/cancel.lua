-- cancel.lua: cancel a live task (Client.cancel, Celery's revoke).
--
-- A pending or reserved task ends CANCELLED here and gives back what it holds. A running
-- one keeps its capacity until its process is gone: it is marked, its worker stops it
-- (SIGTERM, the grace period, SIGKILL) and finish.lua releases it and records CANCELLED,
-- so the next task never starts beside it. Mode 'revoke' (Celery's revoke without
-- terminate) lets a running attempt finish but never runs the task again. Harmless on a
-- final task. The caller passes the keys of the node it believes holds a reserved task; if
-- the task moved meanwhile nothing changes and the script says where it is now. A caller
-- that may not write node state (the producer role) asks instead (ARGV[6]): a reserved task
-- is marked `cancel_req` and put in `expiring` due now, so the dispatcher's expire.lua, which
-- may write node state, releases it on its next cycle (woken by this script).
--
-- Transitions: PENDING | RESERVED -> CANCELLED (a RUNNING task is marked; finish.lua ends it)
-- Includes: _lib.lua _release.lua
--
-- KEYS[1] task        hash of the task
-- KEYS[2] node        hash of the node the caller believes holds it (any key of the pool if none)
-- KEYS[3] node_tasks  that node's task set
-- KEYS[4] pending     zset of pending tasks
-- KEYS[5] requests    hash task id -> request of pending tasks
-- KEYS[6] wake        channel dispatchers listen on
-- KEYS[7] changes     zset node id -> sequence of its last change (any key of the pool if none)
-- KEYS[8] prefix      the pool prefix (carries the hash tag): delayed, expiring, idempotency keys
-- ARGV[1] task_id
-- ARGV[2] node_id     node the caller believes holds the task, '' for none
-- ARGV[3] now         ms since epoch
-- ARGV[4] mode        'cancel' (stop it) | 'revoke' (a running attempt may finish)
-- ARGV[5] grace_ms    how long its worker waits after SIGTERM before SIGKILL
-- ARGV[6] ask         '1': the caller may not write node state; '' otherwise
-- Returns {code, detail}:
--   0 CANCELLED      detail = the state it was cancelled from
--   1 NOT_FOUND      no such task
--   2 ALREADY_FINAL  detail = its final state; nothing changed
--   3 MOVED          detail = the node that holds it now ('' for none); nothing changed
--   4 STOPPING       it is running: marked; detail = its node, whose worker stops it
--   5 REVOKED        it is running: this attempt may finish, no other will run; detail = its node
--   6 REQUESTED      it is reserved: asked (ARGV[6]); a dispatcher releases it; detail = its node

local task_key, id, prefix = KEYS[1], ARGV[1], KEYS[8]
local t = redis.call('HMGET', task_key, 'state', 'node')
local state, node = t[1], t[2] or ''
if not state then return {1, ''} end
if state == 'SUCCEEDED' or state == 'FAILED' or state == 'CANCELLED' then return {2, state} end
if state == 'RUNNING' then
  if ARGV[4] == 'revoke' then
    redis.call('HSET', task_key, 'revoked', ARGV[3])
    return {5, node}
  end
  if redis.call('HSETNX', task_key, 'cancel_at', ARGV[3]) == 1 then -- the first cancel's grace holds
    redis.call('HSET', task_key, 'cancel_grace', ARGV[5])
  end
  return {4, node}
end
if state == 'PENDING' then
  redis.call('ZREM', KEYS[4], id)
  redis.call('HDEL', KEYS[5], id)
else
  if node ~= ARGV[2] then
    if ARGV[6] ~= '1' or ARGV[2] ~= '' then return {3, node} end
    redis.call('HSET', task_key, 'cancel_req', ARGV[4], 'cancel_grace', ARGV[5])
    redis.call('ZADD', prefix .. 'expiring', ARGV[3], id)
    redis.call('PUBLISH', KEYS[6], 'cancel')
    return {6, node}
  end
  unhold(task_key, KEYS[2], KEYS[3], id)
  touch(KEYS[7], node)
end
conclude(prefix, task_key, id, 'CANCELLED', ARGV[3])
redis.call('PUBLISH', KEYS[6], 'cancel')
return {0, state}
