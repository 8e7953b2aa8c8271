/* redis: the Redis client behind wxd.redis (lua/wxd/redis.lua) and the
 * Redis backend of wxd.store.
 *
 * One connection per worker and URL carries the commands of every
 * coroutine: each command is appended to an output buffer that is written
 * once per loop turn (a uv_prepare handle), so concurrent commands and a
 * pipeline go out in one write, and replies are matched to commands in
 * order (a FIFO). A command yields its coroutine and is resumed with the
 * reply, or with nil, kind, detail where kind is "timeout", "closed",
 * "connect" or "auth"; an error reply gives nil, "<the server's message>".
 *
 * hiredis provides the protocol (its reply reader and command formatter);
 * the sockets are our own libuv streams rather than redisAsyncContext,
 * because hiredis 0.14's async layer resolves names with a blocking
 * getaddrinfo, has no timeouts, runs callbacks re-entrantly from
 * redisAsyncFree, and its libuv adapter frees its uv_poll_t while closing.
 *
 * Timeouts: every command has a uv_timer. A command that times out resumes
 * its coroutine with nil, "timeout" and stays in the FIFO as a tombstone
 * (co == NULL) until its late reply arrives and is dropped; coroutines are
 * reused, so a late reply must never resume anything. The same timer, at
 * zero delay, reports failures found while walking the FIFO (a dropped
 * connection), so Lua is never resumed re-entrantly.
 *
 * Connections belong to a pool, one per event loop (the worker's, shared
 * by every app generation so that connections survive hot reloads; or a
 * VM's own in `wxd script`). A connection is opened on first use (AUTH and
 * SELECT from the URL first), and after it drops the next command opens it
 * again; failed attempts back off (100 ms doubling to 2 s), and commands
 * issued meanwhile fail at once with the last error. Idle connections keep
 * no loop alive (their handles are unreferenced).
 *
 * Pub/sub runs on a second connection per URL (subscriber mode), which
 * reconnects by itself and subscribes again. A subscription belongs to the
 * VM (app generation) that made it: messages reach it only while that VM
 * is active (committed and not stopping), and retiring or freeing the VM
 * drops its subscriptions, as with timers. Each message runs the callback
 * in a new wxd coroutine.
 */
#ifndef WXD_REDIS_H
#define WXD_REDIS_H

#include <lua.h>
#include <uv.h>

#include "vm.h"

typedef struct wxd_redis_pool wxd_redis_pool_t;

/* A pool for connections on `loop` (worker: for the log, -1 outside a
 * server), or NULL when out of memory. */
wxd_redis_pool_t *wxd_redis_pool_new(uv_loop_t *loop, int worker);
/* Closes every connection and frees the pool. Pending commands are dropped
 * without resuming their coroutines (cancel them first); their memory, and
 * each connection's, is freed by the close callbacks, so the loop must run
 * once more. Subscriptions still registered are released (their VMs must
 * still be alive). NULL is a no-op. */
void wxd_redis_pool_close(wxd_redis_pool_t *p);
/* Drops every subscription of the VM (it retires or is freed). */
void wxd_redis_vm_close(wxd_vm_t *vm);

/* Lua module wxd.core.redis. A VM uses vm->redis (set by its worker), or
 * else a pool of its own, closed with its Lua state (wxd script). */
int wxd_open_redis(lua_State *L);

#endif
