-- reserve.lua: commit a batch of placements the dispatcher's policy proposed.
--
-- Python proposes, Lua commits: each placement is re-checked against the node's
-- current free capacity; if it fits, the task moves PENDING -> RESERVED, the
-- capacity is taken per GPU index, and the task's Celery message goes onto the
-- node's queue, all in this one script (no capacity without a message, no
-- message without capacity). A placement that no longer fits changes nothing.
--
-- KEYS[1] pending      zset of pending tasks
-- KEYS[2] requests     hash task id -> request of pending tasks
-- KEYS[3] leases       zset node id -> lease expiry (ms)
-- KEYS[4+4i..7+4i]     for placement i: task hash, node hash, node's task set, node queue
-- ARGV[1] now          ms since epoch
-- ARGV[2+3i..4+3i]     for placement i: task id, node id, GPU indices ("0,3" or "")
-- Returns one code per placement, in order:
--   0 OK
--   1 NOT_PENDING    the task is no longer pending (placed or cancelled meanwhile)
--   2 NODE_DOWN      the node is not up or its lease has expired
--   3 LABEL_MISMATCH the node lacks a label the task selects
--   4 NO_CAPACITY    not enough free CPU, RAM, slots or GPU share/memory now
--   5 BAD_PLACEMENT  wrong number of GPU indices, unknown or repeated index

local now = tonumber(ARGV[1])

local function reserve(task_key, node_key, node_tasks_key, queue_key, id, node_id, indices)
  local t = redis.call('HMGET', task_key, 'state', 'req', 'message')
  if t[1] ~= 'PENDING' then return 1 end
  local lease = redis.call('ZSCORE', KEYS[3], node_id)
  if redis.call('HGET', node_key, 'state') ~= 'up' or not lease or tonumber(lease) < now then return 2 end
  local r = cjson.decode(t[2])
  for key, value in pairs(r.l) do
    if redis.call('HGET', node_key, 'label:' .. key) ~= value then return 3 end
  end
  local n = redis.call('HMGET', node_key, 'free_cpu_m', 'free_mem', 'free_slots', 'cap_gpus', 'gpu_mem')
  if num(n[3]) < 1 or num(n[1]) < r.c or num(n[2]) < r.r then return 4 end
  local cap_gpus, gpu_mem = num(n[4]), num(n[5])

  local want = r.g
  if r.m > 0 then want = 1 end
  local alloc, seen = {}, {}
  for index in string.gmatch(indices, '[^,]+') do
    local i = tonumber(index)
    if not i or i < 0 or i >= cap_gpus or i ~= math.floor(i) or seen[i] then return 5 end
    seen[i] = true
    local free = redis.call('HMGET', node_key, 'g' .. i .. '_milli', 'g' .. i .. '_mem')
    local milli, mem = MILLI, gpu_mem
    if r.m > 0 then
      milli = r.m
      mem = r.gm
      if mem == 0 then mem = math.floor(r.m * gpu_mem / MILLI) end
    elseif gpu_mem < r.gm or num(free[1]) ~= MILLI or num(free[2]) ~= gpu_mem then
      return 4
    end
    if num(free[1]) < milli or num(free[2]) < mem then return 4 end
    alloc[#alloc + 1] = {i, milli, mem}
  end
  if #alloc ~= want then return 5 end

  for _, g in ipairs(alloc) do
    incr(node_key, 'g' .. g[1] .. '_milli', -g[2])
    incr(node_key, 'g' .. g[1] .. '_mem', -g[3])
  end
  incr(node_key, 'free_cpu_m', -r.c)
  incr(node_key, 'free_mem', -r.r)
  incr(node_key, 'free_slots', -1)

  -- The delivery tag names the attempt: start.lua fences on it, and kombu keys unacked by it.
  local tag = id .. '.' .. redis.call('HINCRBY', task_key, 'attempts', 1)
  redis.call('HSET', task_key, 'state', 'RESERVED', 'node', node_id, 'gpus', indices, 'tag', tag,
    'reserved_at', now, 'alloc', cjson.encode({g = alloc, c = r.c, r = r.r}))
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  redis.call('SADD', node_tasks_key, id)
  -- The stored message is Celery's own JSON ending in its properties object; only the
  -- routing and the tag are added, as kombu's Redis transport would (never re-encoded).
  local message = string.sub(t[3], 1, -3) .. ',"delivery_info":{"exchange":"","routing_key":"'
    .. queue_key .. '"},"delivery_tag":"' .. tag .. '"}}'
  redis.call('LPUSH', queue_key, message)
  return 0
end

local out = {}
for i = 0, (#ARGV - 1) / 3 - 1 do
  out[i + 1] = reserve(KEYS[4 + 4 * i], KEYS[5 + 4 * i], KEYS[6 + 4 * i], KEYS[7 + 4 * i],
    ARGV[2 + 3 * i], ARGV[3 + 3 * i], ARGV[4 + 3 * i])
end
return out
