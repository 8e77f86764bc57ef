-- _lib.lua: helpers shared by the transition scripts; scripts.py prepends this file
-- to every script when it loads them, so each script stays one atomic EVAL.
--
-- Invariant kept by every helper: for each node, free + the sum of the `alloc`
-- of the tasks in its `:tasks` set = capacity, per GPU index, CPU, RAM and slots.

local MILLI = 1000
-- kombu's priority bucket separator and the buckets besides 0 (kombu/transport/redis.py).
local BUCKETS = {'\6\22' .. '3', '\6\22' .. '6', '\6\22' .. '9'}

local function num(x)
  return tonumber(x) or 0
end

-- A Lua number is formatted with %.14g when passed to redis.call: exact integers
-- above 2^47 (pending scores) need an explicit format, and -0 is not an integer to Redis.
local function int(x)
  return string.format('%d', x)
end

local function incr(key, field, delta)
  return redis.call('HINCRBY', key, field, int(delta))
end

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

-- Note that a node's free capacity, state or registration changed, for dispatchers that keep
-- what they read (state.read_free re-reads only nodes scored above what it saw last).
local function touch(changes_key, node_id)
  local last = redis.call('ZREVRANGE', changes_key, 0, 0, 'WITHSCORES')
  redis.call('ZADD', changes_key, int((tonumber(last[2]) or 0) + 1), node_id)
end

-- Set every free amount of a node back to its capacity (no reservations left).
local function reset_free(node_key)
  local cap = redis.call('HMGET', node_key, 'cap_gpus', 'gpu_mem', 'cap_cpu_m', 'cap_mem', 'cap_slots')
  for i = 0, num(cap[1]) - 1 do
    redis.call('HSET', node_key, 'g' .. i .. '_milli', MILLI, 'g' .. i .. '_mem', cap[2])
  end
  redis.call('HSET', node_key, 'free_cpu_m', cap[3], 'free_mem', cap[4], 'free_slots', cap[5])
end

-- Does a node's label value meet a task's selector value (one value, or a list of acceptable ones)?
local function label_ok(want, have)
  if type(want) ~= 'table' then return want == have end
  for _, v in ipairs(want) do
    if v == have then return true end
  end
  return false
end

-- Back to PENDING at its original place in line (the score keeps its submit order).
local function requeue(task_key, pending_key, requests_key, task_id, now)
  local t = redis.call('HMGET', task_key, 'score', 'req')
  redis.call('HSET', task_key, 'state', 'PENDING', 'requeued_at', now)
  redis.call('HDEL', task_key, 'node', 'gpus', 'tag', 'reserved_at', 'started_at', 'preempt_at', 'preempt_by',
    'preempt_grace')
  redis.call('ZADD', pending_key, t[1], task_id)
  redis.call('HSET', requests_key, task_id, t[2])
end

-- A task whose process or node was lost. `charge` counts it against max_retries
-- (it had started); returns the task's new state.
local function recover(task_key, pending_key, requests_key, task_id, now, reason, charge)
  if charge then
    local retries = redis.call('HINCRBY', task_key, 'retries', 1)
    if retries > num(redis.call('HGET', task_key, 'max_retries')) then
      redis.call('HSET', task_key, 'state', 'FAILED', 'finished_at', now,
        'error', reason .. ' (retry limit reached)')
      return 'FAILED'
    end
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
    recover(task_key, pending_key, requests_key, id, now, reason, state == 'RUNNING')
  end
  local q = prefix .. 'q:' .. node_id
  redis.call('DEL', tasks_key, q, q .. ':unacked', q .. ':unacked_index', q .. ':unacked_mutex')
  for _, suffix in ipairs(BUCKETS) do
    redis.call('DEL', q .. suffix)
  end
  reset_free(node_key)
  return #ids
end


-- Run a variadic command over a long list in chunks: Lua's unpack has a stack limit.
local function call_chunked(command, key, items)
  for first = 1, #items, 1000 do
    redis.call(command, key, unpack(items, first, math.min(first + 999, #items)))
  end
end

-- A table that computes each missing entry once with make(key) and keeps it.
local function memo(make)
  return setmetatable({}, {__index = function(t, key)
    local value = make(key)
    t[key] = value
    return value
  end})
end

-- reserve.lua's per-batch memos, made by batch_begin() (the other scripts never pay for them).
-- Text -> number (strtod) and number -> text (sprintf) cost more than the rest of a placement's
-- Lua, and a batch converts the same few values over and over.
local batch_num, batch_text, batch_gpu_fields, batch_indices, batch_request

local function batch_begin()
  batch_num = memo(function(s) return tonumber(s) or 0 end) -- false (missing field) -> 0
  batch_text = memo(int)
  batch_gpu_fields = memo(function(count) -- GPU count -> {'g0_milli', 'g0_mem', 'g1_milli', ...}
    local fields = {}
    for g = 0, count - 1 do
      fields[2 * g + 1], fields[2 * g + 2] = 'g' .. g .. '_milli', 'g' .. g .. '_mem'
    end
    return fields
  end)
  -- GPU indices of a placement ("3", "0,3", or "" for none) -> list; false when one is not
  -- a whole number or is repeated (the range is checked per node).
  batch_indices = memo(function(indices)
    local listed, seen = {}, {}
    for index in string.gmatch(indices, '[^,]+') do
      local i = tonumber(index)
      if not i or i ~= math.floor(i) or seen[i] then return false end
      seen[i], listed[#listed + 1] = true, i
    end
    return listed
  end)
  -- A task's request (one shape, one text: decoded once per batch), with what reserve.lua
  -- derives from it: how many GPU indices a placement names, and whether it selects labels.
  batch_request = memo(function(text)
    local r = cjson.decode(text)
    r.count, r.labelled, r.allocs = (r.m > 0) and 1 or r.g, next(r.l) ~= nil, {}
    return r
  end)
end

-- The `alloc` JSON of request r on GPUs `indices` (listed), each holding milli and mem:
-- the same few texts over and over, so each is built once per batch.
local function batch_alloc(r, listed, indices, milli, mem)
  local known = r.allocs[mem] or {} -- milli follows from r, mem from r and the node's GPU size
  r.allocs[mem] = known
  if known[indices] == nil then
    local g = {}
    for k = 1, #listed do
      g[k] = string.format('[%d,%d,%d]', listed[k], milli, mem)
    end
    known[indices] = string.format('{"g":[%s],"c":%d,"r":%d}', table.concat(g, ','), r.c, r.r)
  end
  return known[indices]
end

-- reserve.lua's per-batch view of a node: read once, updated in memory, written once.
-- false when the node is not up or its lease (ZSCORE in leases_key) is before now.
local function batch_node(cache, leases_key, now, key, id, tasks_key, queue_key)
  local n = cache[id]
  if n == nil then
    local lease = redis.call('ZSCORE', leases_key, id)
    local h = redis.call('HMGET', key, 'state', 'free_cpu_m', 'free_mem', 'free_slots', 'cap_gpus', 'gpu_mem')
    local v = batch_num
    n = h[1] == 'up' and lease and tonumber(lease) >= now and {key = key, cpu = v[h[2]], mem = v[h[3]],
      slots = v[h[4]], gpus = v[h[5]], gpu_mem = v[h[6]], milli = false, gmem = {}, labels = {},
      count = 0, tasks = {}, messages = {}, tasks_key = tasks_key, queue = queue_key,
      -- what kombu's Redis transport adds to a message's properties, up to the delivery tag
      route = ',"delivery_info":{"exchange":"","routing_key":"' .. queue_key .. '"},"delivery_tag":"'}
    cache[id] = n
  end
  return n
end

-- Free share (milli) and memory of GPU i in a batch_node view; all GPUs of the node
-- are read in one call on first use.
local function batch_gpu(n, i)
  if not n.milli then
    local f = redis.call('HMGET', n.key, unpack(batch_gpu_fields[n.gpus]))
    n.milli = {}
    for g = 0, n.gpus - 1 do
      n.milli[g], n.gmem[g] = batch_num[f[2 * g + 1]], batch_num[f[2 * g + 2]]
    end
  end
  return n.milli[i], n.gmem[i]
end

-- Write a batch_node view back: free amounts, task set, queued messages.
local function batch_flush(n)
  local text = batch_text
  local fields = {'free_cpu_m', text[n.cpu], 'free_mem', text[n.mem], 'free_slots', text[n.slots]}
  if n.milli then
    local names = batch_gpu_fields[n.gpus]
    for g = 0, n.gpus - 1 do
      local k = 4 * g + 7
      fields[k], fields[k + 1], fields[k + 2], fields[k + 3] = names[2 * g + 1], text[n.milli[g]],
        names[2 * g + 2], text[n.gmem[g]]
    end
  end
  call_chunked('HSET', n.key, fields)
  call_chunked('SADD', n.tasks_key, n.tasks)
  call_chunked('LPUSH', n.queue, n.messages)
end
