/* server: configuration, worker threads, listeners and signals.
 *
 * One process runs N workers. Each worker owns a libuv loop, a VM with the
 * app loaded, and its own listening socket bound with SO_REUSEPORT, so the
 * kernel spreads connections and nothing Lua crosses threads. The main
 * thread only handles signals and coordinates start-up and shutdown.
 */
#ifndef WXD_SERVER_H
#define WXD_SERVER_H

#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "log.h"
#include "vm.h"

typedef struct wxd_limits {
  size_t max_header_bytes;      /* request line + headers; 431 beyond */
  size_t max_body_bytes;        /* decoded request body; 413 beyond */
  size_t max_uri_bytes;         /* request target; 414 beyond */
  uint64_t header_timeout_ms;   /* first byte to end of headers; 408 */
  uint64_t body_timeout_ms;     /* end of headers to end of body; 408 */
  uint64_t keepalive_timeout_ms;/* idle time between requests */
  uint64_t shutdown_timeout_ms; /* in-flight grace period on SIGTERM */
  unsigned max_requests;        /* per connection, then Connection: close */
} wxd_limits_t;

typedef struct wxd_config {
  char app_dir[PATH_MAX];
  char lua_dir[PATH_MAX];  /* empty: rely on package.path */
  char host[256];
  int port;
  int workers;
  int access_log;
  int log_level;
  wxd_limits_t limits;
} wxd_config_t;

typedef struct wxd_buf {
  char *data;
  size_t len;
  size_t cap;
} wxd_buf_t;

/* Grows b to hold at least `need` more bytes; returns 0 or -1 (ENOMEM). */
int wxd_buf_reserve(wxd_buf_t *b, size_t need);
int wxd_buf_append(wxd_buf_t *b, const void *p, size_t len);
void wxd_buf_free(wxd_buf_t *b);

struct wxd_conn;

typedef struct wxd_worker {
  int id;
  const wxd_config_t *cfg;
  uv_loop_t loop;
  uv_tcp_t listener;
  uv_async_t stop_async;    /* main thread asks us to drain */
  uv_timer_t tick;          /* connection timeouts, access log flush */
  uv_timer_t deadline;      /* shutdown grace period */
  uv_thread_t thread;
  wxd_vm_t *vm;
  int handler_ref;          /* the app's request handler (registry) */
  struct wxd_conn *conns;   /* every open connection */
  unsigned nconns;
  int draining;
  int stopping;             /* handles are being closed */
  int listening;
  char *readbuf;            /* shared by all reads of this loop */
  size_t readbuf_size;
  int readbuf_busy;
  wxd_buf_t out;            /* response assembly scratch */
  wxd_logbuf_t access;      /* buffered access log */
  char date_hdr[64];        /* "Date: ...\r\n" */
  size_t date_len;
  int64_t date_sec;
  char ts_prefix[32];       /* "2026-11-26T10:00:00" for the access log */
  int64_t ts_sec;
  uint32_t id_prefix;       /* random per worker: request ids differ per run */
  uint64_t seq;             /* requests seen */
  int load_status;          /* 0 ok, -1 failed; set before the start barrier */
  char load_error[2048];
} wxd_worker_t;

/* Parses "HOST:PORT" or "[V6]:PORT" into cfg->host/cfg->port. */
int wxd_config_set_listen(wxd_config_t *cfg, const char *listen, char *err, size_t errlen);
/* Defaults for every field except app_dir and lua_dir. */
void wxd_config_defaults(wxd_config_t *cfg);
/* Reads APPDIR/config.lua through lua/wxd/config.lua into cfg. Command-line
 * overrides are applied by the caller afterwards. */
int wxd_config_load(wxd_config_t *cfg, char *err, size_t errlen);

/* Runs the server until SIGTERM/SIGINT; returns the process exit code. */
int wxd_server_run(wxd_config_t *cfg);

/* The cached "Date: ...\r\n" header line for this second. */
const char *wxd_worker_date(wxd_worker_t *w, size_t *len);

#endif
