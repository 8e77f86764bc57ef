-- _handoff.lua: an ended attempt's place passes to the next task in line (needs _lib.lua,
-- _release.lua).
--
-- When an attempt ends on a node and the task at the head of the pending queue asks for
-- exactly what it asked (the same stored request: name, tenant, priority, resources, labels),
-- that task takes over its reservation in the same script: RESERVED on the same node and GPU
-- indices with the same alloc, its message queued (invariant 3). The node's free capacity is
-- the same before and after, so a stream of like tasks needs no dispatcher cycle per task
-- (issue 14). It is the placement the spine's policy makes first: the head of the queue, in
-- priority and submit order, onto capacity that fits it exactly. Only a pool whose dispatcher
-- runs the spine sets `P handoff`; gangs, elastic grants and rate-limited names are left to it.

-- The head's id when it took over (else false); `alloc` and `indices` are what the ended attempt held.
local function hand_off(prefix, node_key, tasks_key, node_id, req, alloc, indices, now)
  if not req or not alloc or redis.call('GET', prefix .. 'handoff') ~= '1' then return false end
  local head = redis.call('ZRANGE', prefix .. 'pending', 0, 0)[1]
  if not head or redis.call('HGET', prefix .. 'requests', head) ~= req then return false end
  local n = redis.call('HMGET', node_key, 'state', 'draining')
  local lease = redis.call('ZSCORE', prefix .. 'leases', node_id)
  if n[1] ~= 'up' or n[2] or not lease or tonumber(lease) < now then return false end
  local r = cjson.decode(req)
  if r.k or r.mg then return false end
  local entry = redis.call('HGET', prefix .. 'tasks', r.n)
  if entry and (tonumber(cjson.decode(entry).rate) or 0) > 0 then return false end
  local task_key = prefix .. 'task:' .. head
  local t = redis.call('HMGET', task_key, 'state', 'message', 'attempts', 'not_before')
  if t[1] ~= 'PENDING' or not t[2] or t[4] then return false end
  local attempts = int(num(t[3]) + 1)
  local tag = head .. '.' .. attempts
  redis.call('HSET', task_key, 'state', 'RESERVED', 'node', node_id, 'gpus', indices or '', 'tag', tag,
    'attempts', attempts, 'reserved_at', int(now), 'alloc', alloc)
  redis.call('ZREM', prefix .. 'pending', head)
  redis.call('HDEL', prefix .. 'requests', head)
  redis.call('SADD', tasks_key, head)
  local queue = prefix .. 'q:' .. node_id
  redis.call('LPUSH', queue, queued_message(queue_route(queue), t[2], tag, indices or '', r.t))
  redis.call('HINCRBY', prefix .. 'outcomes', 'handoff|' .. (r.t or 'default'), 1)
  return head
end

-- What finish.lua does with an ended attempt's reservation `alloc` (as unhold does: the task
-- leaves its node): give it back, or, when the task is `final` (it runs no more), pass it to the
-- head of the queue if that asks the same. The id of the task it passed to (else false).
local function release_or_pass(prefix, task_key, node_key, tasks_key, node_id, id, final, req, alloc, gpus, now)
  local head = final and hand_off(prefix, node_key, tasks_key, node_id, req, alloc, gpus, now)
  if not head then release(node_key, alloc) end
  redis.call('HDEL', task_key, 'alloc')
  redis.call('SREM', tasks_key, id)
  return head
end
