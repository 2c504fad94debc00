-- wmb cache version guard (DESIGN.md guarantee 5): a write wins only if its version is newer.
--
-- KEYS[1]  the cache key (e.g. "user:42")
-- KEYS[2]  its tombstone key, in the same cluster slot ("{user:42}:tomb")
-- ARGV[1]  op: "h" refresh as hash, "j" refresh as JSON string, "d" delete / invalidate
-- ARGV[2]  version: Version.as_score(), fixed width, so byte order == version order
-- ARGV[3]  TTL in ms of what this op writes (0 = none): the key for h/j, the tombstone for d
-- ARGV[4]  h: number n of field/value pairs that follow; j: the JSON document ({"_v":"<ver>",...)
-- ARGV[5..] h: n field/value pairs, then the fields that are NULL now (HDEL'd)
--
-- Where the stored version lives:
--   hash   : field "_v" of the hash itself (same key => same TTL, evicted together)
--   json   : the first member of the document, {"_v":"<42 chars>",...} (read with GETRANGE)
--   deleted: the tombstone key holds the version, with tombstone_ttl_s; the cache key is gone so a
--            reader simply sees a miss.
-- Invariant kept by this script: writing a live value deletes the tombstone, writing a tombstone
-- deletes the live value.  So when a versioned live value exists, no newer tombstone can exist, and
-- the tombstone is only read when there is no live version (one call saved on the hot path).
-- Returns 1 if applied, 0 if rejected as stale (equal versions are stale: a replay is a no-op).

local key, tomb = KEYS[1], KEYS[2]
local op, ver, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])

-- Read the live version without a TYPE call: try the shape this op writes, then the other one
-- (a table's format may have changed between runs).
local cur, other_shape = false, false
local function from_hash()
  local v = redis.pcall('HGET', key, '_v')
  if type(v) == 'table' and v.err then return nil end
  return v
end
local function from_json()
  local head = redis.pcall('GETRANGE', key, 0, 48)
  if type(head) == 'table' and head.err then return nil end
  if string.sub(head, 1, 7) == '{"_v":"' then return string.sub(head, 8, 49) end
  return false
end
if op == 'j' then
  cur = from_json()
  if cur == nil then cur = from_hash(); other_shape = true end
else
  cur = from_hash()
  if cur == nil then cur = from_json(); other_shape = true end
end
local tv = false
if not cur then
  tv = redis.call('GET', tomb)
  cur = tv
end

if cur and cur >= ver then
  return 0
end

if op == 'd' then
  redis.call('DEL', key)
  if ttl > 0 then
    redis.call('SET', tomb, ver, 'PX', ttl)
  else
    redis.call('SET', tomb, ver)
  end
  return 1
end

if tv then redis.call('DEL', tomb) end
if op == 'h' then
  if other_shape then redis.call('DEL', key) end
  local n = tonumber(ARGV[4])
  local args = {key, '_v', ver}
  for i = 5, 4 + 2 * n do args[#args + 1] = ARGV[i] end
  redis.call('HSET', unpack(args))
  if #ARGV > 4 + 2 * n then
    local nulls = {key}
    for i = 5 + 2 * n, #ARGV do nulls[#nulls + 1] = ARGV[i] end
    redis.call('HDEL', unpack(nulls))
  end
  if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
elseif op == 'j' then
  if ttl > 0 then
    redis.call('SET', key, ARGV[4], 'PX', ttl)
  else
    redis.call('SET', key, ARGV[4])
  end
else
  return redis.error_reply('wmb guard: unknown op ' .. tostring(op))
end
return 1
