/* limit: rate limiters shared by every worker thread of the process.
 *
 * A limiter has a name, a kind and a table of per-key states (a key is any
 * string: a client address, an appid, an openid, an API name):
 *
 *   bucket  token bucket of `rate` tokens per second holding at most
 *           `burst`, kept as GCRA (one "theoretical arrival time" per key,
 *           the same arithmetic as the Redis script of lua/wxd/limit.lua).
 *   window  sliding-window counter: at most `limit` per `window` seconds,
 *           the previous fixed window's count weighted by how much of it
 *           still overlaps the sliding one.
 *
 * Limiters live in a process-wide registry under one mutex; each limiter
 * has its own mutex for its keys. They are made on first use by name (every
 * worker's app asks for the same name and gets the same limiter), survive
 * hot reloads, and live until the process exits. A new() with other
 * parameters updates them in place (a reload may change a rate).
 *
 * Memory is bounded: a key whose state has returned to "as if never seen"
 * (a full bucket, an empty window) is idle and reclaimed, oldest first, a
 * few per call; beyond `max_keys` the least recently used key is evicted
 * even when not idle (counted in `evictions`).
 *
 * Lua module wxd.core.limit (lua/wxd/limit.lua wraps it).
 */
#ifndef WXD_LIMIT_H
#define WXD_LIMIT_H

#include <lua.h>

#define WXD_LIMIT_KEY_MAX 4096             /* bytes in a key */
#define WXD_LIMIT_DEFAULT_MAX_KEYS 100000  /* keys per limiter */

int wxd_open_limit(lua_State *L);

#endif
