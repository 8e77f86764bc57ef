-- submit.lua: accept a validated task into the pool's pending queue.
--
-- Invariant: a task is written whole (record, pending entry, request) or not at
-- all; an idempotency key maps to exactly one task.
--
-- Transitions: (new) -> PENDING
-- Includes: _lib.lua
--
-- KEYS[1] task         hash of the new task
-- KEYS[2] pending      zset of pending tasks, scored -priority * 2^32 + seq
-- KEYS[3] requests     hash task id -> request of pending tasks
-- KEYS[4] idempotency  hash idempotency key -> task id
-- KEYS[5] seq          submit counter
-- KEYS[6] wake         channel dispatchers listen on
-- KEYS[7] mix          hash GPU kind -> tasks submitted of that kind
-- ARGV[1] task_id
-- ARGV[2] idempotency_key  '' for none
-- ARGV[3] priority     integer, higher runs first
-- ARGV[4] now          ms since epoch
-- ARGV[5] request      compact request JSON (resources, name, tenant, estimate)
-- ARGV[6] message      the Celery message Celery built, without delivery tag/info
-- ARGV[7] name         Celery task name
-- ARGV[8] tenant
-- ARGV[9] max_retries  requeues allowed after a lost worker
-- ARGV[10] gpu_kind    the request's GPU kind ("whole,milli"), counted in the mix
-- Returns {code, task_id}:
--   0 CREATED
--   1 DUPLICATE   the idempotency key is known: task_id is the existing task
--   2 ID_TAKEN    a task with this id already exists; nothing written

local id, key = ARGV[1], ARGV[2]
if key ~= '' then
  local existing = redis.call('HGET', KEYS[4], key)
  if existing then return {1, existing} end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {2, id} end

local seq = redis.call('INCR', KEYS[5])
local score = int(-tonumber(ARGV[3]) * 4294967296 + seq)
redis.call('HSET', KEYS[1], 'id', id, 'name', ARGV[7], 'tenant', ARGV[8], 'priority', ARGV[3],
  'state', 'PENDING', 'seq', seq, 'score', score, 'submitted_at', ARGV[4], 'req', ARGV[5],
  'message', ARGV[6], 'max_retries', ARGV[9], 'retries', 0, 'attempts', 0, 'gpu_kind', ARGV[10])
redis.call('ZADD', KEYS[2], score, id)
redis.call('HSET', KEYS[3], id, ARGV[5])
if key ~= '' then redis.call('HSET', KEYS[4], key, id) end
redis.call('HINCRBY', KEYS[7], ARGV[10], 1)
redis.call('PUBLISH', KEYS[6], 'submit')
return {0, id}
