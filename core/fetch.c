/* fetch: see fetch.h (and fetch_internal.h for its parts). This file: a
 * request's life and exchange, and the Lua module wxd.core.fetch.
 *
 * Life of a request:
 *   ACQUIRE  take a parked connection of its host, or open a new one when
 *            the host has fewer than max_conns, or wait in the host's queue
 *   RESOLVE  the DNS cache, or one uv_getaddrinfo shared by every request
 *            for that name; each answer is tried in turn
 *   CONNECT  uv_tcp_connect, then the TLS handshake for HTTPS
 *   SEND     the request bytes (head and body, built by lua/wxd/http.lua)
 *   READ     the response, through the scanner and llhttp
 * and then the connection is parked (keep-alive) or closed. Deadlines: the
 * connect timeout covers ACQUIRE to the end of CONNECT, send the writing,
 * read the silence between two reads, total everything; one uv_timer per
 * request is armed for the nearest.
 *
 * A request fails with a kind and a detail. Every failure is reported from
 * the request's own zero-delay timer, never from the code that found it:
 * failures found while the coroutine has not yielded yet, or while another
 * request's callback walks a queue, must not resume Lua there.
 */
#include "fetch_internal.h"

#include <fcntl.h>
#include <lauxlib.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const kind_names[] = {"", "timeout", "connect", "tls", "dns", "protocol", "too_large", "cancelled"};

static void on_timer(uv_timer_t *t);

static void host_label(const fetch_host_t *h, char *out, size_t len) {
  snprintf(out, len, strchr(h->name, ':') ? "[%s]:%d" : "%s:%d", h->name, h->port);
}

/* ---- requests: lifetime ---- */

static void req_maybe_free(fetch_req_t *r) {
  if (!r->done || r->handles > 0) return;
  wxd_fetch_pool_t *p = r->pool;
  if (r->prev) r->prev->next = r->next;
  else p->reqs = r->next;
  if (r->next) r->next->prev = r->prev;
  p->nreqs--;
  wxd_buf_free(&r->head);
  wxd_buf_free(&r->body);
  wxd_hdrs_free(&r->hdrs);
  free(r->out);
  free(r);
}

static void on_timer_closed(uv_handle_t *h) {
  fetch_req_t *r = h->data;
  r->handles--;
  req_maybe_free(r);
}

static void on_tcp_closed(uv_handle_t *h) {
  fetch_req_t *r = h->data;
  r->handles--;
  r->tcp_state = SK_NONE;
  int next = r->after_close;
  r->after_close = AC_NONE;
  if (!r->failed && !r->done) {
    if (next == AC_CONNECT) wxd__fetch_req_connect(r);
    else if (next == AC_RETRY) wxd__fetch_req_resolve(r);
  }
  req_maybe_free(r);
}

static void tcp_close(fetch_req_t *r, int then) {
  if (r->tcp_state != SK_OPEN) return;
  r->tcp_state = SK_CLOSING;
  r->after_close = then;
  uv_close((uv_handle_t *)&r->tcp, on_tcp_closed);
}

/* The request gives its connection back: parked when `park` and the
 * socket can be kept, else closed. */
static void req_release_conn(fetch_req_t *r, int park) {
  fetch_conn_t *c = r->conn;
  if (!c) return;
  r->conn = NULL;
  if (park && r->tcp_state == SK_OPEN) {
    /* The handle closes its own descriptor; the connection keeps a
     * duplicate, with no handle, until a request takes it again. */
    uv_os_fd_t fd;
    if (uv_fileno((uv_handle_t *)&r->tcp, &fd) == 0) c->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  }
  tcp_close(r, AC_NONE);
  if (park && c->fd >= 0) wxd__fetch_conn_park(c);
  else wxd__fetch_conn_destroy(c, 1);
}

static void req_arm(fetch_req_t *r) {
  uint64_t now = now_ms(r->pool), at = r->total_at;
  if (r->phase_at && r->phase_at < at) at = r->phase_at;
  uv_timer_start(&r->timer, on_timer, at > now ? at - now : 0, 0);
}

static void req_phase(fetch_req_t *r, int phase, uint64_t ms) {
  r->phase = phase;
  r->phase_at = now_ms(r->pool) + ms;
  req_arm(r);
}

/* Records the failure and lets go of everything but the timer, which then
 * reports it (see the top of this file). Idempotent. */
void wxd__fetch_req_fail(fetch_req_t *r, int kind, const char *fmt, ...) {
  if (r->failed || r->done) return;
  r->failed = 1;
  r->kind = kind;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(r->detail, sizeof r->detail, fmt, ap);
  va_end(ap);
  wxd__fetch_queue_unlink(r);
  wxd__fetch_dns_unlink_waiter(r);
  req_release_conn(r, 0);
  tcp_close(r, AC_NONE);
  uv_timer_start(&r->timer, on_timer, 0, 0);
}

/* Ends the request: the connection is already released or closed; the
 * coroutine (if any) is resumed last, so that nothing here runs after Lua
 * did. */
static void req_finish(fetch_req_t *r) {
  if (r->done) return;
  r->done = 1;
  r->pool->nactive--;
  wxd__fetch_queue_unlink(r);
  wxd__fetch_dns_unlink_waiter(r);
  req_release_conn(r, 0);
  tcp_close(r, AC_NONE);
  uv_timer_stop(&r->timer);
  uv_close((uv_handle_t *)&r->timer, on_timer_closed);
  fetch_host_t *h = r->host;
  r->host = NULL;
  h->refs--;
  wxd__fetch_host_maybe_free(h);
  wxd_co_t *co = r->co;
  r->co = NULL;
  if (!co) return; /* cancelled */
  lua_State *T = co->T;
  if (r->failed) {
    lua_pushnil(T);
    lua_pushstring(T, kind_names[r->kind]);
    lua_pushstring(T, r->detail);
    wxd_co_resume(co, 3);
  } else {
    wxd__fetch_push_response(r, T);
    wxd_co_resume(co, 1);
  }
}

/* The response is complete: keep the connection if both sides allow it. */
static void req_complete(fetch_req_t *r) {
  if (r->failed || r->done) return;
  /* A request still being written (an early answer) would leave half a
   * request on the connection. */
  int keep = r->keepalive && !r->leftover && r->sent && r->writes_pending == 0 &&
             llhttp_should_keep_alive(&r->parser) && !llhttp_message_needs_eof(&r->parser);
  if (r->tcp_state == SK_OPEN) uv_read_stop((uv_stream_t *)&r->tcp);
  req_release_conn(r, keep);
  req_finish(r);
}

static void on_timer(uv_timer_t *t) {
  fetch_req_t *r = t->data;
  if (r->done) return;
  if (r->failed) {
    req_finish(r);
    return;
  }
  uint64_t now = now_ms(r->pool);
  char where[300];
  host_label(r->host, where, sizeof where);
  if (r->phase_at && now >= r->phase_at && r->phase_at <= r->total_at) {
    if (r->phase == P_CONNECT)
      wxd__fetch_req_fail(r, K_TIMEOUT, "connect timeout (%g s) %s %s", (double)r->connect_ms / 1000,
               r->queued ? "waiting for a free connection to" : "connecting to", where);
    else if (r->phase == P_SEND)
      wxd__fetch_req_fail(r, K_TIMEOUT, "send timeout (%g s) writing to %s", (double)r->send_ms / 1000, where);
    else
      wxd__fetch_req_fail(r, K_TIMEOUT, "read timeout (%g s) reading from %s", (double)r->read_ms / 1000, where);
  } else if (now >= r->total_at) {
    wxd__fetch_req_fail(r, K_TIMEOUT, "total timeout (%g s) for %s", (double)r->total_ms / 1000, where);
  } else {
    req_arm(r); /* early: the loop's clock was behind */
    return;
  }
  req_finish(r);
}

/* ---- requests: the exchange ---- */

/* A failure on a connection taken from the pool before any byte of the
 * response: the peer closed it while we reused it. An idempotent request
 * is sent once more on a new connection. Returns 1 when it is. */
static int req_retry(fetch_req_t *r) {
  if (!r->reused || r->got_bytes || r->retried || !r->idempotent || r->failed || r->done) return 0;
  r->retried = 1;
  r->reused = 0;
  r->tls_ready = 0;
  r->sent = 0;
  /* writes_pending drops to 0 as the closing socket cancels its writes,
   * before its close callback connects again. */
  fetch_conn_t *c = r->conn;
  wxd_tls_free(c->tls); /* the connection keeps its slot, with a new socket */
  c->tls = NULL;
  llhttp_init(&r->parser, HTTP_RESPONSE, &wxd__fetch_parser_settings);
  r->parser.data = r;
  wxd_scan_head(&r->scan, 0);
  wxd__fetch_resp_reset(r);
  req_phase(r, P_CONNECT, r->connect_ms);
  tcp_close(r, AC_RETRY);
  return 1;
}

static void io_fail(fetch_req_t *r, int err, const char *doing) {
  if (req_retry(r)) return;
  char where[300];
  host_label(r->host, where, sizeof where);
  wxd__fetch_req_fail(r, K_CONNECT, "%s %s: %s", doing, where, uv_strerror(err));
}

/* The peer closed its side (or sent close_notify). */
static void req_eof(fetch_req_t *r) {
  if (!r->got_bytes && req_retry(r)) return;
  if (r->got_bytes) {
    llhttp_errno_t e = llhttp_finish(&r->parser);
    if (r->complete) {
      r->leftover = 1; /* nothing more can be sent on it */
      req_complete(r);
      return;
    }
    if (e != HPE_OK && e != HPE_PAUSED && r->cb_kind) {
      wxd__fetch_req_fail(r, r->cb_kind, "%s", r->cb_err);
      return;
    }
  }
  char where[300];
  host_label(r->host, where, sizeof where);
  if (!r->got_bytes) wxd__fetch_req_fail(r, K_PROTOCOL, "%s closed the connection without a response", where);
  else wxd__fetch_req_fail(r, K_PROTOCOL, "%s closed the connection before the response ended", where);
}

static void req_sent_some(fetch_req_t *r) {
  if (r->sent && r->writes_pending == 0 && r->phase == P_SEND) req_phase(r, P_READ, r->read_ms);
}

/* A write of the request ended (plain or TLS). */
static void req_write_done(fetch_req_t *r, int status) {
  r->writes_pending--;
  /* ECANCELED: we closed the socket (a retry); not the peer's doing. */
  if (r->done || r->failed || status == UV_ECANCELED) return;
  if (status < 0) {
    io_fail(r, status, "writing to");
    return;
  }
  req_sent_some(r);
}

static void on_tls_flushed(void *arg, int status) { req_write_done(arg, status); }

static int tls_flush(fetch_req_t *r) {
  int rc = wxd_tls_flush(r->conn->tls, (uv_stream_t *)&r->tcp, on_tls_flushed, r);
  if (rc < 0) {
    io_fail(r, rc, "writing to");
    return -1;
  }
  r->writes_pending += rc;
  return 0;
}

static void on_written(uv_write_t *w, int status) { req_write_done(w->data, status); }

/* The connection is ready: send the request. */
static void req_send(fetch_req_t *r) {
  req_phase(r, P_SEND, r->send_ms);
  if (r->conn->tls) {
    if (wxd_tls_write(r->conn->tls, r->out, r->out_len) != WXD_TLS_OK) {
      wxd__fetch_req_fail(r, K_TLS, "%s", wxd_tls_error(r->conn->tls));
      return;
    }
    r->sent = 1;
    tls_flush(r);
    return;
  }
  uv_buf_t b = uv_buf_init(r->out, (unsigned)r->out_len);
  r->write.data = r;
  int rc = uv_write(&r->write, (uv_stream_t *)&r->tcp, &b, 1, on_written);
  if (rc != 0) {
    io_fail(r, rc, "writing to");
    return;
  }
  r->writes_pending++;
  r->sent = 1;
}

/* Handshake, then decrypted bytes to the parser, until there is nothing
 * more to do with what arrived. */
static void tls_pump(fetch_req_t *r) {
  wxd_tls_t *t = r->conn->tls;
  if (!r->tls_ready) {
    int rc = wxd_tls_handshake(t);
    if (tls_flush(r) != 0) return;
    if (rc == WXD_TLS_AGAIN) return;
    if (rc != WXD_TLS_OK) {
      wxd__fetch_req_fail(r, K_TLS, "%s", wxd_tls_error(t));
      return;
    }
    r->tls_ready = 1;
    req_send(r);
    if (r->failed || r->tcp_state != SK_OPEN) return;
  }
  for (;;) {
    size_t n = 0;
    int rc = wxd_tls_read(t, r->pool->plainbuf, sizeof r->pool->plainbuf, &n);
    if (rc == WXD_TLS_OK) {
      int pr = wxd__fetch_req_parse(r, r->pool->plainbuf, n);
      if (pr < 0) return;
      if (pr > 0) {
        /* Anything after the response (but session tickets, which OpenSSL
         * consumes) makes the connection unfit for another request. */
        if (!r->leftover) {
          char probe[64];
          size_t m = 0;
          if (wxd_tls_read(t, probe, sizeof probe, &m) != WXD_TLS_AGAIN) r->leftover = 1;
        }
        if (wxd_tls_pending(t) && tls_flush(r) != 0) return;
        req_complete(r);
        return;
      }
      continue;
    }
    if (tls_flush(r) != 0) return;
    if (rc == WXD_TLS_AGAIN) return;
    if (rc == WXD_TLS_CLOSED) {
      req_eof(r);
      return;
    }
    if (!r->got_bytes && req_retry(r)) return;
    wxd__fetch_req_fail(r, K_TLS, "%s", wxd_tls_error(t));
    return;
  }
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
  (void)hint;
  fetch_req_t *r = h->data;
  wxd_fetch_pool_t *p = r->pool;
  if (!p->readbuf_busy) {
    p->readbuf_busy = 1;
    *buf = uv_buf_init(p->readbuf, sizeof p->readbuf);
  } else {
    char *b = malloc(16384);
    *buf = uv_buf_init(b, b ? 16384 : 0);
  }
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  fetch_req_t *r = s->data;
  wxd_fetch_pool_t *p = r->pool;
  if (r->done || r->failed) {
    /* nothing: the socket is on its way out */
  } else if (nread > 0) {
    if (r->phase == P_READ) req_phase(r, P_READ, r->read_ms); /* silence is what times out */
    if (r->conn->tls) {
      if (wxd_tls_feed(r->conn->tls, buf->base, (size_t)nread) != 0) wxd__fetch_req_fail(r, K_TLS, "out of memory");
      else tls_pump(r);
    } else if (wxd__fetch_req_parse(r, buf->base, (size_t)nread) > 0) {
      req_complete(r);
    }
  } else if (nread == UV_EOF) {
    uv_read_stop(s);
    if (r->conn->tls) {
      wxd_tls_feed_eof(r->conn->tls);
      tls_pump(r);
    } else {
      req_eof(r);
    }
  } else if (nread < 0) {
    io_fail(r, (int)nread, "reading from");
  }
  if (buf->base == p->readbuf) p->readbuf_busy = 0;
  else free(buf->base);
}

void wxd__fetch_req_start_io(fetch_req_t *r) {
  r->tcp.data = r;
  int rc = uv_read_start((uv_stream_t *)&r->tcp, on_alloc, on_read);
  if (rc != 0) {
    io_fail(r, rc, "reading from");
    return;
  }
  if (r->tls_ready) req_send(r);
  else tls_pump(r);
}

static void on_connect(uv_connect_t *creq, int status) {
  fetch_req_t *r = creq->data;
  if (r->done || r->failed || r->tcp_state != SK_OPEN) return;
  if (status < 0) {
    if (r->addr_i + 1 < r->naddrs) {
      /* Another address of the name: a new socket for it. */
      r->addr_i++;
      tcp_close(r, AC_CONNECT);
      return;
    }
    char where[300];
    host_label(r->host, where, sizeof where);
    wxd__fetch_req_fail(r, K_CONNECT, "connect to %s: %s", where, uv_strerror(status));
    return;
  }
  r->pool->opened++;
  uv_tcp_nodelay(&r->tcp, 1);
  if (r->host->tls) {
    r->conn->tls = wxd_tls_new_client(r->host->ctx->ctx, r->host->name);
    if (!r->conn->tls) {
      wxd__fetch_req_fail(r, K_TLS, "out of memory");
      return;
    }
  } else {
    r->tls_ready = 1;
  }
  wxd__fetch_req_start_io(r);
}

void wxd__fetch_req_connect(fetch_req_t *r) {
  if (r->failed || r->done) return;
  int rc = uv_tcp_init(r->pool->loop, &r->tcp);
  if (rc == 0) {
    r->tcp.data = r;
    r->tcp_state = SK_OPEN;
    r->handles++;
    r->connect.data = r;
    rc = uv_tcp_connect(&r->connect, &r->tcp, (const struct sockaddr *)&r->addrs[r->addr_i], on_connect);
  }
  if (rc != 0) {
    if (r->tcp_state == SK_OPEN && r->addr_i + 1 < r->naddrs) {
      r->addr_i++;
      tcp_close(r, AC_CONNECT);
      return;
    }
    char where[300];
    host_label(r->host, where, sizeof where);
    wxd__fetch_req_fail(r, K_CONNECT, "connect to %s: %s", where, uv_strerror(rc));
  }
}

/* The VM stops waiting (a shutdown deadline): close without resuming. */
static void req_cancel(void *wait) {
  fetch_req_t *r = wait;
  r->co = NULL;
  fetch_dns_t *d = r->dns;
  wxd__fetch_req_fail(r, K_CANCELLED, "cancelled");
  /* A lookup nobody waits for would only keep the loop alive. */
  if (d && d->pending && !d->waiters) uv_cancel((uv_req_t *)&d->gai);
}

/* ---- Lua ---- */

#define STATE_MT "wxd.fetch.state"

typedef struct fetch_state {
  wxd_fetch_pool_t *own; /* outside a server: this VM's pool */
} fetch_state_t;

static wxd_fetch_pool_t *pool_of(lua_State *L) {
  wxd_vm_t *vm = wxd_vm_get(L);
  if (vm->fetch) return vm->fetch;
  fetch_state_t *st = lua_touserdata(L, lua_upvalueindex(1));
  if (!st->own) st->own = wxd_fetch_pool_new(vm->loop);
  if (!st->own) luaL_error(L, "wxd.http: out of memory");
  return st->own;
}

static const char *opt_string(lua_State *L, int t, const char *k, size_t *len) {
  lua_getfield(L, t, k);
  const char *s = NULL;
  if (!lua_isnil(L, -1)) {
    if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "wxd.http: %s must be a string", k);
    s = lua_tolstring(L, -1, len);
  }
  lua_pop(L, 1); /* the string stays anchored in the table */
  return s;
}

static uint64_t opt_ms(lua_State *L, int t, const char *k) {
  lua_getfield(L, t, k);
  lua_Number v = lua_tonumber(L, -1);
  lua_pop(L, 1);
  if (!(v >= 1 && v <= 1e10)) luaL_error(L, "wxd.http: %s must be 1..1e10 ms", k);
  return (uint64_t)v;
}

static int opt_bool(lua_State *L, int t, const char *k) {
  lua_getfield(L, t, k);
  int v = lua_toboolean(L, -1);
  lua_pop(L, 1);
  return v;
}

static int fail_now(lua_State *L, int kind, const char *detail) {
  lua_pushnil(L);
  lua_pushstring(L, kind_names[kind]);
  lua_pushstring(L, detail);
  return 3;
}

/* request(spec) -> response | nil, kind, detail. spec (made by
 * lua/wxd/http.lua): tls, host, port, request (the head), body, head,
 * idempotent, keepalive, connect_ms, send_ms, read_ms, total_ms, max_body,
 * max_header_bytes, and for HTTPS verify, ca_file, cert, key, pkcs12,
 * passphrase. Waits. */
static int fetch_request(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  size_t host_len, head_len, body_len = 0;
  const char *host = opt_string(L, 1, "host", &host_len);
  const char *head = opt_string(L, 1, "request", &head_len);
  const char *body = opt_string(L, 1, "body", &body_len);
  if (!host || host_len == 0 || host_len > 255 || strlen(host) != host_len) luaL_error(L, "wxd.http: bad host");
  if (!head) luaL_error(L, "wxd.http: request must be a string");
  lua_getfield(L, 1, "port");
  lua_Integer port = lua_tointeger(L, -1);
  lua_pop(L, 1);
  if (port < 1 || port > 65535) luaL_error(L, "wxd.http: bad port");
  int tls = opt_bool(L, 1, "tls");
  uint64_t connect_ms = opt_ms(L, 1, "connect_ms"), send_ms = opt_ms(L, 1, "send_ms");
  uint64_t read_ms = opt_ms(L, 1, "read_ms"), total_ms = opt_ms(L, 1, "total_ms");
  lua_getfield(L, 1, "max_body");
  lua_Number max_body = lua_tonumber(L, -1);
  lua_getfield(L, 1, "max_header_bytes");
  lua_Number max_header = lua_tonumber(L, -1);
  lua_pop(L, 2);
  if (!(max_body >= 0 && max_body <= 1e12)) luaL_error(L, "wxd.http: bad max_body");
  if (!(max_header >= 256 && max_header <= 1e8)) luaL_error(L, "wxd.http: bad max_header_bytes");
  wxd_tls_client_conf_t conf;
  memset(&conf, 0, sizeof conf);
  unsigned char id[32] = {0};
  if (tls) {
    size_t ca_len, pass_len;
    conf.verify = opt_bool(L, 1, "verify");
    conf.ca_file = opt_string(L, 1, "ca_file", &ca_len);
    conf.cert_pem = opt_string(L, 1, "cert", &conf.cert_len);
    conf.key_pem = opt_string(L, 1, "key", &conf.key_len);
    conf.pkcs12 = opt_string(L, 1, "pkcs12", &conf.pkcs12_len);
    conf.passphrase = opt_string(L, 1, "passphrase", &pass_len);
    if (conf.passphrase && strlen(conf.passphrase) != pass_len) luaL_error(L, "wxd.http: passphrase contains NUL");
    if (conf.ca_file && strlen(conf.ca_file) != ca_len) luaL_error(L, "wxd.http: ca_file contains NUL");
    if (!conf.cert_pem != !conf.key_pem) luaL_error(L, "wxd.http: client_cert needs both cert and key");
    if (wxd__fetch_settings_id(&conf, id) != 0) luaL_error(L, "wxd.http: out of memory");
  }
  /* Checked before anything starts: see wxd_co_current. */
  wxd_co_t *co = wxd_co_current(L, "wxd.http");
  wxd_fetch_pool_t *p = pool_of(L);
  uv_update_time(p->loop);
  wxd_fetch_pool_sweep(p);

  char name[256];
  for (size_t i = 0; i <= host_len; i++) {
    unsigned char ch = (unsigned char)host[i];
    name[i] = (char)(ch >= 'A' && ch <= 'Z' ? ch + 32 : ch);
  }
  char err[300];
  fetch_ctx_t *ctx = NULL;
  if (tls && !(ctx = wxd__fetch_ctx_get(p, id, &conf, err, sizeof err))) return fail_now(L, K_TLS, err);
  fetch_host_t *h = wxd__fetch_host_get(p, name, (int)port, tls, id);
  fetch_req_t *r = h ? calloc(1, sizeof *r) : NULL;
  char *out = r ? malloc(head_len + body_len + 1) : NULL;
  if (!out) {
    free(r);
    if (h) wxd__fetch_host_maybe_free(h);
    return luaL_error(L, "wxd.http: out of memory");
  }
  if (tls && !h->ctx) {
    h->ctx = ctx;
    ctx->refs++;
  }
  memcpy(out, head, head_len);
  if (body_len) memcpy(out + head_len, body, body_len);
  r->out = out;
  r->out_len = head_len + body_len;
  r->pool = p;
  r->co = co;
  r->host = h;
  h->refs++;
  r->max_body = (size_t)max_body;
  r->max_header = (size_t)max_header;
  wxd_hdrs_init(&r->hdrs, NULL, MAX_RESP_HEADERS);
  r->connect_ms = connect_ms;
  r->send_ms = send_ms;
  r->read_ms = read_ms;
  r->total_ms = total_ms;
  r->is_head = opt_bool(L, 1, "head");
  r->idempotent = opt_bool(L, 1, "idempotent");
  r->keepalive = opt_bool(L, 1, "keepalive");
  llhttp_init(&r->parser, HTTP_RESPONSE, &wxd__fetch_parser_settings);
  r->parser.data = r;
  wxd_scan_head(&r->scan, 0);
  r->next = p->reqs;
  if (p->reqs) p->reqs->prev = r;
  p->reqs = r;
  p->nreqs++;
  p->nactive++;
  uv_timer_init(p->loop, &r->timer);
  r->timer.data = r;
  r->handles = 1;
  r->total_at = now_ms(p) + total_ms;
  req_phase(r, P_CONNECT, connect_ms);
  wxd__fetch_req_acquire(r);
  return wxd_co_yield_cancellable(co, L, req_cancel, r);
}

/* configure{ max_idle_per_host, max_conns_per_host, idle_timeout_ms,
 * dns_ttl_ms }: limits of this worker's pool (fields left out keep theirs). */
static int fetch_configure(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  wxd_fetch_pool_t *p = pool_of(L);
  static const char *const keys[] = {"max_idle_per_host", "max_conns_per_host", "idle_timeout_ms", "dns_ttl_ms"};
  for (int i = 0; i < 4; i++) {
    lua_getfield(L, 1, keys[i]);
    if (!lua_isnil(L, -1)) {
      lua_Number v = lua_tonumber(L, -1);
      if (!(v >= (i == 0 ? 0 : 1) && v <= 1e10) || (i < 2 && v > 1e6))
        return luaL_error(L, "wxd.http.configure: bad %s", keys[i]);
      if (i == 0) p->max_idle = (unsigned)v;
      else if (i == 1) p->max_conns = (unsigned)v;
      else if (i == 2) p->idle_ms = (uint64_t)v;
      else p->dns_ttl_ms = (uint64_t)v;
    }
    lua_pop(L, 1);
  }
  /* Fewer parked connections may be kept; more room may let queued
   * requests go. */
  for (fetch_host_t *h = p->hosts; h; h = h->next) h->refs++;
  for (fetch_host_t *h = p->hosts; h;) {
    fetch_host_t *next = h->next;
    while (h->nidle > p->max_idle || (h->nidle && h->nconns > p->max_conns)) {
      fetch_conn_t *oldest = h->idle;
      while (oldest->hnext) oldest = oldest->hnext;
      wxd__fetch_idle_unlink(oldest);
      wxd__fetch_conn_destroy(oldest, 0);
    }
    wxd__fetch_host_dispatch(h);
    h->refs--;
    wxd__fetch_host_maybe_free(h);
    h = next;
  }
  wxd_fetch_pool_sweep(p);
  return 0;
}

static void set_num(lua_State *L, const char *k, double v) {
  lua_pushnumber(L, v);
  lua_setfield(L, -2, k);
}

/* stats() -> counters and limits of this worker's pool. */
static int fetch_stats(lua_State *L) {
  wxd_fetch_pool_t *p = pool_of(L);
  lua_createtable(L, 0, 12);
  set_num(L, "requests", p->nactive);
  set_num(L, "queued", p->nqueued);
  set_num(L, "connections", p->nconns);
  set_num(L, "idle", p->nidle);
  set_num(L, "hosts", p->nhosts);
  set_num(L, "dns_cached", p->ndns);
  set_num(L, "tls_contexts", p->nctxs);
  set_num(L, "opened", (double)p->opened);
  set_num(L, "reused", (double)p->reused);
  set_num(L, "max_idle_per_host", p->max_idle);
  set_num(L, "max_conns_per_host", p->max_conns);
  set_num(L, "idle_timeout_ms", (double)p->idle_ms);
  set_num(L, "dns_ttl_ms", (double)p->dns_ttl_ms);
  return 1;
}

static int state_gc(lua_State *L) {
  fetch_state_t *st = lua_touserdata(L, 1);
  /* The Lua state closes after its loop ran out (wxd script): no request
   * is in flight, and the parked connections are plain sockets. */
  wxd_fetch_pool_free(st->own);
  st->own = NULL;
  return 0;
}

int wxd_open_fetch(lua_State *L) {
  static const luaL_Reg fns[] = {
      {"request", fetch_request}, {"configure", fetch_configure}, {"stats", fetch_stats}, {NULL, NULL}};
  fetch_state_t *st = lua_newuserdata(L, sizeof *st);
  st->own = NULL;
  luaL_newmetatable(L, STATE_MT);
  lua_pushcfunction(L, state_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  int sidx = lua_gettop(L);
  lua_createtable(L, 0, 3);
  lua_pushvalue(L, sidx);
  luaL_openlib(L, NULL, fns, 1);
  return 1;
}
