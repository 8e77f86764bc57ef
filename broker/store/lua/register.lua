-- register.lua: add a node to the pool, or re-register it after a restart.
--
-- The same incarnation registering again (a reconnect) is idempotent: live
-- reservations are kept. A new incarnation of a known node id means the previous
-- worker process is gone: its reservations are reclaimed (tasks requeued, queue
-- dropped) before the new shape is written, so capacity is never counted twice.
-- An operator's drain (drain.lua) is kept across a new incarnation; a shutting-down
-- worker's own drain is not.
--
-- Transitions: RESERVED | RUNNING -> PENDING | FAILED | CANCELLED (the tasks of a replaced incarnation)
-- Includes: _lib.lua _release.lua
--
-- KEYS[1] prefix      the pool prefix (carries the hash tag) for reclaimed task keys
-- KEYS[2] node        hash of the node
-- KEYS[3] nodes       set of node ids
-- KEYS[4] leases      zset node id -> lease expiry (ms)
-- KEYS[5] pending     zset of pending tasks
-- KEYS[6] requests    hash task id -> request of pending tasks
-- KEYS[7] wake        channel dispatchers listen on
-- KEYS[8] changes     zset node id -> sequence of its last change
-- KEYS[9] tasks       hash task name -> catalogue entry (defaults, rate limit) for submits by name
-- ARGV[1] node_id
-- ARGV[2] incarnation unique id of the registering worker process
-- ARGV[3] now         ms since epoch
-- ARGV[4] lease_ms    lease length (ms)
-- ARGV[5] gpus        GPU count
-- ARGV[6] gpu_mem     memory per GPU (MiB)
-- ARGV[7] cpu_m       CPUs (milli-CPU)
-- ARGV[8] mem         RAM (MiB)
-- ARGV[9] slots       tasks that may run at once
-- ARGV[10] labels     JSON object of label -> value
-- ARGV[11] serves     'listed': it runs only the task names below; 'all': any task
-- ARGV[12+2i..13+2i]  for task name i it runs: the name, its catalogue entry (JSON, for P tasks)
-- Returns {code, reclaimed task count}:
--   0 CREATED        a node id not seen before
--   1 REFRESHED      same incarnation again; reservations kept
--   2 REPLACED       new incarnation; the previous one's reservations were reclaimed
--   3 SHAPE_CHANGED  same incarnation asked for a different shape; nothing changed

local node_key, now = KEYS[2], tonumber(ARGV[3])
local shape = {cap_gpus = ARGV[5], gpu_mem = ARGV[6], cap_cpu_m = ARGV[7], cap_mem = ARGV[8], cap_slots = ARGV[9]}
local old = redis.call('HGET', node_key, 'incarnation')
local code, reclaimed = 0, 0

if old == ARGV[2] then
  for field, value in pairs(shape) do
    if redis.call('HGET', node_key, field) ~= value then return {3, 0} end
  end
  code = 1
else
  if old then
    reclaimed = reclaim_node(KEYS[1], ARGV[1], KEYS[5], KEYS[6], now, 'node ' .. ARGV[1] .. ' restarted')
    code = 2
  end
  local draining = redis.call('HMGET', node_key, 'draining', 'draining_at')
  redis.call('DEL', node_key)
  if draining[1] == 'operator' then
    redis.call('HSET', node_key, 'draining', draining[1], 'draining_at', draining[2])
  end
  for field, value in pairs(shape) do
    redis.call('HSET', node_key, field, value)
  end
  for key, value in pairs(cjson.decode(ARGV[10])) do
    redis.call('HSET', node_key, 'label:' .. key, value)
  end
  redis.call('HSET', node_key, 'id', ARGV[1], 'incarnation', ARGV[2], 'registered_at', now, 'serves', ARGV[11])
  for i = 12, #ARGV, 2 do
    redis.call('HSET', node_key, 'task:' .. ARGV[i], 1)
  end
  reset_free(node_key)
end
for i = 12, #ARGV, 2 do -- the latest worker to register a name says what it is
  redis.call('HSET', KEYS[9], ARGV[i], ARGV[i + 1])
end

redis.call('HSET', node_key, 'state', 'up', 'heartbeat_at', now)
redis.call('HDEL', node_key, 'down_at')
touch(KEYS[8], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], int(now + tonumber(ARGV[4])), ARGV[1])
redis.call('PUBLISH', KEYS[7], 'register')
return {code, reclaimed}
