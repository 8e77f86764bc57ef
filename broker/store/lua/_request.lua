-- _request.lua: the checks submit.lua makes of a request before storing it, so that no
-- producer can store one the dispatcher cannot read (types and ranges of every key; the keys
-- are listed in store/records.py). records.decode_request makes the same checks in Python, as
-- the dispatcher's defence against records written by hand or by an older version.

local REQUEST_COUNTS = {{'g', 1024}, {'m', 1000}, {'gm', 16777216}, {'c', 100000000}, {'r', 1099511627776}}
local MAX_PRIORITY = 1000000

local function json_what(v)
  if v == nil then return 'nothing' end
  if v == cjson.null then return 'null' end
  if type(v) == 'string' then return 'a string' end
  if type(v) == 'table' then return 'an object or array' end
  return tostring(v)
end

local function is_int(v, low, high)
  return type(v) == 'number' and v == math.floor(v) and v >= low and v <= high
end

-- A label selector value: a string, or a list of strings.
local function is_selector_value(v)
  if type(v) == 'string' then return true end
  if type(v) ~= 'table' then return false end
  for k, item in pairs(v) do
    if type(k) ~= 'number' or type(item) ~= 'string' then return false end
  end
  return true
end

-- Why request JSON `text` cannot be stored: (key, reason), or nil when it can. A gang's
-- (keys k, sp, sl) only when `gang` (submit_gang.lua, which stores its members' messages too).
local function request_problem(text, gang)
  local ok, r = pcall(cjson.decode, text)
  if not ok then return 'req', 'not JSON' end
  if type(r) ~= 'table' then return 'req', 'must be a JSON object (got ' .. json_what(r) .. ')' end
  for _, c in ipairs(REQUEST_COUNTS) do
    local v = r[c[1]]
    if not is_int(v, 0, c[2]) then
      return c[1], string.format('must be an integer from 0 to %d (got %s)', c[2], json_what(v))
    end
  end
  if r.g > 0 and r.m > 0 then return 'm', 'a share of one GPU goes with 0 whole GPUs (g)' end
  if not is_int(r.p, -MAX_PRIORITY, MAX_PRIORITY) then
    return 'p', string.format('must be an integer from -%d to %d (got %s)', MAX_PRIORITY, MAX_PRIORITY, json_what(r.p))
  end
  if type(r.l) ~= 'table' then return 'l', 'must be an object of label -> value (got ' .. json_what(r.l) .. ')' end
  for label, value in pairs(r.l) do
    if type(label) ~= 'string' then return 'l', 'must be an object of label -> value (got an array)' end
    if not is_selector_value(value) then
      return 'l', 'label ' .. string.sub(label, 1, 80) .. ' must be a string or a list of strings'
    end
  end
  for _, key in ipairs({'n', 't'}) do -- reserve.lua needs the name; the tenant may be absent
    if (r[key] ~= nil or key == 'n') and type(r[key]) ~= 'string' then
      return key, 'must be a string (got ' .. json_what(r[key]) .. ')'
    end
  end
  local e = r.e
  if e ~= nil and e ~= cjson.null and not (type(e) == 'number' and e >= 0 and e < math.huge) then
    return 'e', 'must be null or a number of seconds >= 0 (got ' .. json_what(e) .. ')'
  end
  if r.x ~= nil and r.x ~= cjson.null and type(r.x) ~= 'boolean' then
    return 'x', 'must be true, false or null (got ' .. json_what(r.x) .. ')'
  end
  if (r.k ~= nil) ~= (gang == true) then return 'k', gang and 'a gang needs k' or 'a gang is stored by submit_gang.lua' end
  if gang and not is_int(r.k, 2, 1024) then return 'k', 'must be an integer from 2 to 1024 (got ' .. json_what(r.k) .. ')' end
  if r.sp ~= nil and type(r.sp) ~= 'boolean' then return 'sp', 'must be true or false' end
  if r.sl ~= nil and type(r.sl) ~= 'string' then return 'sl', 'must be a label key' end
  if r.mg ~= nil and not is_int(r.mg, 1, r.g) then return 'mg', 'must be an integer from 1 to g' end
  if r.mk ~= nil and not is_int(r.mk, 1, r.k or 1) then return 'mk', 'must be an integer from 1 to k' end
  return nil
end

-- Why Celery message `text` of task `id` cannot be stored: (key, reason), or nil when it can.
-- reserve.lua appends the routing and the delivery tag to its properties, which must close the
-- document: the message so ended must still be JSON (a worker would drop anything else while its
-- task held its reservation). A good message takes one decode, of that ending; a bad one, two.
local function message_problem(text, id)
  local ok, m = pcall(cjson.decode, string.sub(text, 1, -3) .. ',"delivery_tag":"t"}}')
  if ok and string.sub(text, -2) == '}}' and type(m) == 'table' and type(m.properties) == 'table'
    and type(m.headers) == 'table' and m.headers.id == id then return nil end
  ok, m = pcall(cjson.decode, text)  -- not so: what is wrong with it, in this order
  if not ok or type(m) ~= 'table' then return 'message', 'not a JSON object' end
  if type(m.properties) ~= 'table' or type(m.headers) ~= 'table' then
    return 'message', 'a Celery message has headers and properties objects'
  end
  if m.headers.id ~= id then return 'message', 'its headers name another task id' end
  return 'message', 'its properties must close the document, non-empty'
end
