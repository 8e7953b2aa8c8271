/* http_internal: what core/http.c, httpout.c and httplua.c share.
 *
 * The connection and request structs, the limits of the output queue, and
 * the functions one of the three files calls in another (wxd__http_*).
 * Included by those three files only; the module's interface is http.h.
 */
#ifndef WXD_HTTP_INTERNAL_H
#define WXD_HTTP_INTERNAL_H

#include <llhttp.h>
#include <string.h>

#include "hdrs.h"
#include "http.h"
#include "httpscan.h"
#include "tls.h"
#include "trace.h"
#include "vm.h"
#include "ws_internal.h"

#define MAX_HEADERS 100
/* Unsent output a connection may hold: above it, a streaming handler waits
 * and a connection's next request is not read nor dispatched; both go on
 * once the client has taken it below half of this. */
#define OUTPUT_HIGH_WATER (256 * 1024)
#define OUTPUT_LOW_WATER (OUTPUT_HIGH_WATER / 2)

enum { CONN_IDLE, CONN_READING, CONN_HANDLING, CONN_WS };

typedef struct wxd_conn wxd_conn_t;

typedef struct wxd_req {
  wxd_conn_t *conn;      /* NULL once the connection is gone */
  wxd_worker_t *w;
  wxd_co_t *co;          /* the handler's coroutine while it runs */
  wxd_buf_t head;        /* URL then header names and values */
  uint32_t url_len;
  wxd_hdrs_t hdrs;       /* in hdr_slots; counts the whole head against max_header_bytes */
  wxd_hdr_t hdr_slots[MAX_HEADERS];
  int in_trailers;       /* fields after the body: counted, never stored */
  wxd_buf_t body;
  uint64_t start_ns;
  char id[24];
  uint8_t method, http_major, http_minor;
  unsigned keep_alive : 1;
  unsigned is_head : 1;
  unsigned has_te : 1;
  unsigned streaming : 1;    /* headers sent, chunks follow */
  unsigned stream_raw : 1;   /* HTTP/1.0 stream: close-delimited */
  unsigned stream_nobody : 1; /* HEAD, 204 or 304: headers only */
  unsigned stream_sized : 1; /* the app gave a Content-Length: identity coding, stream_left bytes to go */
  unsigned drain_wait : 1;   /* coroutine waits for the write queue */
  unsigned finished : 1;
  unsigned in_handler : 1;   /* dispatched and not yet finished: owned by the coroutine */
  unsigned conn_close : 1;   /* a Connection field lists "close" */
  unsigned conn_keep_alive : 1; /* a Connection field lists "keep-alive" */
  unsigned wants_keep_alive : 1; /* what the client asked for, decided at the end of the message */
  int host_count;
  int te_count;
  int rid_idx, tp_idx;   /* the first X-Request-Id and traceparent fields (-1: none), noted while parsing */
  int status;
  size_t bytes_out;
  uint64_t stream_left;  /* stream_sized: body bytes still owed */
  size_t max_body;       /* this request's body limit (its route's, else the global one) */
  struct wxd_http_file *file; /* a file being sent (httpfile.c), NULL else */
  wxd_trace_t trace;     /* trace context and request id (trace.h): read it with wxd__http_trace */
  int trace_pending;     /* its ids are not made yet (made on first use) */
  int trace_drawn;       /* pending, and a new trace's ids drawn (trace_draw) but not formatted */
  uint64_t trace_draw[3];
  char route[96];        /* the matched route pattern wxd.app reported */
  size_t route_len;      /* 0: none (unmatched, or refused before routing) */
} wxd_req_t;

struct wxd_conn {
  uv_tcp_t tcp;
  uint64_t deadline;     /* loop time (ms) of the current timeout; 0 none */
  uint64_t send_deadline;/* while writes are pending: last progress + send timeout */
  llhttp_t parser;
  wxd_worker_t *w;
  wxd_conn_t *prev, *next;
  wxd_req_t *req;        /* request being parsed or handled */
  wxd_buf_t in;          /* unparsed bytes queued while handling */
  wxd_scan_t scan;
  int state;
  int err_status;        /* set by a parser callback before it fails */
  const char *err_msg;
  unsigned nreq;         /* requests dispatched on this connection */
  int in_process;        /* re-entrancy guard for conn_process */
  int writes_pending;
  int handles_open;      /* freed when 0 */
  unsigned closing : 1;
  unsigned close_after_write : 1;
  unsigned discard_input : 1; /* after Connection: close or an error */
  unsigned reading : 1;
  unsigned peer_eof : 1;
  unsigned output_wait : 1;   /* next requests held back until the output drains */
  unsigned was_held : 1;      /* output_wait was set at least once */
  unsigned tls_done : 1;      /* handshake finished */
  unsigned tls_failed : 1;    /* no more TLS records: no close_notify either */
  wxd_tls_t *tls;             /* HTTPS: NULL on plain connections */
  wxd_tls_info_t *tls_info;   /* HTTPS: what the handshake settled */
  struct wxd_ws *ws;          /* upgraded to a WebSocket (ws.c): NULL for HTTP */
  char remote[64];
  int remote_port;
};

/* http.c: connection lifetime, parsing */
void wxd__http_conn_close(wxd_conn_t *c);
void wxd__http_conn_continue(wxd_conn_t *c);
void wxd__http_conn_stop_timer(wxd_conn_t *c);
void wxd__http_conn_start_reading(wxd_conn_t *c);
void wxd__http_conn_stop_reading(wxd_conn_t *c);
void wxd__http_conn_release_output(wxd_conn_t *c);
void wxd__http_req_finish(wxd_req_t *r);
void wxd__http_req_free(wxd_req_t *r);

/* httpout.c: response heads, the write path (plain and TLS), access log */
int wxd__http_conn_writev(wxd_conn_t *c, uv_buf_t *bufs, unsigned nbufs);
int wxd__http_tls_send(wxd_conn_t *c);
void wxd__http_start_head(wxd_buf_t *o, int status);
void wxd__http_end_head(wxd_worker_t *w, wxd_buf_t *o, int has_date, int has_server, int keep_alive);
void wxd__http_conn_fail(wxd_conn_t *c, int status, const char *msg);
void wxd__http_respond_error_500(wxd_req_t *r);
/* The same with another status and text ("service unavailable"). */
void wxd__http_respond_error(wxd_req_t *r, int status, const char *what);
void wxd__http_add_request_id(wxd_buf_t *o, const wxd_req_t *r);
/* The request's trace context, its ids made on first use (a request that
 * nothing asks draws none); NULL with trace = false or before dispatch. */
wxd_trace_t *wxd__http_trace(wxd_req_t *r);
/* A request entered (+1) or left (-1) its handler: the in-flight gauge of
 * GET /metrics (with metrics on). */
static inline void wxd__http_in_flight(wxd_worker_t *w, int d) {
  if (!w->cfg->metrics) return;
  /* Only this worker writes it: a relaxed load and store, no locked add. */
  atomic_uint *p = &w->stats.in_flight;
  atomic_store_explicit(p, atomic_load_explicit(p, memory_order_relaxed) + (unsigned)d, memory_order_relaxed);
}
void wxd__http_access_log(wxd_worker_t *w, wxd_req_t *r, const char *method, int status,
                          const char *remote);

/* httplua.c: the request's coroutine and the Lua side of responses */
void wxd__http_dispatch(wxd_conn_t *c);
void wxd__http_maybe_resume_streamer(wxd_conn_t *c);
/* The body limit of the request's route (asked of the app's router when it
 * declared any), else dflt. */
size_t wxd__http_body_limit(wxd_req_t *r, size_t dflt);

/* httpfile.c: file ranges as part of a sized stream (wxd.core.http.send_file) */
int wxd__http_send_file(lua_State *L);
/* Goes on sending after the connection's writes progressed. */
void wxd__http_file_continue(wxd_req_t *r);
/* Closes and frees the request's file, if any (end of the request). */
void wxd__http_file_release(wxd_req_t *r);

/* On the per-request path of all three files: inline here. */
/* Hand-rolled formatting for the per-request path: snprintf showed up in
 * profiles of /hello. */
static inline size_t fmt_uint(char *out, uint64_t v) {
  char tmp[24];
  size_t n = 0;
  do {
    tmp[n++] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  for (size_t i = 0; i < n; i++) out[i] = tmp[n - 1 - i];
  return n;
}

static inline size_t conn_unsent(wxd_conn_t *c) { return uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp); }

static inline int conn_write(wxd_conn_t *c, const char *p, size_t len) {
  uv_buf_t b = uv_buf_init((char *)p, (unsigned)len);
  return wxd__http_conn_writev(c, &b, 1);
}

#endif
