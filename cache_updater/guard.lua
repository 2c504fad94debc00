-- wmb cache version guard (DESIGN.md guarantee 5): a write wins only if its version is newer.
--
-- KEYS[1]  the cache key (e.g. "user:42")
-- KEYS[2]  its tombstone key, in the same cluster slot ("{user:42}:tomb")
-- ARGV[1]  op: "h" refresh as hash, "j" refresh as JSON string, "d" delete / invalidate
-- ARGV[2]  version: Version.as_score(), fixed width, so byte order == version order
-- ARGV[3]  TTL in ms of what this op writes (0 = none): the key for h/j, the tombstone for d
-- ARGV[4]  h: number of field/value pairs that follow; j: the JSON document (starts {"_v":"<ver>")
-- ARGV[5..] h: field, value, field, value ...
--
-- Where the stored version lives (read by current()):
--   hash   : field "_v" of the hash itself (same key => same TTL, evicted together)
--   json   : the first member of the document, {"_v":"<42 chars>",...} (read with GETRANGE)
--   deleted: the tombstone key holds the version, with tombstone_ttl_s; the cache key is gone so a
--            reader simply sees a miss.
-- The newer of the live version and the tombstone version is the current one.
-- Returns 1 if applied, 0 if rejected as stale (equal versions are stale: a replay is a no-op).

local key, tomb = KEYS[1], KEYS[2]
local op, ver, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])

local cur = false
local kind = redis.call('TYPE', key)['ok']
if kind == 'hash' then
  cur = redis.call('HGET', key, '_v')
elseif kind == 'string' then
  local head = redis.call('GETRANGE', key, 0, 48)
  if string.sub(head, 1, 7) == '{"_v":"' then cur = string.sub(head, 8, 49) end
end
local tv = redis.call('GET', tomb)
if tv and ((not cur) or tv > cur) then cur = tv end

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
  local n = tonumber(ARGV[4])
  if kind ~= 'none' then redis.call('DEL', key) end
  local args = {key, '_v', ver}
  for i = 1, 2 * n do args[#args + 1] = ARGV[4 + i] end
  redis.call('HSET', unpack(args))
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
