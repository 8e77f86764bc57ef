-- submit_gang.lua: accept a validated gang (replicas > 1) into the pool's pending queue.
--
-- Invariant: a gang is written whole or not at all: its record, its one queue entry (a gang
-- waits, and is placed, as one unit) and the Celery message of each member (task id
-- '<id>:m<rank>', built by Celery at submit like any task's), kept on the gang's record
-- until reserve_gang.lua creates the member records and queues them all in one call. An
-- idempotency key maps to exactly one gang. Timers (countdown, ETA, expiry) are refused
-- before this script for a gang.
--
-- Transitions: (new) -> PENDING
-- Includes: _lib.lua _request.lua
--
-- KEYS[1] task         hash of the new gang
-- KEYS[2] pending      zset of pending tasks, scored -priority * 2^32 + seq
-- KEYS[3] requests     hash task id -> request of pending tasks
-- KEYS[4] idempotency  string: the task id the idempotency key stands for (KEYS[1] if no key)
-- KEYS[5] seq          submit counter
-- KEYS[6] wake         channel dispatchers listen on
-- KEYS[7] mix          hash GPU kind -> tasks submitted of that kind
-- ARGV[1] task_id
-- ARGV[2] idempotency_key  '' for none
-- ARGV[3] priority     integer, higher runs first
-- ARGV[4] now          ms since epoch
-- ARGV[5] request      the gang's compact request JSON (with k, sp, sl)
-- ARGV[6] member_request  what one member asks for (the request without k, sp, sl)
-- ARGV[7] name         Celery task name
-- ARGV[8] tenant
-- ARGV[9] max_retries  requeues of the whole gang allowed
-- ARGV[10] gpu_kind    a member's GPU kind ("whole,milli"), counted once per member in the mix
-- ARGV[11] result_ttl  ms the records are kept once final (0: kept)
-- ARGV[12+r]           the Celery message of member r (r = 0 .. k-1), task id '<task_id>:m<r>'
-- Returns {code, task_id}:
--   0 CREATED
--   1 DUPLICATE   the idempotency key is known: task_id is the existing task
--   2 ID_TAKEN    a task with this id already exists; nothing written
--   3 BAD_REQUEST {3, key, reason}: the request, a message or the priority is malformed; nothing written

local id, key = ARGV[1], ARGV[2]
local field, why = request_problem(ARGV[5], true)
if not field then field, why = request_problem(ARGV[6]) end
local replicas = field == nil and cjson.decode(ARGV[5]).k or 0
if not field and #ARGV ~= 11 + replicas then field, why = 'message', 'one message per member' end
for r = 0, replicas - 1 do
  if field then break end
  field, why = message_problem(ARGV[12 + r], id .. ':m' .. r)
end
if not field and not is_int(tonumber(ARGV[3]), -MAX_PRIORITY, MAX_PRIORITY) then
  field, why = 'priority', 'must be an integer from -1000000 to 1000000'
end
if field then return {3, field, why} end
if key ~= '' then
  local existing = redis.call('GET', KEYS[4])
  if existing then return {1, existing} end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {2, id} end

local seq = redis.call('INCR', KEYS[5])
local score = int(-tonumber(ARGV[3]) * 4294967296 + seq)
redis.call('HSET', KEYS[1], 'id', id, 'name', ARGV[7], 'tenant', ARGV[8], 'priority', ARGV[3],
  'state', 'PENDING', 'seq', seq, 'score', score, 'req', ARGV[5], 'member_req', ARGV[6],
  'replicas', replicas, 'max_retries', ARGV[9], 'gpu_kind', ARGV[10], 'result_ttl', ARGV[11],
  'submitted_at', ARGV[4], 'retries', 0, 'attempts', 0)
for r = 0, replicas - 1 do
  redis.call('HSET', KEYS[1], 'message:' .. r, ARGV[12 + r])
end
redis.call('ZADD', KEYS[2], score, id)
redis.call('HSET', KEYS[3], id, ARGV[5])
if key ~= '' then
  redis.call('HSET', KEYS[1], 'idempotency_key', key)
  redis.call('SET', KEYS[4], id)
end
redis.call('HINCRBY', KEYS[7], ARGV[10], replicas)
redis.call('PUBLISH', KEYS[6], 'submit')
return {0, id}
