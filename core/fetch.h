/* fetch: the outbound HTTP/1.1 client behind wxd.http (lua/wxd/http.lua).
 *
 * A request yields its coroutine and is resumed from libuv callbacks with
 * the response table, or with nil, kind, detail where kind is one of
 * "timeout", "connect", "tls", "dns", "protocol", "too_large". Responses
 * are parsed by llhttp in response mode plus a scanner that refuses what
 * the server side refuses (obs-fold, bare LF, spaces in names, sloppy chunk
 * framing); header and body bytes are bounded.
 *
 * Connections belong to a pool, one per event loop, never to a Lua state: a
 * worker's pool serves every app generation, so keep-alive connections
 * survive hot reloads, and a request holds only its coroutine. The pool
 * keeps, per host (scheme, name, port and TLS settings), the idle
 * keep-alive connections, a count of open ones bounded by a limit beyond
 * which requests wait in a FIFO queue, and it caches DNS answers
 * (uv_getaddrinfo) for a TTL and TLS contexts by their settings.
 *
 * An idle connection holds no libuv handle: it is parked as a socket and,
 * for HTTPS, its TLS state (tls.h). It gets a handle again when a request
 * takes it, after a non-blocking peek showed the peer has not closed it. So
 * idle connections keep no loop alive, cost no callback, and the pool can
 * be freed synchronously once its loop has run out.
 */
#ifndef WXD_FETCH_H
#define WXD_FETCH_H

#include <lua.h>
#include <uv.h>

typedef struct wxd_fetch_pool wxd_fetch_pool_t;

/* A pool for requests made on `loop`, or NULL when out of memory. */
wxd_fetch_pool_t *wxd_fetch_pool_new(uv_loop_t *loop);
/* Closes idle connections older than the idle timeout. Requests also do
 * this as they start; a worker calls it from its tick. NULL is a no-op. */
void wxd_fetch_pool_sweep(wxd_fetch_pool_t *p);
/* Closes every idle connection and frees the pool. Only once the loop has
 * run out (no request in flight: each holds an active handle); NULL is a
 * no-op. */
void wxd_fetch_pool_free(wxd_fetch_pool_t *p);

/* Lua module wxd.core.fetch. A VM uses vm->fetch (set by its worker), or
 * else a pool of its own, freed with its Lua state (wxd script). */
int wxd_open_fetch(lua_State *L);

#endif
