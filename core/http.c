/* http: see http.h.
 *
 * Life of a connection:
 *   IDLE     waiting for the first byte of a request (keep-alive deadline, or
 *            the header deadline for a brand-new connection)
 *   READING  a request has begun: header deadline, then body deadline
 *   HANDLING the parser is paused at the end of the message and the handler
 *            runs; bytes that arrive meanwhile queue in `in`
 * and back to IDLE after the response, or closed. An IDLE connection whose
 * client leaves more than OUTPUT_HIGH_WATER of responses unread is held
 * (output_wait): nothing is read or dispatched until it took most of them,
 * so a client pipelining without reading costs a bounded amount of memory.
 */
#include "http.h"

#include <ctype.h>
#include <lauxlib.h>
#include <llhttp.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "httpscan.h"
#include "log.h"
#include "tls.h"
#include "vm.h"

#define MAX_HEADERS 100
#define IN_QUEUE_MAX (256 * 1024)   /* unparsed bytes queued while handling */
/* Unsent output a connection may hold: above it, a streaming handler waits
 * and a connection's next request is not read nor dispatched; both go on
 * once the client has taken it below half of this. */
#define OUTPUT_HIGH_WATER (256 * 1024)
#define OUTPUT_LOW_WATER (OUTPUT_HIGH_WATER / 2)
#define TLS_SLICE (64 * 1024)       /* plaintext encrypted per step */
#define TLS_SCRATCH (80 * 1024)     /* ciphertext of one slice, with room */

enum { CONN_IDLE, CONN_READING, CONN_HANDLING };

typedef struct hdr {
  uint32_t name_off, name_len, value_off, value_len;
} hdr_t;

/* The byte-level checks llhttp 8.1 lacks live in httpscan.c (shared with
 * the client): every byte of a request head and of a chunked body's framing
 * goes through them before llhttp sees it. */

typedef struct wxd_conn wxd_conn_t;

typedef struct wxd_req {
  wxd_conn_t *conn;      /* NULL once the connection is gone */
  wxd_worker_t *w;
  wxd_co_t *co;          /* the handler's coroutine while it runs */
  wxd_buf_t head;        /* URL then header names and values */
  uint32_t url_len;
  size_t header_bytes;   /* as counted against max_header_bytes */
  hdr_t hdrs[MAX_HEADERS];
  unsigned nhdrs;
  int hstate;            /* 0 none, 1 in a name, 2 in a value */
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
  unsigned drain_wait : 1;   /* coroutine waits for the write queue */
  unsigned finished : 1;
  unsigned in_handler : 1;   /* dispatched and not yet finished: owned by the coroutine */
  unsigned conn_close : 1;   /* a Connection field lists "close" */
  unsigned conn_keep_alive : 1; /* a Connection field lists "keep-alive" */
  unsigned wants_keep_alive : 1; /* what the client asked for, decided at the end of the message */
  int host_count;
  int te_count;
  int status;
  size_t bytes_out;
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
  char remote[64];
  int remote_port;
};

static llhttp_settings_t parser_settings;
static void conn_process(wxd_conn_t *c, const char *data, size_t len);
static void wxd__http_conn_close(wxd_conn_t *c);
static void wxd__http_conn_fail(wxd_conn_t *c, int status, const char *msg);
static void wxd__http_req_finish(wxd_req_t *r);

/* ---- small helpers ---- */

/* Hand-rolled formatting for the per-request path: snprintf showed up in
 * profiles of /hello. */
static size_t fmt_uint(char *out, uint64_t v) {
  char tmp[24];
  size_t n = 0;
  do {
    tmp[n++] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  for (size_t i = 0; i < n; i++) out[i] = tmp[n - 1 - i];
  return n;
}

static void fmt_hex(char *out, uint64_t v, int digits) {
  static const char hex[] = "0123456789abcdef";
  for (int i = digits - 1; i >= 0; i--) {
    out[i] = hex[v & 15];
    v >>= 4;
  }
}

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

static void wxd__http_maybe_resume_streamer(wxd_conn_t *c);
static void wxd__http_conn_continue(wxd_conn_t *c);
static void wxd__http_conn_release_output(wxd_conn_t *c);

static size_t conn_unsent(wxd_conn_t *c) { return uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp); }

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
static int wxd__http_tls_send(wxd_conn_t *c) {
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

static int wxd__http_conn_writev(wxd_conn_t *c, uv_buf_t *bufs, unsigned nbufs) {
  if (c->tls) return tls_writev(c, bufs, nbufs);
  return sock_writev(c, bufs, nbufs);
}

static int conn_write(wxd_conn_t *c, const char *p, size_t len) {
  uv_buf_t b = uv_buf_init((char *)p, (unsigned)len);
  return wxd__http_conn_writev(c, &b, 1);
}

/* ---- access log ---- */

static void wxd__http_access_log(wxd_worker_t *w, wxd_req_t *r, const char *method, int status,
                       const char *remote) {
  if (!w->cfg->access_log || wxd_log_level() > WXD_LOG_INFO) return;
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
  double ms = r ? (double)(uv_hrtime() - r->start_ns) / 1e6 : 0;
  char line[1024];
  int n = snprintf(line, sizeof line,
                   "{\"ts\":\"%s.%03ldZ\",\"level\":\"info\",\"worker\":%d,\"msg\":\"access\","
                   "\"id\":\"%s\",\"method\":\"%s\",\"path\":\"%.*s\",\"status\":%d,"
                   "\"bytes\":%zu,\"ms\":%.3f,\"remote\":\"%s\"}\n",
                   w->ts_prefix, ts.tv_nsec / 1000000, w->id, r ? r->id : "", method,
                   (int)plen, path, status, r ? r->bytes_out : 0, ms, remote);
  if (n > 0 && (size_t)n < sizeof line) wxd_logbuf_append(&w->access, line, (size_t)n);
}

/* ---- requests ---- */

static wxd_req_t *req_new(wxd_conn_t *c) {
  wxd_req_t *r = calloc(1, sizeof *r);
  if (!r) return NULL;
  r->conn = c;
  r->w = c->w;
  return r;
}

static void req_reset(wxd_req_t *r) {
  r->head.len = 0;
  r->body.len = 0;
  r->url_len = 0;
  r->header_bytes = 0;
  r->nhdrs = 0;
  r->hstate = 0;
  r->in_trailers = 0;
  r->keep_alive = r->is_head = r->has_te = r->streaming = r->stream_raw = r->stream_nobody = 0;
  r->drain_wait = r->finished = 0;
  r->conn_close = r->conn_keep_alive = r->wants_keep_alive = 0;
  r->host_count = 0;
  r->te_count = 0;
  r->status = 0;
  r->bytes_out = 0;
  r->start_ns = uv_hrtime();
}

static void wxd__http_req_free(wxd_req_t *r) {
  wxd_buf_free(&r->head);
  wxd_buf_free(&r->body);
  free(r);
}

static const char *req_header(wxd_req_t *r, const char *name, size_t *len) {
  size_t nl = strlen(name);
  for (unsigned i = 0; i < r->nhdrs; i++) {
    hdr_t *h = &r->hdrs[i];
    if (h->name_len == nl && memcmp(r->head.data + h->name_off, name, nl) == 0) {
      *len = h->value_len;
      return r->head.data + h->value_off;
    }
  }
  return NULL;
}

/* ---- llhttp callbacks ---- */

#define FAIL(c, st, m) \
  do {                 \
    (c)->err_status = (st); \
    (c)->err_msg = (m);     \
    return -1;         \
  } while (0)

static int on_message_begin(llhttp_t *p) {
  wxd_conn_t *c = p->data;
  if (!c->req) {
    c->req = req_new(c);
    if (!c->req) FAIL(c, 500, "out of memory");
  }
  req_reset(c->req);
  return 0;
}

static int count_header_bytes(wxd_conn_t *c, size_t n) {
  wxd_req_t *r = c->req;
  r->header_bytes += n;
  return r->header_bytes > c->w->cfg->limits.max_header_bytes ? -1 : 0;
}

static int on_url(llhttp_t *p, const char *at, size_t len) {
  wxd_conn_t *c = p->data;
  wxd_req_t *r = c->req;
  if (r->url_len + len > c->w->cfg->limits.max_uri_bytes) FAIL(c, 414, "request target too long");
  /* llhttp lets a raw tab through; it and other control bytes must never
   * reach routing or an app's logs. */
  for (size_t i = 0; i < len; i++)
    if ((unsigned char)at[i] < 0x20 || at[i] == 0x7f) FAIL(c, 400, "control byte in request target");
  if (count_header_bytes(c, len)) FAIL(c, 431, "request header fields too large");
  if (wxd_buf_append(&r->head, at, len)) FAIL(c, 500, "out of memory");
  r->url_len += (uint32_t)len;
  return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t len) {
  wxd_conn_t *c = p->data;
  wxd_req_t *r = c->req;
  if (r->in_trailers) {
    /* Chunked trailers never become request headers: a client could
     * otherwise add fields a proxy in front already checked or stripped. */
    if (count_header_bytes(c, len + 4)) FAIL(c, 431, "request header fields too large");
    return 0;
  }
  if (r->hstate != 1) {
    if (r->nhdrs == MAX_HEADERS) FAIL(c, 431, "too many header fields");
    hdr_t *h = &r->hdrs[r->nhdrs++];
    h->name_off = (uint32_t)r->head.len;
    h->name_len = 0;
    h->value_off = 0;
    h->value_len = 0;
    r->hstate = 1;
    if (count_header_bytes(c, 4)) FAIL(c, 431, "request header fields too large");
  }
  if (count_header_bytes(c, len)) FAIL(c, 431, "request header fields too large");
  if (wxd_buf_reserve(&r->head, len)) FAIL(c, 500, "out of memory");
  char *dst = r->head.data + r->head.len;
  for (size_t i = 0; i < len; i++) dst[i] = (char)tolower((unsigned char)at[i]);
  r->head.len += len;
  r->hdrs[r->nhdrs - 1].name_len += (uint32_t)len;
  return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len) {
  wxd_conn_t *c = p->data;
  wxd_req_t *r = c->req;
  if (r->in_trailers) {
    if (count_header_bytes(c, len)) FAIL(c, 431, "request header fields too large");
    return 0;
  }
  hdr_t *h = &r->hdrs[r->nhdrs - 1];
  if (r->hstate != 2) {
    h->value_off = (uint32_t)r->head.len;
    r->hstate = 2;
  }
  if (count_header_bytes(c, len)) FAIL(c, 431, "request header fields too large");
  if (wxd_buf_append(&r->head, at, len)) FAIL(c, 500, "out of memory");
  h->value_len += (uint32_t)len;
  return 0;
}

/* Notes the options of one Connection field: a comma-separated list of
 * tokens, any case, with optional whitespace around each. Every Connection
 * field counts, so "close" wins however it is combined. Proxy-Connection
 * is not Connection and is ignored (llhttp's F_CONNECTION_* flags count it
 * too, which is why they are not used). */
static void note_connection_options(wxd_req_t *r, const char *v, size_t n) {
  size_t i = 0;
  while (i < n) {
    while (i < n && (v[i] == ' ' || v[i] == '\t' || v[i] == ',')) i++;
    size_t start = i;
    while (i < n && v[i] != ',' && v[i] != ' ' && v[i] != '\t') i++;
    size_t len = i - start;
    if (len == 5 && strncasecmp(v + start, "close", 5) == 0) r->conn_close = 1;
    else if (len == 10 && strncasecmp(v + start, "keep-alive", 10) == 0) r->conn_keep_alive = 1;
  }
}

static int on_header_value_complete(llhttp_t *p) {
  wxd_conn_t *c = p->data;
  wxd_req_t *r = c->req;
  if (r->in_trailers || r->nhdrs == 0) return 0;
  hdr_t *h = &r->hdrs[r->nhdrs - 1];
  const char *name = r->head.data + h->name_off;
  if (h->name_len == 17 && memcmp(name, "transfer-encoding", 17) == 0) {
    r->has_te = 1;
    r->te_count++;
  }
  else if (h->name_len == 4 && memcmp(name, "host", 4) == 0) r->host_count++;
  else if (h->name_len == 10 && memcmp(name, "connection", 10) == 0)
    note_connection_options(r, r->head.data + h->value_off, h->value_len);
  r->hstate = 0;
  return 0;
}

/* A host an app can take for a name (RFC 9110 7.2, and what nginx
 * accepts): a name, an address or a [literal], then an optional :port.
 * Refused: nothing before the port (a trailing dot does not count), '/',
 * '\\', whitespace, control bytes, "..". */
static int host_ok(const char *h, size_t n) {
  size_t name_len = n;
  int literal = n > 0 && h[0] == '[', name_done = 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)h[i];
    if (ch <= 0x20 || ch == 0x7f || ch == '/' || ch == '\\') return 0;
    if (ch == '.' && i > 0 && h[i - 1] == '.') return 0;
    if (!name_done && (literal ? ch == ']' : ch == ':')) {
      name_len = literal ? i + 1 : i;
      name_done = 1;
    }
  }
  if (literal && !name_done) return 0;
  if (name_len > 0 && h[name_len - 1] == '.') name_len--;
  return name_len > 0;
}

static int find_header(wxd_req_t *r, const char *name) {
  size_t nl = strlen(name);
  for (unsigned i = 0; i < r->nhdrs; i++) {
    hdr_t *h = &r->hdrs[i];
    if (h->name_len == nl && memcmp(r->head.data + h->name_off, name, nl) == 0) return (int)i;
  }
  return -1;
}

/* Rewrites an absolute-form target (RFC 9112 3.2.2) to the origin form
 * apps route on ("/" when it has no path, as in http://host or
 * http://host?q), and makes its authority the request's Host. Returns 0,
 * or -1 with the refusal set. */
static int take_absolute_form(wxd_conn_t *c, wxd_req_t *r, int host_idx) {
  const char *url = r->head.data;
  size_t scheme = (r->url_len > 7 && strncasecmp(url, "http://", 7) == 0)    ? 7
                  : (r->url_len > 8 && strncasecmp(url, "https://", 8) == 0) ? 8
                                                                             : 0;
  if (!scheme) FAIL(c, 400, "bad request target");
  size_t end = scheme; /* the authority ends at the path or the query */
  while (end < r->url_len && url[end] != '/' && url[end] != '?') end++;
  size_t alen = end - scheme;
  /* No userinfo: a client has no business sending credentials there, and
   * a name that looks like one host but is another is a classic trick. */
  if (memchr(url + scheme, '@', alen)) FAIL(c, 400, "userinfo in request target");
  if (!host_ok(url + scheme, alen)) FAIL(c, 400, "bad host in request target");
  /* The authority moves behind the headers ("host" first, for a request
   * that had no Host field), and is shifted with them below. */
  if (host_idx < 0 && r->nhdrs == MAX_HEADERS) FAIL(c, 431, "too many header fields");
  if (wxd_buf_reserve(&r->head, 4 + alen)) FAIL(c, 500, "out of memory");
  size_t host_off = r->head.len;
  memcpy(r->head.data + host_off, "host", 4);
  memcpy(r->head.data + host_off + 4, r->head.data + scheme, alen);
  r->head.len += 4 + alen;
  /* One byte before the path is kept to hold the "/" when there is none. */
  int add_slash = end == r->url_len || r->head.data[end] == '?';
  size_t skip = add_slash ? end - 1 : end;
  memmove(r->head.data, r->head.data + skip, r->url_len - skip);
  if (add_slash) r->head.data[0] = '/';
  size_t tail = r->head.len - r->url_len;
  memmove(r->head.data + r->url_len - skip, r->head.data + r->url_len, tail);
  for (unsigned i = 0; i < r->nhdrs; i++) {
    r->hdrs[i].name_off -= (uint32_t)skip;
    if (r->hdrs[i].value_len) r->hdrs[i].value_off -= (uint32_t)skip;
  }
  r->head.len -= skip;
  r->url_len -= (uint32_t)skip;
  host_off -= skip;
  if (host_idx < 0) {
    host_idx = (int)r->nhdrs++;
    r->hdrs[host_idx].name_off = (uint32_t)host_off;
    r->hdrs[host_idx].name_len = 4;
  }
  r->hdrs[host_idx].value_off = (uint32_t)(host_off + 4);
  r->hdrs[host_idx].value_len = (uint32_t)alen;
  return 0;
}

static void conn_set_timer(wxd_conn_t *c, uint64_t ms);

static int on_headers_complete(llhttp_t *p) {
  wxd_conn_t *c = p->data;
  wxd_req_t *r = c->req;
  const wxd_limits_t *lim = &c->w->cfg->limits;
  r->method = llhttp_get_method(p);
  r->http_major = llhttp_get_http_major(p);
  r->http_minor = llhttp_get_http_minor(p);
  if (r->http_major != 1) FAIL(c, 400, "unsupported HTTP version");
  /* HTTP/1.0 has no chunked coding: a Transfer-Encoding there is a
   * smuggling attempt (RFC 9112 section 6.1). */
  if (r->http_minor == 0 && r->has_te) FAIL(c, 400, "transfer-encoding in HTTP/1.0");
  if (r->has_te) {
    /* Only "chunked" is a coding we decode; anything else (gzip, chunked)
     * would hand the app bytes it did not expect. */
    size_t tl;
    const char *te = req_header(r, "transfer-encoding", &tl);
    while (tl && (te[0] == ' ' || te[0] == '\t')) te++, tl--;
    while (tl && (te[tl - 1] == ' ' || te[tl - 1] == '\t')) tl--;
    if (r->te_count > 1) FAIL(c, 400, "repeated Transfer-Encoding");
    if (!te || tl != 7 || strncasecmp(te, "chunked", 7) != 0) FAIL(c, 501, "transfer coding not supported");
    wxd_scan_chunked(&c->scan, lim->max_body_bytes);
  }
  if (r->http_minor == 1 && r->host_count != 1) FAIL(c, 400, "missing or repeated Host");
  if (r->host_count > 1) FAIL(c, 400, "repeated Host");
  int host_idx = find_header(r, "host");
  if (host_idx >= 0) {
    /* Checked even when an absolute-form target replaces it, as nginx
     * does; the app gets it without surrounding whitespace. */
    hdr_t *h = &r->hdrs[host_idx];
    const char *v = r->head.data + h->value_off;
    while (h->value_len && (v[0] == ' ' || v[0] == '\t')) v++, h->value_off++, h->value_len--;
    while (h->value_len && (v[h->value_len - 1] == ' ' || v[h->value_len - 1] == '\t')) h->value_len--;
    if (!host_ok(v, h->value_len)) FAIL(c, 400, "bad Host");
  }
  if (r->method == HTTP_CONNECT) FAIL(c, 405, "CONNECT is not supported");
  if (r->url_len == 0) FAIL(c, 400, "empty request target");
  const char *url = r->head.data;
  if (url[0] != '/' && !(r->url_len == 1 && url[0] == '*' && r->method == HTTP_OPTIONS) &&
      take_absolute_form(c, r, host_idx) != 0)
    return -1;
  int has_body = (p->flags & F_CHUNKED) || ((p->flags & F_CONTENT_LENGTH) && p->content_length > 0);
  if ((p->flags & F_CONTENT_LENGTH) && p->content_length > lim->max_body_bytes)
    FAIL(c, 413, "request body too large");
  size_t elen;
  const char *expect = req_header(r, "expect", &elen);
  if (expect) {
    if (elen == 12 && strncasecmp(expect, "100-continue", 12) == 0) {
      if (r->http_minor == 1 && has_body) {
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        /* A failed write closes the connection and frees r: stop here. */
        if (conn_write(c, cont, sizeof cont - 1) != 0 || c->closing) return -1;
      }
    } else {
      FAIL(c, 417, "unsupported expectation");
    }
  }
  r->is_head = r->method == HTTP_HEAD;
  r->in_trailers = 1;
  if (has_body) conn_set_timer(c, lim->body_timeout_ms);
  return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len) {
  wxd_conn_t *c = p->data;
  wxd_req_t *r = c->req;
  if (r->body.len + len > c->w->cfg->limits.max_body_bytes) FAIL(c, 413, "request body too large");
  if (wxd_buf_append(&r->body, at, len)) FAIL(c, 500, "out of memory");
  return 0;
}

static int on_message_complete(llhttp_t *p) {
  wxd_conn_t *c = p->data;
  wxd_req_t *r = c->req;
  /* HTTP/1.1 stays open unless told to close; HTTP/1.0 closes unless told
   * to stay open, and "close" wins over "keep-alive" on both. */
  r->wants_keep_alive = !r->conn_close && (r->http_minor == 1 || r->conn_keep_alive) && !p->upgrade;
  return HPE_PAUSED; /* one request at a time: responses stay in order */
}

int wxd_http_selfcheck(char *err, size_t errlen) {
  llhttp_settings_init(&parser_settings);
  parser_settings.on_message_begin = on_message_begin;
  parser_settings.on_url = on_url;
  parser_settings.on_header_field = on_header_field;
  parser_settings.on_header_value = on_header_value;
  parser_settings.on_header_value_complete = on_header_value_complete;
  parser_settings.on_headers_complete = on_headers_complete;
  parser_settings.on_body = on_body;
  parser_settings.on_message_complete = on_message_complete;
  llhttp_t p;
  llhttp_init(&p, HTTP_REQUEST, &parser_settings);
  if (p.lenient_flags != 0) {
    snprintf(err, errlen, "llhttp starts with lenient flags 0x%x; refusing to run", p.lenient_flags);
    return -1;
  }
  return 0;
}

/* ---- timers ---- */

/* Timeouts are deadlines checked by the worker's tick (wxd_http_sweep)
 * rather than a libuv timer per connection: a request then costs no timer
 * heap operations, and an idle connection no timer handle. They are
 * accurate to the tick (100 ms). */
static void conn_set_timer(wxd_conn_t *c, uint64_t ms) {
  c->deadline = uv_now(&c->w->loop) + ms;
}

static void wxd__http_conn_stop_timer(wxd_conn_t *c) { c->deadline = 0; }

void wxd_http_sweep(wxd_worker_t *w) {
  uint64_t now = uv_now(&w->loop);
  if (w->trim_wanted) {
    /* Connections that were held for output have gone: hand their freed
     * queues back to the system. glibc keeps freed memory in its arenas,
     * and the 64 KiB-class blocks of write queues land between live
     * allocations, where free() alone cannot return them. */
    w->trim_wanted = 0;
#ifdef __GLIBC__
    malloc_trim(0);
#endif
  }
  wxd_conn_t *c = w->conns;
  while (c) {
    wxd_conn_t *next = c->next;
    if (c->closing) {
      /* nothing */
    } else if (c->writes_pending && c->send_deadline && now >= c->send_deadline) {
      /* A client that stopped reading holds our memory: let it go. */
      wxd__http_conn_close(c);
    } else if (c->deadline && now >= c->deadline) {
      c->deadline = 0;
      if (c->state == CONN_READING) wxd__http_conn_fail(c, 408, "request timeout");
      else if (c->state == CONN_IDLE && c->writes_pending) conn_set_timer(c, c->w->cfg->limits.keepalive_timeout_ms);
      else if (c->state == CONN_IDLE) wxd__http_conn_close(c);
    }
    c = next;
  }
}

/* ---- responses ---- */

static int tchar(unsigned char ch) {
  return isalnum(ch) || strchr("!#$%&'*+-.^_`|~", ch) != NULL;
}

static int header_name_ok(const char *s, size_t n) {
  if (n == 0) return 0;
  for (size_t i = 0; i < n; i++)
    if (!tchar((unsigned char)s[i])) return 0;
  return 1;
}

static int header_value_ok(const char *s, size_t n) {
  for (size_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)s[i];
    if (ch == '\r' || ch == '\n' || ch == 0) return 0;
  }
  return 1;
}

/* Appends one user header; returns 0, or -1 for an invalid one. */
static int append_header(wxd_buf_t *o, const char *name, size_t nl, const char *val, size_t vl) {
  if (!header_value_ok(val, vl)) return -1;
  if (wxd_buf_reserve(o, nl + vl + 4)) return -1;
  memcpy(o->data + o->len, name, nl);
  o->len += nl;
  o->data[o->len++] = ':';
  o->data[o->len++] = ' ';
  memcpy(o->data + o->len, val, vl);
  o->len += vl;
  o->data[o->len++] = '\r';
  o->data[o->len++] = '\n';
  return 0;
}

/* Framing headers belong to the server. */
static int reserved_header(const char *name, size_t nl) {
  return (nl == 14 && strncasecmp(name, "content-length", 14) == 0) ||
         (nl == 17 && strncasecmp(name, "transfer-encoding", 17) == 0) ||
         (nl == 10 && strncasecmp(name, "connection", 10) == 0);
}

/* Serialises the headers table at `idx` of T into o. Returns 0 or -1 with a
 * message in *why. Sets *has_date and *has_server when the app set them. */
static int append_lua_headers(lua_State *T, int idx, wxd_buf_t *o, int *has_date, int *has_server,
                              const char **why) {
  if (lua_isnil(T, idx)) return 0;
  if (!lua_istable(T, idx)) {
    *why = "headers must be a table";
    return -1;
  }
  lua_pushnil(T);
  while (lua_next(T, idx) != 0) {
    if (lua_type(T, -2) != LUA_TSTRING) {
      lua_pop(T, 2);
      *why = "header names must be strings";
      return -1;
    }
    size_t nl;
    const char *name = lua_tolstring(T, -2, &nl);
    if (!header_name_ok(name, nl)) {
      lua_pop(T, 2);
      *why = "invalid header name";
      return -1;
    }
    if (reserved_header(name, nl)) {
      lua_pop(T, 1);
      continue;
    }
    if (nl == 4 && strncasecmp(name, "date", 4) == 0) *has_date = 1;
    if (nl == 6 && strncasecmp(name, "server", 6) == 0) *has_server = 1;
    int t = lua_type(T, -1);
    if (t == LUA_TSTRING || t == LUA_TNUMBER) {
      size_t vl;
      const char *v = lua_tolstring(T, -1, &vl);
      if (append_header(o, name, nl, v, vl)) {
        lua_pop(T, 2);
        *why = "invalid header value (CR, LF or NUL)";
        return -1;
      }
    } else if (t == LUA_TTABLE) {
      int n = (int)lua_objlen(T, -1);
      for (int i = 1; i <= n; i++) {
        lua_rawgeti(T, -1, i);
        size_t vl;
        const char *v = lua_tolstring(T, -1, &vl);
        if (!v || append_header(o, name, nl, v, vl)) {
          lua_pop(T, 3);
          *why = "invalid header value in list";
          return -1;
        }
        lua_pop(T, 1);
      }
    } else {
      lua_pop(T, 2);
      *why = "header values must be strings, numbers or lists of strings";
      return -1;
    }
    lua_pop(T, 1);
  }
  return 0;
}

static void wxd__http_start_head(wxd_buf_t *o, int status) {
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

static void wxd__http_end_head(wxd_worker_t *w, wxd_buf_t *o, int has_date, int has_server, int keep_alive) {
  size_t dl;
  const char *date = wxd_worker_date(w, &dl);
  if (!has_server) wxd_buf_append(o, "Server: wxd\r\n", 13);
  if (!has_date) wxd_buf_append(o, date, dl);
  if (keep_alive) wxd_buf_append(o, "Connection: keep-alive\r\n\r\n", 26);
  else wxd_buf_append(o, "Connection: close\r\n\r\n", 21);
}

static int status_has_body(int status) {
  return !(status < 200 || status == 204 || status == 304);
}

/* Writes a plain-text response produced by the server itself, then closes. */
static void wxd__http_conn_fail(wxd_conn_t *c, int status, const char *msg) {
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

/* The field names and common values of the raw request table, interned once
 * per VM and fetched by index: profiles of /hello showed lua_setfield's
 * string interning among the top costs. */
enum {
  S_METHOD = 1, S_PATH, S_QUERY_STRING, S_VERSION, S_HEADERS, S_BODY, S_REMOTE_ADDR,
  S_REMOTE_PORT, S_ID, S_V11, S_V10, S_EMPTY, S_METHODS, S_COUNT = S_METHODS
};

static int push_http_strings(lua_State *T, wxd_vm_t *vm) {
  if (vm->http_strings_ref == LUA_NOREF) {
    static const char *const names[] = {"method", "path", "query_string", "version", "headers", "body",
                                        "remote_addr", "remote_port", "id", "1.1", "1.0", ""};
    lua_createtable(T, S_COUNT, 0);
    for (int i = 0; i < S_COUNT - 1; i++) {
      lua_pushstring(T, names[i]);
      lua_rawseti(T, -2, i + 1);
    }
    /* Method names by llhttp's method number + 1, filled as methods come
     * (llhttp_method_name aborts on numbers it does not know). */
    lua_createtable(T, 8, 0);
    lua_rawseti(T, -2, S_METHODS);
    lua_pushvalue(T, -1);
    vm->http_strings_ref = luaL_ref(T, LUA_REGISTRYINDEX);
  } else {
    lua_rawgeti(T, LUA_REGISTRYINDEX, vm->http_strings_ref);
  }
  return lua_gettop(T);
}

/* Sets tbl[strings[key]] = the value on top of the stack (popped). */
static void set_field(lua_State *T, int tbl, int strings, int key) {
  lua_rawgeti(T, strings, key);
  lua_insert(T, -2);
  lua_rawset(T, tbl);
}

/* raw.tls on HTTPS connections (wxd.app derives req.scheme from it). */
static void push_tls_info(lua_State *T, const wxd_tls_info_t *ti, int tbl) {
  lua_createtable(T, 0, 7);
  lua_pushstring(T, ti->version);
  lua_setfield(T, -2, "version");
  lua_pushstring(T, ti->cipher);
  lua_setfield(T, -2, "cipher");
  lua_pushboolean(T, ti->client_verified);
  lua_setfield(T, -2, "client_verified");
  const char *opt[4][2] = {{"server_name", ti->server_name},
                           {"client_subject", ti->client_subject},
                           {"client_issuer", ti->client_issuer},
                           {"client_serial", ti->client_serial}};
  for (int i = 0; i < 4; i++) {
    if (!opt[i][1]) continue;
    lua_pushstring(T, opt[i][1]);
    lua_setfield(T, -2, opt[i][0]);
  }
  lua_setfield(T, tbl, "tls");
}

/* Pushes the raw request table the Lua side wraps (lua/wxd/app.lua). */
static void push_raw_request(lua_State *T, wxd_req_t *r, wxd_vm_t *vm) {
  wxd_conn_t *c = r->conn;
  int st = push_http_strings(T, vm);
  /* Room for the fields below and the few wxd.app adds (params, query). */
  lua_createtable(T, 0, 16);
  int tbl = lua_gettop(T);
  lua_rawgeti(T, st, S_METHODS);
  lua_rawgeti(T, -1, r->method + 1);
  if (lua_isnil(T, -1)) {
    lua_pop(T, 1);
    lua_pushstring(T, llhttp_method_name(r->method));
    lua_pushvalue(T, -1);
    lua_rawseti(T, -3, r->method + 1);
  }
  lua_remove(T, -2);
  set_field(T, tbl, st, S_METHOD);
  const char *url = r->head.data;
  const char *q = memchr(url, '?', r->url_len);
  size_t plen = q ? (size_t)(q - url) : r->url_len;
  lua_pushlstring(T, url, plen);
  set_field(T, tbl, st, S_PATH);
  if (q) lua_pushlstring(T, q + 1, r->url_len - plen - 1);
  else lua_rawgeti(T, st, S_EMPTY);
  set_field(T, tbl, st, S_QUERY_STRING);
  lua_rawgeti(T, st, r->http_minor == 1 ? S_V11 : S_V10);
  set_field(T, tbl, st, S_VERSION);
  lua_createtable(T, 0, (int)r->nhdrs);
  for (unsigned i = 0; i < r->nhdrs; i++) {
    hdr_t *h = &r->hdrs[i];
    lua_pushlstring(T, r->head.data + h->name_off, h->name_len);
    lua_pushvalue(T, -1);
    lua_rawget(T, -3);
    if (lua_isnil(T, -1)) {
      lua_pop(T, 1);
      lua_pushlstring(T, r->head.data + h->value_off, h->value_len);
    } else {
      /* Repeated field: join as RFC 9110 5.3 allows. */
      lua_pushliteral(T, ", ");
      lua_pushlstring(T, r->head.data + h->value_off, h->value_len);
      lua_concat(T, 3);
    }
    lua_rawset(T, -3);
  }
  set_field(T, tbl, st, S_HEADERS);
  if (r->body.len) lua_pushlstring(T, r->body.data, r->body.len);
  else lua_rawgeti(T, st, S_EMPTY);
  set_field(T, tbl, st, S_BODY);
  lua_pushstring(T, c->remote);
  set_field(T, tbl, st, S_REMOTE_ADDR);
  lua_pushinteger(T, c->remote_port);
  set_field(T, tbl, st, S_REMOTE_PORT);
  lua_pushlstring(T, r->id, 18);
  set_field(T, tbl, st, S_ID);
  if (c->tls_info) push_tls_info(T, c->tls_info, tbl);
  lua_remove(T, st); /* the request table is left on top */
}

static void wxd__http_respond_error_500(wxd_req_t *r) {
  wxd_conn_t *c = r->conn;
  wxd_buf_t *o = &r->w->out;
  char body[128];
  int bl = snprintf(body, sizeof body, "internal server error (request id %s)\n", r->id);
  r->status = 500;
  wxd__http_start_head(o, 500);
  char cl[96];
  int n = snprintf(cl, sizeof cl, "Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n", bl);
  wxd_buf_append(o, cl, (size_t)n);
  wxd__http_end_head(r->w, o, 0, 0, r->keep_alive);
  if (!r->is_head) wxd_buf_append(o, body, (size_t)bl);
  r->bytes_out = o->len;
  conn_write(c, o->data, o->len);
}

static void log_request_error(wxd_req_t *r, const char *what, const char *detail) {
  char extra[4096];
  char esc[3500];
  size_t el = wxd_json_escape(esc, sizeof esc, detail, strlen(detail));
  snprintf(extra, sizeof extra, "\"id\":\"%s\",\"error\":\"%.*s\"", r->id, (int)el, esc);
  wxd_log(WXD_LOG_ERROR, r->w->id, what, extra);
}

/* Sends the handler's results (status, headers, body on T). */
static void respond_from_lua(wxd_req_t *r, lua_State *T) {
  wxd_conn_t *c = r->conn;
  wxd_worker_t *w = r->w;
  int top = lua_gettop(T);
  if (r->streaming) {
    /* A handler that streamed may still return a last piece of body. */
    size_t bl = 0;
    const char *body = top >= 3 && lua_type(T, 3) == LUA_TSTRING ? lua_tolstring(T, 3, &bl) : NULL;
    if (top >= 4 && lua_toboolean(T, 4)) {
      /* The handler failed after its status went out: the only honest
       * signal left is to cut the response short. */
      r->keep_alive = 0;
      wxd__http_conn_close(c);
      return;
    }
    if (r->stream_nobody) return;
    if (r->stream_raw) {
      if (bl) conn_write(c, body, bl);
    } else {
      char sz[32];
      uv_buf_t b[3];
      unsigned nb = 0;
      int sl = 0;
      if (bl) {
        sl = snprintf(sz, sizeof sz, "%zx\r\n", bl);
        b[nb++] = uv_buf_init(sz, (unsigned)sl);
        b[nb++] = uv_buf_init((char *)body, (unsigned)bl);
        b[nb++] = uv_buf_init("\r\n0\r\n\r\n", 7);
      } else {
        b[nb++] = uv_buf_init("0\r\n\r\n", 5);
      }
      wxd__http_conn_writev(c, b, nb);
    }
    r->bytes_out += bl;
    return;
  }
  const char *why = NULL;
  if (top < 1 || !lua_isnumber(T, 1)) why = "handler returned no status";
  int status = why ? 500 : (int)lua_tointeger(T, 1);
  /* 1xx are interim responses, never the answer to a request. */
  if (!why && (status < 200 || status > 999)) why = "handler returned an invalid status (expected 200..999)";
  size_t bl = 0;
  const char *body = NULL;
  if (!why && top >= 3 && !lua_isnil(T, 3)) {
    if (lua_type(T, 3) != LUA_TSTRING) why = "handler returned a body that is not a string";
    else body = lua_tolstring(T, 3, &bl);
  }
  wxd_buf_t *o = &w->out;
  int has_date = 0, has_server = 0;
  if (!why) {
    wxd__http_start_head(o, status);
    if (top >= 2) append_lua_headers(T, 2, o, &has_date, &has_server, &why);
  }
  if (why) {
    log_request_error(r, "bad handler result", why);
    wxd__http_respond_error_500(r);
    return;
  }
  r->status = status;
  if (status_has_body(status)) {
    char cl[48];
    memcpy(cl, "Content-Length: ", 16);
    size_t n = 16 + fmt_uint(cl + 16, bl);
    cl[n++] = '\r';
    cl[n++] = '\n';
    wxd_buf_append(o, cl, n);
  } else {
    bl = 0;
  }
  wxd__http_end_head(w, o, has_date, has_server, r->keep_alive);
  r->bytes_out = o->len + bl;
  if (r->is_head || bl == 0) {
    conn_write(c, o->data, o->len);
  } else if (bl <= 16384) {
    /* Small bodies go in the same buffer: one syscall, one packet. */
    wxd_buf_append(o, body, bl);
    conn_write(c, o->data, o->len);
  } else {
    uv_buf_t b[2] = {uv_buf_init(o->data, (unsigned)o->len), uv_buf_init((char *)body, (unsigned)bl)};
    wxd__http_conn_writev(c, b, 2);
  }
}

static void on_request_done(wxd_co_t *co, int status) {
  wxd_req_t *r = co->data;
  r->co = NULL;
  if (status != 0) {
    /* lua/wxd/server.lua catches handler errors; reaching here means the
     * wrapper itself failed. */
    const char *msg = lua_tostring(co->T, -1);
    wxd_co_traceback(co, msg ? msg : "(error object is not a string)");
    log_request_error(r, "request failed", lua_tostring(co->vm->L, -1));
    lua_pop(co->vm->L, 1);
    if (r->conn && !r->streaming) {
      wxd__http_respond_error_500(r);
    } else if (r->conn) {
      /* Headers are out: cut the response short rather than end it. */
      r->keep_alive = 0;
      wxd__http_conn_close(r->conn);
    }
  } else if (r->conn) {
    respond_from_lua(r, co->T);
  }
  wxd__http_req_finish(r);
}

/* The worker stops while the handler still waits (shutdown deadline). */
static void on_request_abandoned(wxd_co_t *co) {
  wxd_req_t *r = co->data;
  if (r->conn) r->conn->req = NULL;
  wxd__http_req_free(r);
}

static void wxd__http_dispatch(wxd_conn_t *c) {
  wxd_worker_t *w = c->w;
  wxd_req_t *r = c->req;
  c->state = CONN_HANDLING;
  wxd__http_conn_stop_timer(c);
  c->nreq++;
  r->keep_alive = r->wants_keep_alive && !w->draining && c->nreq < w->cfg->limits.max_requests;
  /* Bytes after a request that ends the connection are never parsed: a
   * request smuggled behind "Connection: close" reaches no handler. */
  if (!r->keep_alive) c->discard_input = 1;
  r->in_handler = 1;
  w->seq++;
  atomic_fetch_add_explicit(&w->stats.requests, 1, memory_order_relaxed);
  /* 18 hex digits: random per worker and run, worker index, sequence. */
  fmt_hex(r->id, w->id_prefix, 8);
  fmt_hex(r->id + 8, (uint64_t)(w->id & 0xff), 2);
  fmt_hex(r->id + 10, w->seq & 0xffffffffu, 8);
  r->id[18] = 0;
  wxd_co_t *co = wxd_co_new(w->vm, WXD_CO_REQUEST, on_request_done, r);
  if (!co) {
    wxd__http_respond_error_500(r);
    wxd__http_req_finish(r);
    return;
  }
  r->co = co;
  co->abandon = on_request_abandoned;
  lua_rawgeti(co->T, LUA_REGISTRYINDEX, w->vm->entry_ref);
  push_raw_request(co->T, r, w->vm);
  wxd_co_resume(co, 1);
}

static void process_queued(wxd_conn_t *c) {
  if (c->in.len == 0) return;
  wxd_buf_t q = c->in;
  memset(&c->in, 0, sizeof c->in);
  conn_process(c, q.data, q.len);
  wxd_buf_free(&q);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);
static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf);

static void conn_start_reading(wxd_conn_t *c) {
  if (c->reading || c->closing || c->peer_eof || c->output_wait) return;
  if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0) c->reading = 1;
}

static void conn_stop_reading(wxd_conn_t *c) {
  if (c->reading) uv_read_stop((uv_stream_t *)&c->tcp);
  c->reading = 0;
}

/* The client leaves responses unread: read and dispatch nothing more until
 * it has taken most of them (on_write releases). */
static void conn_hold_output(wxd_conn_t *c) {
  if (c->output_wait) return;
  c->output_wait = 1;
  c->was_held = 1;
  atomic_fetch_add_explicit(&c->w->stats.paused_for_output, 1, memory_order_relaxed);
  conn_stop_reading(c);
}

static void wxd__http_conn_release_output(wxd_conn_t *c) {
  if (!c->output_wait) return;
  c->output_wait = 0;
  atomic_fetch_sub_explicit(&c->w->stats.paused_for_output, 1, memory_order_relaxed);
}

static void wxd__http_req_finish(wxd_req_t *r) {
  wxd_conn_t *c = r->conn; /* NULL when the connection broke meanwhile */
  wxd_worker_t *w = r->w;
  r->finished = 1;
  r->in_handler = 0;
  wxd__http_access_log(w, r, llhttp_method_name(r->method), r->status, c ? c->remote : "-");
  if (!c) {
    wxd__http_req_free(r);
    return;
  }
  if (c->closing) return;
  if (!r->keep_alive) {
    c->close_after_write = 1;
    if (c->writes_pending == 0) wxd__http_conn_close(c);
    return;
  }
  c->state = CONN_IDLE;
  wxd_scan_head(&c->scan, 1);
  conn_set_timer(c, w->cfg->limits.keepalive_timeout_ms);
  if (c->tls) wxd_tls_trim(c->tls);
  if (conn_unsent(c) > OUTPUT_HIGH_WATER) conn_hold_output(c);
  /* Inside conn_process, its loop goes on with the queued bytes. */
  if (!c->in_process) wxd__http_conn_continue(c);
}

/* An idle connection takes up its queued requests, then reads again. */
static void wxd__http_conn_continue(wxd_conn_t *c) {
  if (c->closing || c->output_wait || c->state == CONN_HANDLING) return;
  process_queued(c);
  if (c->closing || c->output_wait || c->state == CONN_HANDLING) return;
  if (c->peer_eof || (c->w->draining && c->state == CONN_IDLE)) {
    /* Nothing more will come (whatever is left in `in` is an incomplete
     * request), or we are shutting down: close once the responses are
     * written. */
    c->close_after_write = 1;
    if (c->writes_pending == 0) wxd__http_conn_close(c);
    return;
  }
  conn_start_reading(c);
}

/* ---- reading ---- */

static void conn_process(wxd_conn_t *c, const char *data, size_t len) {
  c->in_process++;
  while (len > 0 && !c->closing && !c->discard_input && !c->output_wait && c->state != CONN_HANDLING) {
    if (c->state == CONN_IDLE) {
      c->state = CONN_READING;
      conn_set_timer(c, c->w->cfg->limits.header_timeout_ms);
    }
    size_t chunk = len;
    if (c->scan.mode != WXD_SCAN_OFF) {
      /* Raw bytes exceed what the callbacks count (delimiters, spaces): the
       * slack keeps a head the callbacks accept from being refused here. */
      size_t raw_max = 2 * c->w->cfg->limits.max_header_bytes + 1024;
      int refused = wxd_scan(&c->scan, data, len, raw_max, &chunk);
      if (refused == WXD_SCAN_MALFORMED) {
        wxd__http_conn_fail(c, 400, "bad request");
        break;
      } else if (refused == WXD_SCAN_CHUNK_LINE_LONG) {
        wxd__http_conn_fail(c, 413, "chunk line too long");
        break;
      } else if (refused == WXD_SCAN_BODY_TOO_LARGE) {
        wxd__http_conn_fail(c, 413, "request body too large");
        break;
      } else if (refused) {
        wxd__http_conn_fail(c, 431, "request header fields too large");
        break;
      }
    }
    llhttp_errno_t e = llhttp_execute(&c->parser, data, chunk);
    if (e == HPE_PAUSED || e == HPE_PAUSED_UPGRADE) {
      size_t used = (size_t)(llhttp_get_error_pos(&c->parser) - data);
      /* llhttp would refuse the next request after a Proxy-Connection:
       * close we ignore: start it afresh instead. */
      if (e == HPE_PAUSED && c->req->wants_keep_alive && !llhttp_should_keep_alive(&c->parser))
        llhttp_reset(&c->parser);
      else if (e == HPE_PAUSED) llhttp_resume(&c->parser);
      else llhttp_resume_after_upgrade(&c->parser);
      data += used;
      len -= used;
      wxd__http_dispatch(c);
      continue;
    }
    if (e != HPE_OK) {
      wxd__http_conn_fail(c, c->err_status ? c->err_status : 400,
                c->err_status ? c->err_msg : "bad request");
      break;
    }
    data += chunk;
    len -= chunk;
  }
  if (len > 0 && !c->closing && !c->discard_input) {
    if (wxd_buf_append(&c->in, data, len) != 0) wxd__http_conn_close(c);
    /* A client pipelining faster than we answer: stop reading until the
     * queue is worked off. */
    else if (c->in.len > IN_QUEUE_MAX) conn_stop_reading(c);
  }
  c->in_process--;
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
  (void)hint;
  wxd_conn_t *c = h->data;
  wxd_worker_t *w = c->w;
  /* Idle connections hold no read buffer: every read of this loop lands in
   * the worker's buffer and is consumed (or copied) before the next. */
  if (!w->readbuf_busy) {
    w->readbuf_busy = 1;
    *buf = uv_buf_init(w->readbuf, (unsigned)w->readbuf_size);
  } else {
    char *p = malloc(16384);
    *buf = uv_buf_init(p, p ? 16384 : 0);
  }
}

/* Bytes of the request stream (plaintext, after TLS when there is TLS). */
static void conn_input(wxd_conn_t *c, const char *data, size_t len) {
  if (c->state == CONN_HANDLING || c->in.len > 0 || c->output_wait) {
    if (!c->discard_input && wxd_buf_append(&c->in, data, len) != 0) wxd__http_conn_close(c);
    else if (c->state != CONN_HANDLING && !c->output_wait) process_queued(c);
    else if (c->in.len > IN_QUEUE_MAX) conn_stop_reading(c);
  } else if (!c->discard_input) {
    conn_process(c, data, len);
  }
}

/* The client sent all it will (TCP EOF, or TLS close_notify). */
static void conn_input_end(wxd_conn_t *c) {
  conn_stop_reading(c);
  if (c->state == CONN_HANDLING || c->in.len > 0 || c->writes_pending > 0) {
    /* Half-close: answer the requests that are complete, finish writing,
     * then close. */
    c->peer_eof = 1;
    if (c->state == CONN_IDLE && c->in.len == 0) {
      c->close_after_write = 1;
      if (c->writes_pending == 0) wxd__http_conn_close(c);
    }
  } else {
    /* Nothing to answer, or EOF in the middle of a request that cannot
     * complete. */
    wxd__http_conn_close(c);
  }
}

static void tls_log_failure(wxd_conn_t *c, const char *when) {
  char extra[512], esc[256];
  const char *why = wxd_tls_error(c->tls);
  size_t el = wxd_json_escape(esc, sizeof esc, why, strlen(why));
  snprintf(extra, sizeof extra, "\"remote\":\"%s\",\"error\":\"%.*s\"", c->remote, (int)el, esc);
  /* Scanners and clients speaking plain HTTP to this port are routine:
   * debug, not noise in the error log. */
  wxd_log(WXD_LOG_DEBUG, c->w->id, when, extra);
}

/* Ciphertext arrived: advance the handshake, then decrypt every complete
 * record into the request stream. */
static void tls_input(wxd_conn_t *c, const char *data, size_t len) {
  if (wxd_tls_feed(c->tls, data, len) != 0) {
    wxd__http_conn_close(c);
    return;
  }
  if (!c->tls_done) {
    int rc = wxd_tls_handshake(c->tls);
    /* The alert of a failed handshake goes out too. */
    if (wxd__http_tls_send(c) != 0) return;
    if (rc == WXD_TLS_AGAIN) return;
    if (rc != WXD_TLS_OK) {
      tls_log_failure(c, "tls handshake failed");
      c->tls_failed = 1;
      c->close_after_write = 1;
      c->discard_input = 1;
      if (c->writes_pending == 0) wxd__http_conn_close(c);
      return;
    }
    c->tls_done = 1;
    c->tls_info = wxd_tls_info_new(c->tls);
    if (!c->tls_info) {
      wxd__http_conn_close(c);
      return;
    }
  }
  char plain[16384];
  while (!c->closing && !c->discard_input) {
    size_t n = 0;
    int rc = wxd_tls_read(c->tls, plain, sizeof plain, &n);
    if (rc == WXD_TLS_OK) {
      conn_input(c, plain, n);
      continue;
    }
    /* Reads may produce records of their own (alerts, key updates). */
    if (wxd__http_tls_send(c) != 0) return;
    if (rc == WXD_TLS_AGAIN) return;
    if (rc == WXD_TLS_CLOSED) {
      conn_input_end(c);
      return;
    }
    tls_log_failure(c, "tls error");
    c->tls_failed = 1;
    wxd__http_conn_close(c);
    return;
  }
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  wxd_conn_t *c = s->data;
  wxd_worker_t *w = c->w;
  if (nread > 0) {
    if (c->tls) {
      if (!c->discard_input) tls_input(c, buf->base, (size_t)nread);
    } else {
      conn_input(c, buf->base, (size_t)nread);
    }
  } else if (nread == UV_EOF) {
    /* On TLS, an EOF without close_notify: the HTTP framing tells whether
     * a request was cut (then closed unanswered), like on plain HTTP. */
    conn_input_end(c);
  } else if (nread < 0) {
    wxd__http_conn_close(c);
  }
  if (buf->base == w->readbuf) w->readbuf_busy = 0;
  else free(buf->base);
}

/* ---- connection lifetime ---- */

static void on_conn_handle_closed(uv_handle_t *h) {
  wxd_conn_t *c = h->data;
  if (--c->handles_open > 0) return;
  wxd_worker_t *w = c->w;
  if (c->prev) c->prev->next = c->next;
  else w->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  w->nconns--;
  atomic_fetch_sub_explicit(&w->stats.connections, 1, memory_order_relaxed);
  wxd_buf_free(&c->in);
  if (c->was_held) w->trim_wanted = 1;
  wxd_tls_free(c->tls); /* drops its reference to the SSL_CTX */
  free(c->tls_info);
  free(c);
  if (w->draining && w->nconns == 0) uv_async_send(&w->stop_async); /* re-check shutdown */
}

static void wxd__http_conn_close(wxd_conn_t *c) {
  if (c->closing) return;
  c->closing = 1;
  wxd__http_conn_stop_timer(c);
  wxd__http_conn_release_output(c);
  wxd_req_t *r = c->req;
  c->req = NULL;
  /* No close_notify after a streamed response cut short: for an HTTP/1.0
   * (close-delimited) stream it would make the truncated body look whole. */
  int cut = r && r->streaming && !r->finished;
  if (r) {
    if (r->in_handler) {
      /* The handler still runs (or is writing its response right now): it
       * finishes on its own and frees r. */
      r->conn = NULL;
      if (r->drain_wait && r->co) {
        r->drain_wait = 0;
        lua_State *T = r->co->T;
        lua_pushnil(T);
        lua_pushliteral(T, "closed");
        wxd_co_resume(r->co, 2);
      }
    } else {
      wxd__http_req_free(r);
    }
  }
  if (c->tls && c->tls_done && !c->tls_failed && !cut && c->writes_pending == 0) {
    /* A clean end for the client: close_notify, best effort (a socket
     * that would block gets none). */
    wxd_tls_shutdown(c->tls);
    char alert[128];
    uv_buf_t b = uv_buf_init(alert, (unsigned)wxd_tls_take(c->tls, alert, sizeof alert));
    if (b.len) uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
  }
  uv_close((uv_handle_t *)&c->tcp, on_conn_handle_closed);
}

static void accept_conn(uv_stream_t *server, int status, int tls) {
  wxd_worker_t *w = server->data;
  if (status < 0 || w->draining) return;
  wxd_conn_t *c = calloc(1, sizeof *c);
  if (!c) return;
  c->w = w;
  uv_tcp_init(&w->loop, &c->tcp);
  c->tcp.data = c;
  c->handles_open = 1;
  c->next = w->conns;
  if (w->conns) w->conns->prev = c;
  w->conns = c;
  w->nconns++;
  atomic_fetch_add_explicit(&w->stats.connections, 1, memory_order_relaxed);
  if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
    wxd__http_conn_close(c);
    return;
  }
  if (tls && !(c->tls = wxd_tls_new_server(w->tls_ctx))) {
    wxd__http_conn_close(c);
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  struct sockaddr_storage ss;
  int sl = sizeof ss;
  strcpy(c->remote, "-");
  if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &sl) == 0) {
    if (ss.ss_family == AF_INET) {
      struct sockaddr_in *a = (struct sockaddr_in *)&ss;
      uv_ip4_name(a, c->remote, sizeof c->remote);
      c->remote_port = ntohs(a->sin_port);
    } else if (ss.ss_family == AF_INET6) {
      struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
      uv_ip6_name(a, c->remote, sizeof c->remote);
      c->remote_port = ntohs(a->sin6_port);
    }
  }
  llhttp_init(&c->parser, HTTP_REQUEST, &parser_settings);
  c->parser.data = c;
  wxd_scan_head(&c->scan, 1);
  c->state = CONN_IDLE;
  /* Until the first byte, a new connection gets the header timeout: an
   * opened-and-silent socket is the first step of slowloris. On HTTPS it
   * covers the handshake: the timer is reset by the first byte of a
   * request, not by handshake bytes. */
  conn_set_timer(c, w->cfg->limits.header_timeout_ms);
  conn_start_reading(c);
}

void wxd_http_on_connection(uv_stream_t *server, int status) { accept_conn(server, status, 0); }

void wxd_http_on_tls_connection(uv_stream_t *server, int status) { accept_conn(server, status, 1); }

void wxd_http_drain(wxd_worker_t *w) {
  wxd_conn_t *c = w->conns;
  while (c) {
    wxd_conn_t *next = c->next;
    if (c->state == CONN_IDLE && c->writes_pending == 0) wxd__http_conn_close(c);
    else if (c->req) c->req->keep_alive = 0;
    c = next;
  }
}

void wxd_http_close_all(wxd_worker_t *w) {
  wxd_conn_t *c = w->conns;
  while (c) {
    wxd_conn_t *next = c->next;
    wxd__http_conn_close(c);
    c = next;
  }
}

/* ---- Lua: response streaming ---- */

static void wxd__http_maybe_resume_streamer(wxd_conn_t *c) {
  wxd_req_t *r = c->req;
  if (!r || !r->drain_wait || !r->co) return;
  if (uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) > OUTPUT_LOW_WATER) return;
  r->drain_wait = 0;
  lua_pushboolean(r->co->T, 1);
  wxd_co_resume(r->co, 1);
}

/* wxd.core.http.write(chunk, status, headers): sends the status line and
 * headers on the first call, then chunk after chunk (chunked encoding, or
 * close-delimited for HTTP/1.0). Waits when the client reads slowly.
 * Returns true, or nil, "closed". */
static int http_write(lua_State *L) {
  size_t len;
  const char *chunk = luaL_checklstring(L, 1, &len);
  wxd_co_t *co = wxd_co_lookup(L);
  if (!co || co->kind != WXD_CO_REQUEST) return luaL_error(L, "response write: not in a request handler");
  wxd_req_t *r = co->data;
  wxd_conn_t *c = r->conn;
  if (!c || c->closing) {
    lua_pushnil(L);
    lua_pushliteral(L, "closed");
    return 2;
  }
  if (!r->streaming) {
    int status = (int)luaL_optinteger(L, 2, 200);
    if (status < 200 || status > 999) return luaL_argerror(L, 2, "status must be in 200..999");
    if (!lua_isnoneornil(L, 3)) luaL_checktype(L, 3, LUA_TTABLE);
    wxd_buf_t *o = &r->w->out;
    int has_date = 0, has_server = 0;
    const char *why = NULL;
    wxd__http_start_head(o, status);
    if (append_lua_headers(L, 3, o, &has_date, &has_server, &why) != 0)
      return luaL_error(L, "response write: %s", why);
    r->stream_nobody = r->is_head || !status_has_body(status);
    r->stream_raw = r->http_minor == 0 && !r->stream_nobody;
    if (r->stream_raw) r->keep_alive = 0;
    else if (status_has_body(status)) wxd_buf_append(o, "Transfer-Encoding: chunked\r\n", 28);
    wxd__http_end_head(r->w, o, has_date, has_server, r->keep_alive);
    r->status = status;
    r->streaming = 1;
    r->bytes_out += o->len;
    if (conn_write(c, o->data, o->len) != 0) {
      lua_pushnil(L);
      lua_pushliteral(L, "closed");
      return 2;
    }
  }
  if (len > 0 && !r->stream_nobody) {
    int rc;
    if (r->stream_raw) {
      rc = conn_write(c, chunk, len);
    } else {
      char sz[32];
      int sl = snprintf(sz, sizeof sz, "%zx\r\n", len);
      uv_buf_t b[3] = {uv_buf_init(sz, (unsigned)sl), uv_buf_init((char *)chunk, (unsigned)len),
                       uv_buf_init("\r\n", 2)};
      rc = wxd__http_conn_writev(c, b, 3);
    }
    if (rc != 0) {
      lua_pushnil(L);
      lua_pushliteral(L, "closed");
      return 2;
    }
    r->bytes_out += len;
  }
  /* Waits for the client only where the coroutine can yield (not inside a
   * string.gsub callback, say): the bytes are queued either way. */
  if (uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) > OUTPUT_HIGH_WATER && lua_isyieldable(L)) {
    r->drain_wait = 1;
    return wxd_co_yield(co, L, 0);
  }
  lua_pushboolean(L, 1);
  return 1;
}

int wxd_open_http_lua(lua_State *L) {
  static const luaL_Reg fns[] = {{"write", http_write}, {NULL, NULL}};
  lua_createtable(L, 0, 1);
  luaL_register(L, NULL, fns);
  return 1;
}
