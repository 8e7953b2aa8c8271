/* ws: WebSocket connections (RFC 6455) and the topic registry.
 *
 * A WebSocket starts as an HTTP request: the route's handler (wxd.ws,
 * lua/wxd/ws.lua) calls wxd.core.ws.upgrade(), which checks the handshake,
 * answers 101 and turns the HTTP connection into a WebSocket connection.
 * The request's coroutine goes on as the WebSocket's handler; the request
 * itself ends there (access log line with status 101).
 *
 * Frames are parsed in C as bytes arrive, with no read buffer of their own
 * (the worker's shared read buffer, as for HTTP): a message in progress is
 * assembled in a buffer sized from the frame headers, which are checked
 * (limits: 1009) before any payload is kept. Text is validated as UTF-8
 * incrementally, across fragments (1007). Control frames are answered in C
 * (pong, close echo). Complete messages queue on the connection until the
 * handler's ws:receive() takes them; above a bound the connection stops
 * reading (TCP backpressure to the client).
 *
 * Writes go through the HTTP write path (plain or TLS, send timeout).
 * ws:send() yields while the client leaves more than max_unsent_bytes
 * unread; frames of a topic publish, written by C, disconnect such a client
 * instead of queueing more.
 *
 * Topics: wxd_ws_topics_t is shared by the workers (one mutex). A publish
 * is queued once per worker that has subscribers to the topic and that
 * worker's uv_async delivers it to its local subscribers, without Lua.
 * The registry is made by the server before the workers start and freed
 * after they end (wxd_ws_topics_new/free); each worker opens its delivery
 * handle on its own loop (wxd_ws_worker_open, before the loop runs) and
 * closes it when it stops (wxd_ws_worker_close).
 */
#ifndef WXD_WS_H
#define WXD_WS_H

#include <lua.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct wxd_ws_topics wxd_ws_topics_t;
struct wxd_worker;

/* A registry for n workers, or NULL when out of memory. */
wxd_ws_topics_t *wxd_ws_topics_new(int nworkers);
/* After every worker ended. NULL is a no-op. */
void wxd_ws_topics_free(wxd_ws_topics_t *t);
/* Worker `id`'s delivery handle on its loop; `w` is the worker. */
int wxd_ws_worker_open(wxd_ws_topics_t *t, int id, uv_loop_t *loop, struct wxd_worker *w);
/* The worker stops: no more deliveries; queued ones are dropped. */
void wxd_ws_worker_close(wxd_ws_topics_t *t, int id);

/* Queues `text` as one text frame for every subscriber of topic in the
 * process. Returns how many workers it was queued to (0: no subscriber). */
int wxd_ws_publish(wxd_ws_topics_t *t, const char *topic, size_t tlen, const char *text, size_t len);
/* Publishes dropped for worker `id` since start because its queue was full
 * (GET /metrics). */
uint64_t wxd_ws_topics_dropped(wxd_ws_topics_t *t, int id);

/* Incremental UTF-8 validation (also used by the unit spec through Lua).
 * Zero-initialised is the start state. */
typedef struct wxd_utf8 {
  uint8_t need;   /* continuation bytes still expected */
  uint8_t lo, hi; /* range of the next continuation byte */
} wxd_utf8_t;
/* Feeds n bytes; returns 0, or -1 at the first byte that cannot be part of
 * valid UTF-8 (state is then undefined). */
int wxd_utf8_feed(wxd_utf8_t *u, const uint8_t *p, size_t n);
/* At the end of the text: 1 when no code point is left unfinished. */
static inline int wxd_utf8_complete(const wxd_utf8_t *u) { return u->need == 0; }

/* Lua module wxd.core.ws: upgrade, publish, utf8_valid. */
int wxd_open_ws(lua_State *L);

#endif
