-- reserve_gang.lua: commit a whole gang the dispatcher's planner placed: all members or none.
--
-- Each member's placement is checked as reserve.lua checks a task's (node up, lease, labels,
-- name served, capacity per GPU index, members on one node adding up); only if all fit do
-- the gang and each member's record '<id>:m<rank>' (made afresh, with its rendezvous: ranks,
-- world, rank 0's node and a port there) go RESERVED, capacity taken and messages queued, in
-- this one script: no member holds capacity while another waits; a refusal changes nothing.
--
-- Transitions: PENDING -> RESERVED
-- Includes: _lib.lua _batch.lua
--
-- KEYS[1] pending      zset of pending tasks
-- KEYS[2] requests     hash task id -> request of pending tasks
-- KEYS[3] leases       zset node id -> lease expiry (ms)
-- KEYS[4] changes      zset node id -> sequence of its last change
-- KEYS[5] tasks        hash task name -> catalogue entry
-- KEYS[6] gang         hash of the gang
-- KEYS[7] gangs        set of reserved gangs (settle_gang.lua's)
-- KEYS[8+4r..11+4r]    for member r: its task hash, node hash, node's task set, node queue; as many
--                      members as granted (an elastic gang: from its min_replicas to replicas)
-- ARGV[1] now          ms since epoch
-- ARGV[2] gang_id
-- ARGV[3+2r..4+2r]     for member r: node id, GPU indices ("0,3" or "")
-- Returns {code, rank}: rank is the first member refused (-1 for the gang itself):
--   0 OK
--   1 NOT_PENDING    the gang is not pending, a member of its last attempt still lives, or the
--                    call names too few or too many members (fewer than min_replicas, more than replicas)
--   2 NODE_DOWN      a member's node is not up, is draining, or its lease expired
--   3 LABEL_MISMATCH a member's node lacks a label the gang selects
--   4 NO_CAPACITY    not enough free CPU, RAM, slots or GPU share/memory for a member now
--   5 BAD_PLACEMENT  wrong number of GPU indices, unknown or repeated index
--   6 NOT_SERVED     a member's node does not run this task name

batch_begin(KEYS[5])
local now, id, nodes = tonumber(ARGV[1]), ARGV[2], {}
local g = redis.call('HMGET', KEYS[6], 'state', 'member_req', 'replicas', 'attempts', 'name', 'tenant', 'priority',
  'score', 'submitted_at', 'result_ttl', 'preemptions')
local k, req, m = tonumber(g[3]) or 0, redis.call('HGET', KEYS[2], id), (#ARGV - 2) / 2 -- m: members granted
if g[1] ~= 'PENDING' or not g[2] or not req or m % 1 ~= 0 or m > k or m < (batch_request[req].mk or k) then
  return {1, -1}
end
local r, order, placed = batch_request[g[2]], {}, {}
local function fits(rank)
  local node_id, indices, at = ARGV[3 + 2 * rank], ARGV[4 + 2 * rank], 8 + 4 * rank
  local last = redis.call('HGET', KEYS[at], 'state') -- a member of the last attempt, still stopping?
  if last == 'RESERVED' or last == 'RUNNING' then return 1 end
  local n = nodes[node_id]
  if n == nil then n = batch_node(nodes, KEYS[3], now, KEYS[at + 1], node_id, KEYS[at + 2], KEYS[at + 3]) end
  if not n then return 2 end
  local listed = batch_indices[indices]
  if not listed or #listed ~= r.count then return 5 end
  for _, i in ipairs(listed) do if i < 0 or i >= n.gpus then return 5 end end
  for key, value in pairs(r.l) do
    if n.labels[key] == nil then n.labels[key] = redis.call('HGET', n.key, 'label:' .. key) end
    if not label_ok(value, n.labels[key]) then return 3 end
  end
  if not batch_serves(n, r.n) then return 6 end
  if n.slots < 1 or n.cpu < r.c or n.mem < r.r then return 4 end
  local fits, milli, mem = batch_gpus_fit(n, r, listed)
  if not fits then return 4 end
  for _, i in ipairs(listed) do n.milli[i], n.gmem[i] = n.milli[i] - milli, n.gmem[i] - mem end
  n.cpu, n.mem, n.slots, n.count = n.cpu - r.c, n.mem - r.r, n.slots - 1, n.count + 1
  if not order[node_id] then order[#order + 1], order[node_id] = node_id, #order end
  placed[rank] = {n = n, node = node_id, indices = indices, local_rank = n.count - 1,
    alloc = batch_alloc(r, listed, indices, milli, mem)}
  return 0
end

for rank = 0, m - 1 do local code = fits(rank) if code ~= 0 then return {code, rank} end end -- nothing written
local attempts, master = batch_text[batch_num[g[4]] + 1], placed[0]
local port = 29500 + redis.call('HINCRBY', master.n.key, 'gang_ports', 1) % 1000
for rank = 0, m - 1 do
  local p, member, message = placed[rank], id .. ':m' .. rank, redis.call('HGET', KEYS[6], 'message:' .. rank)
  local tag = member .. '.' .. attempts
  redis.call('DEL', KEYS[8 + 4 * rank]) -- an earlier attempt's record: this attempt starts afresh
  redis.call('HSET', KEYS[8 + 4 * rank], 'id', member, 'gang', id, 'rank', rank, 'world', m, 'local_rank', p.local_rank,
    'local_world', p.n.count, 'node_rank', order[p.node], 'master_node', master.node, 'master_port', port,
    'name', g[5], 'tenant', g[6], 'priority', g[7], 'score', g[8], 'submitted_at', g[9], 'result_ttl', g[10],
    'req', g[2], 'max_retries', 0, 'retries', 0, 'preemptions', g[11] or 0, 'state', 'RESERVED', 'node', p.node,
    'gpus', p.indices, 'tag', tag, 'attempts', attempts, 'reserved_at', ARGV[1], 'alloc', p.alloc, 'message', message)
  p.n.tasks[#p.n.tasks + 1], p.n.messages[#p.n.messages + 1] = member, batch_message(p.n, message, tag, p.indices, r)
end
for node_id, n in pairs(nodes) do if n and n.count > 0 then batch_flush(n); touch(KEYS[4], node_id) end end
redis.call('HSET', KEYS[6], 'state', 'RESERVED', 'attempts', attempts, 'reserved_at', ARGV[1], 'node', master.node,
  'granted', m)
redis.call('SADD', KEYS[7], id); redis.call('ZREM', KEYS[1], id)
redis.call('HDEL', KEYS[2], id)
return {0, 0}
