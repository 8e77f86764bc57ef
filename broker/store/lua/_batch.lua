-- _batch.lua: reserve.lua's per-batch memos and node views (needs _lib.lua); the other
-- scripts never pay for them.

-- Does a node's label value meet a task's selector value (one value, or a list of acceptable ones)?
local function label_ok(want, have)
  if type(want) ~= 'table' then return want == have end
  for _, v in ipairs(want) do
    if v == have then return true end
  end
  return false
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

-- The memos, made by batch_begin().
-- Text -> number (strtod) and number -> text (sprintf) cost more than the rest of a placement's
-- Lua, and a batch converts the same few values over and over.
local batch_num, batch_text, batch_gpu_fields, batch_indices, batch_request, batch_rates, batch_buckets

local function batch_begin(catalogue_key)
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
    -- A gang's (k) names no count of indices: reserve.lua places it nowhere (reserve_gang.lua's job).
    -- An elastic request (mg) names from `least` to `count` whole GPUs: the dispatcher's grant.
    r.count, r.labelled, r.allocs = r.k and -1 or (r.m > 0) and 1 or r.g, next(r.l) ~= nil, {}
    r.least = r.mg or r.count
    return r
  end)
  -- A task name's rate limit in starts per second from the pool's task catalogue (0: none).
  batch_rates = memo(function(name)
    local entry = redis.call('HGET', catalogue_key, name)
    return entry and tonumber(cjson.decode(entry).rate) or 0
  end)
  batch_buckets = {}
end

-- Take one start from task `name`'s token bucket (pool-wide; a burst of one second's worth,
-- at least one start); false when it is empty. Buckets are read once per batch.
local function batch_token(ratelimit_key, now, name)
  local rate = batch_rates[name]
  if rate <= 0 then return true end
  local b = batch_buckets[name]
  if b == nil then
    local capacity, saved = math.max(1, rate), redis.call('HGET', ratelimit_key, name)
    local tokens, last = capacity, now
    if saved then
      local sep = string.find(saved, ',', 1, true)
      tokens, last = tonumber(string.sub(saved, 1, sep - 1)), tonumber(string.sub(saved, sep + 1))
    end
    b = {tokens = math.min(capacity, tokens + math.max(0, now - last) * rate / 1000)}
    batch_buckets[name] = b
  end
  if b.tokens < 1 then return false end
  b.tokens = b.tokens - 1
  return true
end

-- Write the buckets a batch took from back, as of now.
local function batch_save_tokens(ratelimit_key, now)
  for name, b in pairs(batch_buckets) do
    redis.call('HSET', ratelimit_key, name, string.format('%.6f,%d', b.tokens, now))
  end
end

-- Whether the node runs task `name`: a node that listed its task names runs only those.
local function batch_serves(n, name)
  if not n.listed then return true end
  local known = n.serves[name]
  if known == nil then
    known = redis.call('HEXISTS', n.key, 'task:' .. name) == 1
    n.serves[name] = known
  end
  return known
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
-- false when the node is not up, is draining, or its lease (ZSCORE in leases_key) is before now.
local function batch_node(cache, leases_key, now, key, id, tasks_key, queue_key)
  local n = cache[id]
  if n == nil then
    local lease = redis.call('ZSCORE', leases_key, id)
    local h = redis.call('HMGET', key, 'state', 'free_cpu_m', 'free_mem', 'free_slots', 'cap_gpus', 'gpu_mem',
      'serves', 'draining')
    local v = batch_num
    n = h[1] == 'up' and not h[8] and lease and tonumber(lease) >= now and {key = key, cpu = v[h[2]], mem = v[h[3]],
      slots = v[h[4]], gpus = v[h[5]], gpu_mem = v[h[6]], milli = false, gmem = {}, labels = {},
      count = 0, tasks = {}, messages = {}, tasks_key = tasks_key, queue = queue_key,
      listed = h[7] == 'listed', serves = {},
      route = queue_route(queue_key)}
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

-- Whether request r fits on GPUs `listed` of node view n now, and what it takes of each:
-- (true, share, memory). A whole GPU takes all of it and must be wholly free.
local function batch_gpus_fit(n, r, listed)
  local whole, milli, mem = r.m == 0, MILLI, n.gpu_mem
  if not whole then milli, mem = r.m, (r.gm > 0) and r.gm or math.floor(r.m * n.gpu_mem / MILLI) end
  for k = 1, #listed do
    local free_milli, free_mem = batch_gpu(n, listed[k])
    if free_milli < milli or free_mem < mem then return false end
    if whole and (n.gpu_mem < r.gm or free_milli ~= MILLI or free_mem ~= n.gpu_mem) then return false end
  end
  return true, milli, mem
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

-- The message reserve.lua queues (queued_message, _lib.lua), with the node's route read once.
local function batch_message(n, message, tag, indices, r)
  return queued_message(n.route, message, tag, indices, r.t)
end
