-- reserve.lua: commit a batch of placements the dispatcher's policy proposed.
--
-- Python proposes, Lua commits: each placement is re-checked (node up, labels, task
-- name served, capacity per GPU index, the name's rate limit); if it fits, the task moves
-- PENDING -> RESERVED, the capacity is taken and the task's Celery message goes onto the
-- node's queue, in this one script (no capacity without a message, nor the reverse). A
-- refused placement changes nothing. Nodes are read and written once per batch.
--
-- Transitions: PENDING -> RESERVED
-- Includes: _lib.lua _batch.lua
--
-- KEYS[1] pending      zset of pending tasks
-- KEYS[2] requests     hash task id -> request of pending tasks (what the dispatcher checked)
-- KEYS[3] leases       zset node id -> lease expiry (ms)
-- KEYS[4] changes      zset node id -> sequence of its last change
-- KEYS[5] tasks        hash task name -> catalogue entry (its rate limit)
-- KEYS[6] ratelimit    hash task name -> token bucket "tokens,last_ms"
-- KEYS[7+4i..10+4i]    for placement i: task hash, node hash, node's task set, node queue
-- ARGV[1] now          ms since epoch
-- ARGV[2+3i..4+3i]     for placement i: task id, node id, GPU indices ("0,3" or "")
-- Returns one code per placement, in order:
--   0 OK
--   1 NOT_PENDING    the task is no longer pending (placed or cancelled meanwhile)
--   2 NODE_DOWN      the node is not up, is draining, or its lease expired
--   3 LABEL_MISMATCH the node lacks a label the task selects
--   4 NO_CAPACITY    not enough free CPU, RAM, slots or GPU share/memory now
--   5 BAD_PLACEMENT  wrong number of GPU indices (an elastic task's: from min_gpus to gpus),
--                    unknown or repeated index
--   6 NOT_SERVED     the node does not run this task name
--   7 RATE_LIMITED   the task name's rate limit allows no start now

batch_begin(KEYS[5])
local now, nodes, taken, text = tonumber(ARGV[1]), {}, {}, batch_text

local function reserve(task_key, node_key, tasks_key, queue_key, id, node_id, indices)
  local t = redis.call('HMGET', task_key, 'state', 'message', 'attempts', 'not_before')
  local req = redis.call('HGET', KEYS[2], id)
  if t[1] ~= 'PENDING' or t[4] or not req then return 1 end -- a delayed task is not in the queue yet
  local n = nodes[node_id]
  if n == nil then n = batch_node(nodes, KEYS[3], now, node_key, node_id, tasks_key, queue_key) end
  if not n then return 2 end
  local r, listed = batch_request[req], batch_indices[indices]
  if not listed or #listed > r.count or #listed < r.least then return 5 end -- elastic: the grant
  for k = 1, #listed do if listed[k] < 0 or listed[k] >= n.gpus then return 5 end end
  if r.labelled then
    for key, value in pairs(r.l) do
      if n.labels[key] == nil then n.labels[key] = redis.call('HGET', n.key, 'label:' .. key) end
      if not label_ok(value, n.labels[key]) then return 3 end
    end
  end
  if not batch_serves(n, r.n) then return 6 end
  if n.slots < 1 or n.cpu < r.c or n.mem < r.r then return 4 end
  local fits, milli, mem = batch_gpus_fit(n, r, listed)
  if not fits then return 4 end
  if not batch_token(KEYS[6], now, r.n) then return 7 end -- last: a refused placement takes no start

  for k = 1, #listed do
    local i = listed[k]
    n.milli[i], n.gmem[i] = n.milli[i] - milli, n.gmem[i] - mem
  end
  n.cpu, n.mem, n.slots, n.count = n.cpu - r.c, n.mem - r.r, n.slots - 1, n.count + 1
  -- The delivery tag names the attempt: start.lua fences on it, and kombu keys unacked by it.
  local attempts = text[batch_num[t[3]] + 1]
  local tag = id .. '.' .. attempts
  redis.call('HSET', task_key, 'state', 'RESERVED', 'node', node_id, 'gpus', indices, 'tag', tag,
    'attempts', attempts, 'reserved_at', ARGV[1], 'alloc', batch_alloc(r, listed, indices, milli, mem))
  taken[#taken + 1], n.tasks[n.count] = id, id
  n.messages[n.count] = batch_message(n, t[2], tag, indices, r)
  return 0
end

local out = {}
for i = 0, (#ARGV - 1) / 3 - 1 do
  out[i + 1] = reserve(KEYS[7 + 4 * i], KEYS[8 + 4 * i], KEYS[9 + 4 * i], KEYS[10 + 4 * i],
    ARGV[2 + 3 * i], ARGV[3 + 3 * i], ARGV[4 + 3 * i])
end
for id, n in pairs(nodes) do
  if n and n.count > 0 then
    batch_flush(n)
    touch(KEYS[4], id)
  end
end
batch_save_tokens(KEYS[6], now)
call_chunked('ZREM', KEYS[1], taken)
call_chunked('HDEL', KEYS[2], taken)
return out
