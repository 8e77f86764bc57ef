-- _lib.lua: helpers every transition script may use; a script names what it includes in its
-- header ("-- Includes: _lib.lua ...") and scripts.py prepends those files when it loads it,
-- so each script stays one atomic EVAL.

local MILLI = 1000

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

-- Note that a node's free capacity, state or registration changed, for dispatchers that keep
-- what they read (reads.read_free re-reads only nodes scored above what it saw last).
local function touch(changes_key, node_id)
  local last = redis.call('ZREVRANGE', changes_key, 0, 0, 'WITHSCORES')
  redis.call('ZADD', changes_key, int((tonumber(last[2]) or 0) + 1), node_id)
end

-- What kombu's Redis transport adds to a message's properties on node queue queue_key, up to
-- the delivery tag.
local function queue_route(queue_key)
  return ',"delivery_info":{"exchange":"","routing_key":"' .. queue_key .. '"},"delivery_tag":"'
end

-- The message a node queue holds: Celery's own JSON ends in its properties object, to which
-- only what kombu's Redis transport would add (route, delivery tag) and what the worker shows
-- Flower (GPU indices, tenant) are added: never decoded and re-encoded. A tenant that would
-- need escaping is left out. (reserve.lua queues it, redeliver.lua queues it again.)
local function queued_message(route, message, tag, indices, tenant)
  tenant = string.find(tenant or '', '^[%w_.%-]+$') and tenant or ''
  return string.sub(message, 1, -3) .. route .. tag .. '","gpubroker":{"gpus":"' .. indices ..
    '","tenant":"' .. tenant .. '"}}}'
end
