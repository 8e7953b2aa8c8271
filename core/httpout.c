/* httpout: what goes out on an HTTP connection.
 *
 * Status lines and the server's own headers, the responses the server makes
 * itself (errors), the access log line, and the write path: bytes go to the
 * socket at once when it takes them, else into a write request the
 * connection's send timeout and OUTPUT_HIGH_WATER watch; on HTTPS they are
 * encrypted slice by slice first and take the same path.
 */
#include "http_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "log.h"
#include "metrics.h"

#define TLS_SLICE (64 * 1024)       /* plaintext encrypted per step */
#define TLS_SCRATCH (80 * 1024)     /* ciphertext of one slice, with room */

static const char *reason_phrase(int status) {
  switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 416: return "Range Not Satisfiable";
    case 417: return "Expectation Failed";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return status < 300 ? "OK" : status < 400 ? "Redirect" : status < 500 ? "Client Error" : "Server Error";
  }
}

const char *wxd_worker_date(wxd_worker_t *w, size_t *len) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME_COARSE, &ts);
  if (ts.tv_sec != w->date_sec) {
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    w->date_len = strftime(w->date_hdr, sizeof w->date_hdr,
                           "Date: %a, %d %b %Y %H:%M:%S GMT\r\n", &tm);
    w->date_sec = ts.tv_sec;
  }
  *len = w->date_len;
  return w->date_hdr;
}

/* ---- writing ---- */

typedef struct write_req {
  uv_write_t req;
  wxd_conn_t *conn;
  char data[];
} write_req_t;

static void on_write(uv_write_t *req, int status) {
  write_req_t *wr = (write_req_t *)req;
  wxd_conn_t *c = wr->conn;
  free(wr);
  c->writes_pending--;
  /* Progress: the client is reading. */
  c->send_deadline = c->writes_pending ? uv_now(&c->w->loop) + c->w->cfg->limits.send_timeout_ms : 0;
  if (status < 0 && !c->closing) {
    wxd__http_conn_close(c);
    return;
  }
  if (c->closing) return;
  if (c->writes_pending == 0 && c->close_after_write) {
    wxd__http_conn_close(c);
    return;
  }
  if (c->output_wait && conn_unsent(c) <= OUTPUT_LOW_WATER) {
    wxd__http_conn_release_output(c);
    wxd__http_conn_continue(c);
    return;
  }
  wxd__http_maybe_resume_streamer(c);
}

/* Writes the buffers to the socket, copying whatever it does not take at
 * once. Returns 0, or -1 when the connection is unusable (it is then
 * closed). */
static int sock_writev(wxd_conn_t *c, uv_buf_t *bufs, unsigned nbufs) {
  if (c->closing) return -1;
  size_t total = 0;
  for (unsigned i = 0; i < nbufs; i++) total += bufs[i].len;
  size_t done = 0;
  if (c->writes_pending == 0) {
    int n = uv_try_write((uv_stream_t *)&c->tcp, bufs, nbufs);
    if (n >= 0) done = (size_t)n;
    else if (n != UV_EAGAIN) {
      wxd__http_conn_close(c);
      return -1;
    }
  }
  if (done == total) return 0;
  write_req_t *wr = malloc(sizeof *wr + (total - done));
  if (!wr) {
    wxd__http_conn_close(c);
    return -1;
  }
  size_t off = 0, skip = done;
  for (unsigned i = 0; i < nbufs; i++) {
    size_t l = bufs[i].len;
    if (skip >= l) {
      skip -= l;
      continue;
    }
    memcpy(wr->data + off, bufs[i].base + skip, l - skip);
    off += l - skip;
    skip = 0;
  }
  wr->conn = c;
  uv_buf_t b = uv_buf_init(wr->data, (unsigned)off);
  if (uv_write(&wr->req, (uv_stream_t *)&c->tcp, &b, 1, on_write) != 0) {
    free(wr);
    wxd__http_conn_close(c);
    return -1;
  }
  if (c->writes_pending++ == 0)
    c->send_deadline = uv_now(&c->w->loop) + c->w->cfg->limits.send_timeout_ms;
  return 0;
}

/* Sends the ciphertext OpenSSL has produced, through the same write path
 * as plain bytes (order, send timeout, backpressure). Returns 0 or -1. */
int wxd__http_tls_send(wxd_conn_t *c) {
  wxd_worker_t *w = c->w;
  while (wxd_tls_pending(c->tls) > 0) {
    if (!w->tls_scratch && !(w->tls_scratch = malloc(TLS_SCRATCH))) {
      wxd__http_conn_close(c);
      return -1;
    }
    uv_buf_t b = uv_buf_init(w->tls_scratch, (unsigned)wxd_tls_take(c->tls, w->tls_scratch, TLS_SCRATCH));
    if (sock_writev(c, &b, 1) != 0) return -1;
  }
  return 0;
}

/* Encrypts len bytes and, once enough ciphertext is waiting, sends it. */
static int tls_put(wxd_conn_t *c, const char *p, size_t len, int flush) {
  if (len && wxd_tls_write(c->tls, p, len) != WXD_TLS_OK) {
    c->tls_failed = 1;
    wxd__http_conn_close(c);
    return -1;
  }
  return flush || wxd_tls_pending(c->tls) >= TLS_SLICE ? wxd__http_tls_send(c) : 0;
}

/* HTTPS: encrypts the buffers slice by slice, so the scratch stays small
 * whatever a handler returns. Small pieces (a chunk's size line and CRLF,
 * a head before a large body) are gathered first: one record and one send
 * for them rather than one each. */
static int tls_writev(wxd_conn_t *c, uv_buf_t *bufs, unsigned nbufs) {
  if (c->closing) return -1;
  char stage[16384];
  size_t sl = 0;
  for (unsigned i = 0; i < nbufs; i++) {
    const char *p = bufs[i].base;
    size_t len = bufs[i].len;
    while (len > 0) {
      if (sl > 0 || len < sizeof stage) {
        size_t n = len < sizeof stage - sl ? len : sizeof stage - sl;
        memcpy(stage + sl, p, n);
        sl += n, p += n, len -= n;
        if (sl == sizeof stage) {
          if (tls_put(c, stage, sl, 0) != 0) return -1;
          sl = 0;
        }
      } else {
        size_t n = len < TLS_SLICE ? len : TLS_SLICE;
        if (tls_put(c, p, n, 0) != 0) return -1;
        p += n, len -= n;
      }
    }
  }
  return tls_put(c, stage, sl, 1);
}

int wxd__http_conn_writev(wxd_conn_t *c, uv_buf_t *bufs, unsigned nbufs) {
  if (c->tls) return tls_writev(c, bufs, nbufs);
  return sock_writev(c, bufs, nbufs);
}

/* ---- access log ---- */

void wxd__http_access_log(wxd_worker_t *w, wxd_req_t *r, const char *method, int status,
                       const char *remote) {
  int metrics = w->cfg->metrics, logged = w->cfg->access_log && wxd_log_level() <= WXD_LOG_INFO;
  if (!metrics && !logged) return;
  double secs = r ? (double)(uv_hrtime() - r->start_ns) / 1e9 : 0;
  /* Counted here: every answered request, routed or refused, passes by. */
  if (metrics)
    wxd_metrics_request(w->id, r && r->route_len ? r->route : NULL, r ? r->route_len : 0, method, status, secs);
  if (!logged) return;
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  if (ts.tv_sec != w->ts_sec) {
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    strftime(w->ts_prefix, sizeof w->ts_prefix, "%Y-%m-%dT%H:%M:%S", &tm);
    w->ts_sec = ts.tv_sec;
  }
  char path[512];
  size_t plen = 0;
  if (r && r->url_len) {
    /* The path only: query strings carry openids and codes. */
    size_t ulen = r->url_len;
    const char *q = memchr(r->head.data, '?', ulen);
    if (q) ulen = (size_t)(q - r->head.data);
    if (ulen > 256) ulen = 256;
    plen = wxd_json_escape(path, sizeof path, r->head.data, ulen);
  }
  double ms = secs * 1e3;
  /* A request refused before dispatch has no trace context of its own. */
  char ids[320] = "";
  const wxd_trace_t *t = r && r->finished ? wxd__http_trace(r) : NULL;
  int n_ids = t ? snprintf(ids, sizeof ids, ",\"trace_id\":\"%s\",\"span_id\":\"%s\",\"request_id\":\"%s\"",
                           t->trace_id, t->span_id, t->request_id)
                : 0;
  /* The colour needs no escaping: wxd_trace_gray_ok allows [A-Za-z0-9_.-].
   * It is there with trace = false too. */
  if (r && r->finished && r->trace.gray[0] && n_ids >= 0 && (size_t)n_ids < sizeof ids)
    snprintf(ids + n_ids, sizeof ids - (size_t)n_ids, ",\"gray\":\"%s\"", r->trace.gray);
  char line[1344];
  int n = snprintf(line, sizeof line,
                   "{\"ts\":\"%s.%03ldZ\",\"level\":\"info\",\"worker\":%d,\"msg\":\"access\","
                   "\"id\":\"%s\",\"method\":\"%s\",\"path\":\"%.*s\",\"status\":%d,"
                   "\"bytes\":%zu,\"ms\":%.3f,\"remote\":\"%s\"%s}\n",
                   w->ts_prefix, ts.tv_nsec / 1000000, w->id, r ? r->id : "", method,
                   (int)plen, path, status, r ? r->bytes_out : 0, ms, remote, ids);
  if (n > 0 && (size_t)n < sizeof line) wxd_logbuf_append(&w->access, line, (size_t)n);
}

/* ---- responses ---- */

void wxd__http_start_head(wxd_buf_t *o, int status) {
  o->len = 0;
  wxd_buf_reserve(o, 256);
  const char *reason = reason_phrase(status);
  size_t rl = strlen(reason);
  memcpy(o->data, "HTTP/1.1 ", 9);
  o->len = 9 + fmt_uint(o->data + 9, (uint64_t)status);
  o->data[o->len++] = ' ';
  memcpy(o->data + o->len, reason, rl);
  o->len += rl;
  o->data[o->len++] = '\r';
  o->data[o->len++] = '\n';
}

void wxd__http_end_head(wxd_worker_t *w, wxd_buf_t *o, int has_date, int has_server, int keep_alive) {
  size_t dl;
  const char *date = wxd_worker_date(w, &dl);
  if (!has_server) wxd_buf_append(o, "Server: wxd\r\n", 13);
  if (!has_date) wxd_buf_append(o, date, dl);
  if (keep_alive) wxd_buf_append(o, "Connection: keep-alive\r\n\r\n", 26);
  else wxd_buf_append(o, "Connection: close\r\n\r\n", 21);
}

/* Writes a plain-text response produced by the server itself, then closes. */
void wxd__http_conn_fail(wxd_conn_t *c, int status, const char *msg) {
  if (c->closing) return;
  wxd_worker_t *w = c->w;
  wxd_buf_t *o = &w->out;
  char body[256];
  int bl = snprintf(body, sizeof body, "%s\n", msg);
  wxd__http_start_head(o, status);
  char cl[96];
  int n = snprintf(cl, sizeof cl, "Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n", bl);
  wxd_buf_append(o, cl, (size_t)n);
  wxd__http_end_head(w, o, 0, 0, 0);
  wxd_buf_append(o, body, (size_t)bl);
  c->discard_input = 1;
  c->close_after_write = 1;
  wxd__http_conn_stop_timer(c);
  wxd_req_t *r = c->req;
  if (r) r->bytes_out = o->len;
  wxd__http_access_log(w, r, r && r->url_len ? llhttp_method_name(llhttp_get_method(&c->parser)) : "-", status,
             c->remote);
  if (conn_write(c, o->data, o->len) == 0 && c->writes_pending == 0) wxd__http_conn_close(c);
}

/* Every response to a dispatched request names its request id. */
void wxd__http_add_request_id(wxd_buf_t *o, const wxd_req_t *r) {
  size_t n = strlen(r->trace.request_id);
  if (wxd_buf_reserve(o, n + 16) != 0) return;
  memcpy(o->data + o->len, "X-Request-Id: ", 14);
  memcpy(o->data + o->len + 14, r->trace.request_id, n);
  memcpy(o->data + o->len + 14 + n, "\r\n", 2);
  o->len += n + 16;
}

void wxd__http_respond_error_500(wxd_req_t *r) { wxd__http_respond_error(r, 500, "internal server error"); }

void wxd__http_respond_error(wxd_req_t *r, int status, const char *what) {
  wxd_conn_t *c = r->conn;
  wxd_buf_t *o = &r->w->out;
  char body[128];
  int bl = snprintf(body, sizeof body, "%s (request id %s)\n", what, r->id);
  r->status = status;
  wxd__http_start_head(o, status);
  char cl[96];
  int n = snprintf(cl, sizeof cl, "Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n", bl);
  wxd_buf_append(o, cl, (size_t)n);
  wxd__http_add_request_id(o, r);
  wxd__http_end_head(r->w, o, 0, 0, r->keep_alive);
  if (!r->is_head) wxd_buf_append(o, body, (size_t)bl);
  r->bytes_out = o->len;
  conn_write(c, o->data, o->len);
}
