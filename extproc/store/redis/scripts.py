"""The Lua scripts that change sessions in Redis, each atomic: the fencing rule lives here.

A writing node may change a session only while its lease key exists (SYNC_ROUND checks it
once per round); another node may end a session `failed` only while that lease is absent
(FAIL_IF_ORPHANED). Redis runs one script at a time, so the two can never both succeed on
the same session: whoever comes first decides, and the loser learns it from the reply.
"""

from __future__ import annotations

# One replication round of a writing node: every dirty session in one call.
#   KEYS[1]  the writing node's lease
#   ARGV     prefix, node id, gone ttl ms, open ttl ms, then per session a record:
#            id, "<first seq> <count> <state> <ttl ms> <check> <meta>",
#            [content_type, write_path, owner, request]  if <meta> is 1: on the first copy,
#                                               with the end, and once the request key is known,
#            [reason]                           with the end,
#            <count> events
# Returns {0} when the lease is gone (renew, then retry), else {1, r1, r2, ...}: per session the
# last seq Redis holds (events already stored are skipped, so a retried round is harmless; a
# gap, e.g. Redis restarted empty, answers what it has so the writer resends from there), or a
# string, the reason, if another node ended the session (the writer is fenced: it must cut its
# clients). An end this writer recorded itself answers its last seq (a retry after a lost
# reply).
#
# Most records take the fast path: one XADD per event and nothing else. XADD refuses an id at
# or below the stream's top, and another node's end marker, or a round whose reply was lost,
# leaves the top at or above the writer's next seq; only then (or when the writer asks, after
# its lease broke and Redis may have lost data: <check> 1) is the session looked at closely.
SYNC_ROUND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local prefix, node = ARGV[1], ARGV[2]
local gone_ttl, open_ttl = ARGV[3], ARGV[4]
local out = {1}
local i = 5
while i <= #ARGV do
  local id = ARGV[i]
  local first, count, state, ttl, check, with_meta =
    string.match(ARGV[i + 1], '^(%d+) (%d+) (%a+) (%d+) (%d) (%d)$')
  first, count = tonumber(first), tonumber(count)
  i = i + 2
  local fields, owner, reason
  if with_meta == '1' then
    owner = ARGV[i + 2]
    fields = {'content_type', ARGV[i], 'write_path', ARGV[i + 1], 'node', node, 'owner', owner,
      'request', ARGV[i + 3]}
    i = i + 4
  end
  if state ~= 'open' then reason = ARGV[i]; i = i + 1 end
  local base = prefix .. ':{' .. id .. '}:'
  local events, meta = base .. 'events', base .. 'meta'
  local n, result, current
  if check == '0' and first > 1 and count > 0 then
    local added = redis.pcall('XADD', events, '0-' .. first, 'd', ARGV[i])
    if type(added) ~= 'table' then n = first end
  end
  if not n then
    current = redis.call('HGET', meta, 'state')
    if current and current ~= 'open' then
      if redis.call('HGET', meta, 'fenced') then result = redis.call('HGET', meta, 'reason')
      else result = tonumber(redis.call('HGET', meta, 'last_seq')) end
    elseif not current and redis.call('EXISTS', base .. 'gone') == 1 then
      result = 'ended elsewhere, and since expired'
    elseif not current and first > 1 then
      result = 0
    else
      n = redis.call('XLEN', events)
      if first > n + 1 then result, n = n, nil
      elseif not current then
        redis.call('HSET', meta, 'state', 'open', unpack(fields))
        redis.call('PEXPIRE', meta, open_ttl)
      end
    end
  end
  if n then
    for k = 0, count - 1 do
      if first + k > n then redis.call('XADD', events, '0-' .. (first + k), 'd', ARGV[i + k]) end
    end
    local last = math.max(n, first + count - 1)
    if n == 0 and last > 0 then redis.call('PEXPIRE', events, open_ttl) end
    if fields and state == 'open' and (current or first > 1) then
      redis.call('HSET', meta, unpack(fields))  -- an open session's request key, once known
    end
    if state ~= 'open' then
      redis.call('XADD', events, '0-' .. (last + 1), 'end', state, 'reason', reason)
      redis.call('HSET', meta, 'state', state, 'reason', reason, 'last_seq', last, unpack(fields))
      redis.call('SET', base .. 'gone', owner, 'PX', gone_ttl)
    end
    if ttl ~= '0' then
      redis.call('PEXPIRE', events, ttl)
      redis.call('PEXPIRE', meta, ttl)
    end
    result = last
  end
  out[#out + 1] = result
  i = i + count
end
return out
"""

# The writing node's lease is gone while its session is open: end the session failed, once,
# and mark it fenced so that writer learns it was not its own end.
#   KEYS     events, meta, gone, the writing node's lease
#   ARGV     reason, session ttl ms, gone ttl ms
FAIL_IF_ORPHANED = """
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
if redis.call('HGET', KEYS[2], 'state') ~= 'open' then return 0 end
local n = redis.call('XLEN', KEYS[1])
redis.call('XADD', KEYS[1], '0-' .. (n + 1), 'end', 'failed', 'reason', ARGV[1])
redis.call('HSET', KEYS[2], 'state', 'failed', 'reason', ARGV[1], 'last_seq', n, 'fenced', '1')
redis.call('SET', KEYS[3], redis.call('HGET', KEYS[2], 'owner') or '', 'PX', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

# Add a share token unless the session has MAX of them; expired ones give their slot back
# first. Returns 1 if added, 0 if full.
ADD_SHARE = """
local now = tonumber(ARGV[4])
for _, token in ipairs(redis.call('HKEYS', KEYS[1])) do
  local value = redis.call('HGET', KEYS[1], token)
  if tonumber(string.match(value, '^%S+')) <= now then redis.call('HDEL', KEYS[1], token) end
end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local ttl = tonumber(ARGV[5])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""
