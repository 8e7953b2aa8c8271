/* http: HTTP/1.1 connections on llhttp, and the request coroutine.
 *
 * A connection belongs to C: it is parsed by llhttp plus our own stricter
 * header-section scanner, limited (sizes and timeouts), and answered in
 * order. One request per connection runs at a time: the parser pauses at the
 * end of each message, so pipelined requests queue as unparsed bytes and get
 * their responses in order; none is read or started while the client leaves
 * more than 256 KiB of responses unsent. Each request runs the app's handler
 * in a wxd coroutine; the handler returns (status, headers, body) or streams
 * with wxd.core.http.write().
 *
 * Three files: http.c (connections, reading, parsing, timeouts), httpout.c
 * (response heads, the write path, access log) and httplua.c (the handler's
 * coroutine, request table and response marshalling); http_internal.h holds
 * what they share.
 */
#ifndef WXD_HTTP_H
#define WXD_HTTP_H

#include <lua.h>
#include <uv.h>

#include "server.h"

/* Checks at start-up that llhttp's lenient parsing is off by default. */
int wxd_http_selfcheck(char *err, size_t errlen);
/* The listeners' connection callbacks; server->data is the worker. On the
 * HTTPS listener a connection first does the TLS handshake (within the
 * header timeout), then runs the same parser on the decrypted bytes. */
void wxd_http_on_connection(uv_stream_t *server, int status);
void wxd_http_on_tls_connection(uv_stream_t *server, int status);
/* Serves a connection accepted elsewhere (the watchdog took it from a
 * stuck worker's queue): fd is owned from here on (closed when draining). */
void wxd_http_adopt(wxd_worker_t *w, int fd, int tls);
/* Async-signal-safe: a JSON fragment naming what co runs ("kind", and for a
 * request "id", "method", "path"), written into out (always terminated). */
void wxd_http_describe_co(wxd_co_t *co, char *out, size_t cap);
/* Shutdown: close idle connections, let in-flight requests finish and then
 * close their connections. */
void wxd_http_drain(wxd_worker_t *w);
/* Enforces connection timeouts; called by the worker's tick. */
void wxd_http_sweep(wxd_worker_t *w);
/* Shutdown deadline: close every connection now. */
void wxd_http_close_all(wxd_worker_t *w);
/* Lua module wxd.core.http (response streaming). */
int wxd_open_http_lua(lua_State *L);

#endif
