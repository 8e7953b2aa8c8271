/* http: see http.h. This file owns a connection's life: accepting, reading
 * (TLS input included), parsing with llhttp, timeouts and closing;
 * httpout.c writes, httplua.c runs the handler (see http_internal.h).
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
#include "http_internal.h"

#include <malloc.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>

#include "log.h"
#include "metrics.h"

#define IN_QUEUE_MAX (256 * 1024)   /* unparsed bytes queued while handling */

/* The byte-level checks llhttp 8.1 lacks live in httpscan.c (shared with
 * the client): every byte of a request head and of a chunked body's framing
 * goes through them before llhttp sees it. */

static llhttp_settings_t parser_settings;
static void conn_process(wxd_conn_t *c, const char *data, size_t len);

/* ---- requests ---- */

static wxd_req_t *req_new(wxd_conn_t *c) {
  wxd_req_t *r = calloc(1, sizeof *r);
  if (!r) return NULL;
  r->conn = c;
  r->w = c->w;
  wxd_hdrs_init(&r->hdrs, r->hdr_slots, MAX_HEADERS);
  return r;
}

static void req_reset(wxd_req_t *r) {
  r->head.len = 0;
  r->body.len = 0;
  r->url_len = 0;
  wxd_hdrs_reset(&r->hdrs, r->w->cfg->limits.max_header_bytes);
  r->in_trailers = 0;
  r->keep_alive = r->is_head = r->has_te = r->streaming = r->stream_raw = r->stream_nobody = 0;
  r->stream_sized = 0;
  r->stream_left = 0;
  r->drain_wait = r->finished = 0;
  r->conn_close = r->conn_keep_alive = r->wants_keep_alive = 0;
  r->host_count = 0;
  r->te_count = 0;
  r->rid_idx = r->tp_idx = -1;
  r->status = 0;
  r->bytes_out = 0;
  r->route_len = 0;
  r->trace_pending = r->trace_drawn = 0;
  r->trace.trace_id[0] = 0;
  r->start_ns = uv_hrtime();
}

void wxd__http_req_free(wxd_req_t *r) {
  wxd__http_file_release(r);
  wxd_buf_free(&r->head);
  wxd_buf_free(&r->body);
  free(r);
}

static int find_header(wxd_req_t *r, const char *name) { return wxd_hdrs_find(&r->hdrs, &r->head, name, strlen(name)); }

static const char *req_header(wxd_req_t *r, const char *name, size_t *len) {
  int i = find_header(r, name);
  if (i < 0) return NULL;
  *len = r->hdrs.v[i].value_len;
  return r->head.data + r->hdrs.v[i].value_off;
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

/* The request target, header fields and trailers all count against
 * max_header_bytes. */
static int count_header_bytes(wxd_conn_t *c, size_t n) { return wxd_hdrs_count(&c->req->hdrs, n); }

/* A collector's error as the response it gets. */
static int hdrs_fail(wxd_conn_t *c, int e) {
  if (e == WXD_HDRS_TOO_MANY) FAIL(c, 431, "too many header fields");
  if (e == WXD_HDRS_TOO_LARGE) FAIL(c, 431, "request header fields too large");
  FAIL(c, 500, "out of memory");
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
  int e = wxd_hdrs_name(&r->hdrs, &r->head, at, len);
  return e ? hdrs_fail(c, e) : 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len) {
  wxd_conn_t *c = p->data;
  wxd_req_t *r = c->req;
  if (r->in_trailers) {
    if (count_header_bytes(c, len)) FAIL(c, 431, "request header fields too large");
    return 0;
  }
  int e = wxd_hdrs_value(&r->hdrs, &r->head, at, len);
  return e ? hdrs_fail(c, e) : 0;
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
  if (r->in_trailers || r->hdrs.n == 0) return 0;
  wxd_hdrs_value_done(&r->hdrs, &r->head);
  wxd_hdr_t *h = &r->hdrs.v[r->hdrs.n - 1];
  const char *name = r->head.data + h->name_off;
  if (h->name_len == 17 && memcmp(name, "transfer-encoding", 17) == 0) {
    r->has_te = 1;
    r->te_count++;
  }
  else if (h->name_len == 4 && memcmp(name, "host", 4) == 0) r->host_count++;
  /* The trace context reads these two per request: found here, no lookup later. */
  else if (h->name_len == 12 && r->rid_idx < 0 && memcmp(name, "x-request-id", 12) == 0) r->rid_idx = (int)r->hdrs.n - 1;
  else if (h->name_len == 11 && r->tp_idx < 0 && memcmp(name, "traceparent", 11) == 0) r->tp_idx = (int)r->hdrs.n - 1;
  else if (h->name_len == 10 && memcmp(name, "connection", 10) == 0)
    note_connection_options(r, r->head.data + h->value_off, h->value_len);
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
  int add_host = host_idx < 0;
  if (add_host) {
    int e = wxd_hdrs_push(&r->hdrs);
    if (e) return hdrs_fail(c, e);
    host_idx = (int)r->hdrs.n - 1;
  }
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
  for (unsigned i = 0; i < r->hdrs.n; i++) {
    r->hdrs.v[i].name_off -= (uint32_t)skip;
    if (r->hdrs.v[i].value_len) r->hdrs.v[i].value_off -= (uint32_t)skip;
  }
  r->head.len -= skip;
  r->url_len -= (uint32_t)skip;
  host_off -= skip;
  if (add_host) {
    r->hdrs.v[host_idx].name_off = (uint32_t)host_off;
    r->hdrs.v[host_idx].name_len = 4;
  }
  r->hdrs.v[host_idx].value_off = (uint32_t)(host_off + 4);
  r->hdrs.v[host_idx].value_len = (uint32_t)alen;
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
    size_t tl = 0;
    const char *te = req_header(r, "transfer-encoding", &tl);
    while (tl && (te[0] == ' ' || te[0] == '\t')) te++, tl--;
    while (tl && (te[tl - 1] == ' ' || te[tl - 1] == '\t')) tl--;
    if (r->te_count > 1) FAIL(c, 400, "repeated Transfer-Encoding");
    if (!te || tl != 7 || strncasecmp(te, "chunked", 7) != 0) FAIL(c, 501, "transfer coding not supported");
  }
  if (r->http_minor == 1 && r->host_count != 1) FAIL(c, 400, "missing or repeated Host");
  if (r->host_count > 1) FAIL(c, 400, "repeated Host");
  int host_idx = find_header(r, "host");
  if (host_idx >= 0) {
    /* Checked even when an absolute-form target replaces it, as nginx
     * does; the app gets it without surrounding whitespace. */
    wxd_hdr_t *h = &r->hdrs.v[host_idx];
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
  /* A route may have its own limit, larger or smaller: known before a
   * byte of the body is read (and before a 100 Continue). */
  r->max_body = has_body ? wxd__http_body_limit(r, lim->max_body_bytes) : lim->max_body_bytes;
  if (r->has_te) wxd_scan_chunked(&c->scan, r->max_body);
  if ((p->flags & F_CONTENT_LENGTH) && p->content_length > r->max_body)
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
  if (r->body.len + len > r->max_body) FAIL(c, 413, "request body too large");
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

void wxd__http_conn_stop_timer(wxd_conn_t *c) { c->deadline = 0; }

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
    } else if (c->ws) {
      wxd__ws_sweep(c, now);
    } else if (c->deadline && now >= c->deadline) {
      c->deadline = 0;
      if (c->state == CONN_READING) wxd__http_conn_fail(c, 408, "request timeout");
      else if (c->state == CONN_IDLE && c->writes_pending) conn_set_timer(c, c->w->cfg->limits.keepalive_timeout_ms);
      else if (c->state == CONN_IDLE) wxd__http_conn_close(c);
    }
    c = next;
  }
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

void wxd__http_conn_start_reading(wxd_conn_t *c) {
  if (c->reading || c->closing || c->peer_eof || c->output_wait) return;
  if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0) c->reading = 1;
}

void wxd__http_conn_stop_reading(wxd_conn_t *c) {
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
  wxd__http_conn_stop_reading(c);
}

void wxd__http_conn_release_output(wxd_conn_t *c) {
  if (!c->output_wait) return;
  c->output_wait = 0;
  atomic_fetch_sub_explicit(&c->w->stats.paused_for_output, 1, memory_order_relaxed);
}

void wxd__http_req_finish(wxd_req_t *r) {
  wxd_conn_t *c = r->conn; /* NULL when the connection broke meanwhile */
  wxd_worker_t *w = r->w;
  r->finished = 1;
  r->in_handler = 0;
  wxd__http_file_release(r);
  wxd__http_in_flight(w, -1);
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
void wxd__http_conn_continue(wxd_conn_t *c) {
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
  wxd__http_conn_start_reading(c);
}

/* ---- reading ---- */

static void conn_process(wxd_conn_t *c, const char *data, size_t len) {
  c->in_process++;
  while (len > 0 && !c->closing && !c->discard_input && !c->output_wait && c->state != CONN_HANDLING && !c->ws) {
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
  if (len > 0 && c->ws && !c->closing) {
    /* The handler upgraded to a WebSocket: what follows the handshake is
     * frames. */
    wxd__ws_input(c, data, len);
  } else if (len > 0 && !c->closing && !c->discard_input) {
    if (wxd_buf_append(&c->in, data, len) != 0) wxd__http_conn_close(c);
    /* A client pipelining faster than we answer: stop reading until the
     * queue is worked off. */
    else if (c->in.len > IN_QUEUE_MAX) wxd__http_conn_stop_reading(c);
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
  if (c->ws) {
    wxd__ws_input(c, data, len);
    return;
  }
  if (c->state == CONN_HANDLING || c->in.len > 0 || c->output_wait) {
    if (!c->discard_input && wxd_buf_append(&c->in, data, len) != 0) wxd__http_conn_close(c);
    else if (c->state != CONN_HANDLING && !c->output_wait) process_queued(c);
    else if (c->in.len > IN_QUEUE_MAX) wxd__http_conn_stop_reading(c);
  } else if (!c->discard_input) {
    conn_process(c, data, len);
  }
}

/* The client sent all it will (TCP EOF, or TLS close_notify). */
static void conn_input_end(wxd_conn_t *c) {
  wxd__http_conn_stop_reading(c);
  if (c->ws) {
    wxd__ws_input_end(c);
    return;
  }
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
  if (c->ws) wxd__ws_conn_closed(c);
  wxd_buf_free(&c->in);
  if (c->was_held) w->trim_wanted = 1;
  wxd_tls_free(c->tls); /* drops its reference to the SSL_CTX */
  free(c->tls_info);
  free(c);
  if (w->draining && w->nconns == 0) uv_async_send(&w->stop_async); /* re-check shutdown */
}

void wxd__http_conn_close(wxd_conn_t *c) {
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
  if (c->ws) wxd__ws_conn_closing(c);
  uv_close((uv_handle_t *)&c->tcp, on_conn_handle_closed);
}

/* A new connection: accepted from server, or (server NULL) the socket fd
 * another worker's listener had queued (wxd_http_adopt). */
static void accept_conn_from(wxd_worker_t *w, uv_stream_t *server, int fd, int tls) {
  wxd_conn_t *c = calloc(1, sizeof *c);
  if (!c) {
    if (fd >= 0) close(fd);
    return;
  }
  c->w = w;
  uv_tcp_init(&w->loop, &c->tcp);
  c->tcp.data = c;
  c->handles_open = 1;
  c->next = w->conns;
  if (w->conns) w->conns->prev = c;
  w->conns = c;
  w->nconns++;
  atomic_fetch_add_explicit(&w->stats.connections, 1, memory_order_relaxed);
  if (server ? uv_accept(server, (uv_stream_t *)&c->tcp) != 0 : uv_tcp_open(&c->tcp, fd) != 0) {
    if (!server) close(fd);
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
  wxd__http_conn_start_reading(c);
}

static void accept_conn(uv_stream_t *server, int status, int tls) {
  wxd_worker_t *w = server->data;
  if (status < 0 || w->draining) return;
  accept_conn_from(w, server, -1, tls);
}

void wxd_http_adopt(wxd_worker_t *w, int fd, int tls) {
  if (w->draining) {
    close(fd);
    return;
  }
  accept_conn_from(w, NULL, fd, tls);
}

void wxd_http_on_connection(uv_stream_t *server, int status) { accept_conn(server, status, 0); }

void wxd_http_on_tls_connection(uv_stream_t *server, int status) { accept_conn(server, status, 1); }

void wxd_http_drain(wxd_worker_t *w) {
  /* Handing over to a successor (restart.c), a connection that has not
   * sent its first request yet is one the client just opened to us, its
   * request likely in flight: it is answered (with Connection: close), not
   * reset; the header timeout and the shutdown deadline bound a silent one. */
  int handover = w->srv->handed_over != 0;
  wxd_conn_t *c = w->conns;
  while (c) {
    wxd_conn_t *next = c->next;
    if (c->ws) wxd__ws_drain(c);
    else if (handover && c->nreq == 0 && c->state == CONN_IDLE) { /* answered: see above */ }
    else if (c->state == CONN_IDLE && c->writes_pending == 0) wxd__http_conn_close(c);
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
