"""Lua scripts more than one service runs on Redis (one copy each, so they cannot drift).

Register one with ``redis.register_script(SCRIPT)``; each states its KEYS, ARGV and answer.
"""

from __future__ import annotations

# Drop a key only if it still holds our value: give up a lease or a claim without removing one
# that expired and was taken since by someone else. KEYS: the key. ARGV: our value. Answers 1
# if it was dropped, 0 if it held another value or none.
RELEASE_IF_OWNER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""
