/* reload: hot reload of the app, all or nothing, and the status it leaves.
 *
 * A reload (SIGHUP, `wxd reload`, or a saved file under `wxd dev`) runs in
 * two phases coordinated by the main thread:
 *   1. PREPARE: every worker loads the app into a new VM (a fresh lua_State:
 *      nothing of the old code or module cache can leak into it).
 *   2. If every worker succeeded, COMMIT: each worker switches new requests
 *      to the new VM between two requests; requests already running finish
 *      on the old one, which is closed when its last coroutine ends.
 *      Otherwise ABORT: the new VMs are dropped and the old generation keeps
 *      serving; the error (file, line, message) goes to the log, the status
 *      file read by `wxd reload`, and the status endpoint.
 * Connections, listening sockets and native state are never touched.
 */
#ifndef WXD_RELOAD_H
#define WXD_RELOAD_H

#include "server.h"

/* Main thread, before workers start / when the server stops. */
void wxd_reload_init(wxd_server_t *s);
void wxd_reload_close(wxd_server_t *s);
/* Main thread: asks for a reload; coalesced when one is running. */
void wxd_reload_start(wxd_server_t *s, const char *why);
/* Worker thread: the answer to the current phase (err: PREPARE failed). */
void wxd_reload_worker_reply(wxd_worker_t *w, const char *err);
/* Main thread (watchdog.c): worker w is stuck; a reload waiting for its
 * answer goes on without it (refused when it was preparing). */
void wxd_reload_worker_stalled(wxd_server_t *s, wxd_worker_t *w);
/* Main thread: writes the status JSON next to the pid file (PIDFILE.status),
 * which `wxd reload` reads; nothing without a pid file. */
void wxd_reload_write_status(wxd_server_t *s);
/* Main thread: serves GET /status on cfg->admin_host:admin_port when set.
 * Returns -1 (logged) when the address cannot be bound. */
int wxd_reload_start_admin(wxd_server_t *s);
/* Main thread: stops serving the status endpoint (a restart's successor
 * takes its port). */
void wxd_reload_close_admin(wxd_server_t *s);
/* Main thread (wxd dev): reloads when a .lua file under the app changes. */
void wxd_reload_watch(wxd_server_t *s);

#endif
