-- submit.lua: accept a validated task into the pool's pending queue.
--
-- Invariant: a task is written whole (record, queue entry, request) or not at all; an
-- idempotency key maps to exactly one task. A task with a start time in the future
-- (countdown, ETA) waits in `delayed` and holds nothing until promote.lua moves it.
-- A task that replaced itself (Celery's Task.replace; finish.lua's outcome 'replaced') waits,
-- PENDING and `awaiting`, for the message sent under its id: that one takes the record over
-- (its attempts go on counting, so no delivery tag is ever reused). Any other id taken is
-- refused, and so is a request the dispatcher could not read (_request.lua).
--
-- Transitions: (new) | PENDING (awaiting its replacement) -> PENDING
-- Includes: _lib.lua _request.lua
--
-- KEYS[1] task         hash of the new task
-- KEYS[2] pending      zset of pending tasks, scored -priority * 2^32 + seq
-- KEYS[3] requests     hash task id -> request of pending tasks
-- KEYS[4] idempotency  string: the task id the idempotency key stands for (KEYS[1] if no key)
-- KEYS[5] seq          submit counter
-- KEYS[6] wake         channel dispatchers listen on
-- KEYS[7] mix          hash GPU kind -> tasks submitted of that kind
-- KEYS[8] delayed      zset of tasks not to start before their score (ms)
-- KEYS[9] expiring     zset of tasks cancelled if still pending at their score (ms)
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
-- ARGV[11] not_before  ms; not placed before then (0: at once)
-- ARGV[12] expires_at  ms; cancelled if not started by then (0: never)
-- ARGV[13] result_ttl  ms the record is kept once final (0: kept)
-- ARGV[14] event_channel  '' for none: once created, ARGV[15] is published there
-- ARGV[15] event       Celery's task-sent event for the task (Flower lists it at once)
-- Returns {code, task_id}:
--   0 CREATED
--   1 DUPLICATE   the idempotency key is known: task_id is the existing task
--   2 ID_TAKEN    a task with this id already exists (and is not awaiting its replacement); nothing written
--   3 BAD_REQUEST {3, key, reason}: the request, message or priority is malformed; nothing written

local field, why = request_problem(ARGV[5])
if not field then field, why = message_problem(ARGV[6], ARGV[1]) end
if not field and not is_int(tonumber(ARGV[3]), -MAX_PRIORITY, MAX_PRIORITY) then
  field, why = 'priority', 'must be an integer from -1000000 to 1000000'
end
if field then return {3, field, why} end
local id, key, now = ARGV[1], ARGV[2], tonumber(ARGV[4])
if key ~= '' then
  local existing = redis.call('GET', KEYS[4])
  if existing then return {1, existing} end
end
local held = redis.call('HMGET', KEYS[1], 'state', 'awaiting')
local replacing = held[1] == 'PENDING' and held[2] ~= false
if held[1] and not replacing then return {2, id} end

local seq = redis.call('INCR', KEYS[5])
local score = int(-tonumber(ARGV[3]) * 4294967296 + seq)
redis.call('HSET', KEYS[1], 'id', id, 'name', ARGV[7], 'tenant', ARGV[8], 'priority', ARGV[3],
  'state', 'PENDING', 'seq', seq, 'score', score, 'req', ARGV[5], 'message', ARGV[6],
  'max_retries', ARGV[9], 'gpu_kind', ARGV[10], 'result_ttl', ARGV[13])
if replacing then
  redis.call('HDEL', KEYS[1], 'awaiting', 'replaced_by', 'not_before', 'expires_at')
else
  redis.call('HSET', KEYS[1], 'submitted_at', ARGV[4], 'retries', 0, 'attempts', 0)
end
local not_before, expires_at = tonumber(ARGV[11]), tonumber(ARGV[12])
if not_before > now then
  redis.call('HSET', KEYS[1], 'not_before', ARGV[11])
  redis.call('ZADD', KEYS[8], ARGV[11], id)
else
  redis.call('ZADD', KEYS[2], score, id)
  redis.call('HSET', KEYS[3], id, ARGV[5])
end
if expires_at > 0 then
  redis.call('HSET', KEYS[1], 'expires_at', ARGV[12])
  redis.call('ZADD', KEYS[9], ARGV[12], id)
end
if key ~= '' then
  redis.call('HSET', KEYS[1], 'idempotency_key', key)
  redis.call('SET', KEYS[4], id)
end
redis.call('HINCRBY', KEYS[7], ARGV[10], 1)
-- A task now in the queue names itself and its request, for the dispatcher's express placement
-- (broker.express): on an idle cluster it places the task from this alone, in one round trip.
redis.call('PUBLISH', KEYS[6], not_before > now and 'submit' or 'submit\n' .. ARGV[5] .. '\n' .. id)
if ARGV[14] ~= '' then redis.call('PUBLISH', ARGV[14], ARGV[15]) end
return {0, id}
