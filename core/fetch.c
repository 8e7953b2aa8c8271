/* fetch: see fetch.h.
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
#define OPENSSL_NO_DEPRECATED 1

#include "fetch.h"

#include "httpscan.h"

#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <llhttp.h>
#include <openssl/evp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "buf.h"
#include "tls.h"
#include "vm.h"

#define MAX_ADDRS 8          /* addresses kept per DNS answer */
#define DNS_MAX 1024         /* names cached per pool */
#define CTX_MAX 32           /* TLS contexts cached per pool */
#define MAX_RESP_HEADERS 256 /* header fields in one response */
#define READBUF_SIZE 65536
#define PLAINBUF_SIZE 16384

enum { K_NONE = 0, K_TIMEOUT, K_CONNECT, K_TLS, K_DNS, K_PROTOCOL, K_TOO_LARGE, K_CANCELLED };
static const char *const kind_names[] = {"", "timeout", "connect", "tls", "dns", "protocol", "too_large", "cancelled"};

enum { P_CONNECT = 1, P_SEND, P_READ };
enum { SK_NONE = 0, SK_OPEN, SK_CLOSING };
enum { AC_NONE = 0, AC_CONNECT, AC_RETRY }; /* what follows the close of a request's socket */

typedef struct fetch_req fetch_req_t;
typedef struct fetch_host fetch_host_t;

typedef struct fetch_ctx {
  unsigned char id[32]; /* SHA-256 of the TLS settings */
  SSL_CTX *ctx;
  unsigned refs;        /* hosts using it */
  struct fetch_ctx *next;
} fetch_ctx_t;

typedef struct fetch_dns {
  struct fetch_dns *next;
  wxd_fetch_pool_t *pool;
  uv_getaddrinfo_t gai;
  fetch_req_t *waiters;  /* requests waiting for the answer */
  uint64_t expires;      /* loop time (ms); 0: no answer */
  int pending;           /* gai is running */
  int naddrs;
  struct sockaddr_storage addrs[MAX_ADDRS];
  char name[];
} fetch_dns_t;

typedef struct fetch_conn {
  fetch_host_t *host;
  wxd_tls_t *tls;          /* HTTPS: kept across requests */
  int fd;                  /* parked: the socket; -1 while a request's handle owns it */
  uint64_t idle_since;     /* loop time it was parked */
  struct fetch_conn *hnext;          /* host->idle, most recent first */
  struct fetch_conn *newer, *older;  /* the pool's parked connections, for the sweep */
} fetch_conn_t;

struct fetch_host {
  fetch_host_t *next;
  wxd_fetch_pool_t *pool;
  fetch_ctx_t *ctx;        /* HTTPS */
  fetch_conn_t *idle;
  unsigned nidle;
  unsigned nconns;         /* open: connecting, in use or parked */
  unsigned refs;           /* requests pointing here */
  fetch_req_t *qhead, *qtail; /* waiting for a connection */
  int dispatching;
  int port;
  int tls;
  unsigned char ctx_id[32];
  char name[];             /* lower case */
};

struct wxd_fetch_pool {
  uv_loop_t *loop;
  fetch_host_t *hosts;
  fetch_dns_t *dns;
  unsigned ndns;
  fetch_ctx_t *ctxs;
  unsigned nctxs;
  fetch_conn_t *idle_newest, *idle_oldest;
  fetch_req_t *reqs;       /* every request not yet freed */
  unsigned nreqs, nqueued, nconns, nidle, nhosts;
  unsigned nactive;        /* requests not yet answered */
  uint64_t opened, reused; /* counters since the pool was made */
  /* Limits (wxd.http.configure). */
  unsigned max_idle;       /* parked connections per host */
  unsigned max_conns;      /* open connections per host */
  uint64_t idle_ms;        /* a parked connection older than this is closed */
  uint64_t dns_ttl_ms;
  int readbuf_busy;
  char readbuf[READBUF_SIZE];
  char plainbuf[PLAINBUF_SIZE];
};

typedef struct hdr {
  uint32_t name_off, name_len, value_off, value_len;
} hdr_t;

/* The checks llhttp 8.1 lacks (httpscan.c, shared with the server) run on
 * the raw bytes of the response head and of a chunked body before llhttp
 * sees them. */

struct fetch_req {
  uv_tcp_t tcp;
  uv_timer_t timer;
  uv_connect_t connect;
  uv_write_t write;        /* plain HTTP: the request bytes */
  llhttp_t parser;
  wxd_scan_t scan;
  wxd_fetch_pool_t *pool;
  wxd_co_t *co;            /* NULL once resumed or cancelled */
  fetch_host_t *host;
  fetch_conn_t *conn;      /* the connection in use (or being made) */
  fetch_dns_t *dns;        /* waiting for this answer */
  fetch_req_t *wprev, *wnext; /* dns->waiters or host queue */
  fetch_req_t *prev, *next;   /* pool->reqs */
  struct sockaddr_storage addrs[MAX_ADDRS];
  int naddrs, addr_i;
  char *out;               /* request bytes */
  size_t out_len;
  /* response */
  wxd_buf_t head;          /* lower-case names and values */
  hdr_t *hdrs;
  unsigned nhdrs, hdrs_cap;
  int hstate;              /* 0 none, 1 in a name, 2 in a value */
  wxd_buf_t body;
  size_t max_body, max_header;
  int status;
  /* deadlines, in loop time (ms) */
  uint64_t total_at, phase_at;
  uint64_t connect_ms, send_ms, read_ms, total_ms;
  int phase;
  int tcp_state;
  int after_close;
  int handles;             /* open handles: the timer, the socket */
  int writes_pending;
  int kind;                /* K_* once failed */
  char detail[240];
  unsigned tls_ready : 1;  /* handshake done (or plain HTTP) */
  unsigned sent : 1;       /* every request byte handed to the socket or TLS */
  unsigned queued : 1;
  unsigned got_bytes : 1;  /* a byte of the response arrived */
  unsigned in_trailers : 1;
  unsigned interim : 1;    /* the message parsed is a 1xx */
  unsigned complete : 1;   /* the final response is parsed */
  unsigned leftover : 1;   /* bytes followed the response */
  unsigned is_head : 1;
  unsigned idempotent : 1;
  unsigned keepalive : 1;
  unsigned reused : 1;     /* on a parked connection */
  unsigned retried : 1;
  unsigned failed : 1;
  unsigned done : 1;       /* resumed (or cancelled): only closing remains */
  int cb_kind;             /* set by a parser callback before it fails */
  const char *cb_err;
};

static void req_fail(fetch_req_t *r, int kind, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void req_acquire(fetch_req_t *r);
static void req_resolve(fetch_req_t *r);
static void req_connect(fetch_req_t *r);
static void host_dispatch(fetch_host_t *h);
static void on_timer(uv_timer_t *t);
static const llhttp_settings_t parser_settings;

static uint64_t now_ms(wxd_fetch_pool_t *p) { return uv_now(p->loop); }

static void host_label(const fetch_host_t *h, char *out, size_t len) {
  snprintf(out, len, strchr(h->name, ':') ? "[%s]:%d" : "%s:%d", h->name, h->port);
}

/* ---- parser callbacks ---- */

#define CB_FAIL(r, k, m) \
  do {                   \
    (r)->cb_kind = (k);  \
    (r)->cb_err = (m);   \
    return -1;           \
  } while (0)

static void resp_reset(fetch_req_t *r) {
  r->head.len = 0;
  r->body.len = 0;
  r->nhdrs = 0;
  r->hstate = 0;
  r->in_trailers = 0;
  r->interim = 0;
  r->status = 0;
}

static int on_message_begin(llhttp_t *p) {
  resp_reset(p->data);
  return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t len) {
  fetch_req_t *r = p->data;
  if (r->in_trailers) return 0; /* checked and counted by the scanner, never kept */
  if (r->hstate != 1) {
    if (r->nhdrs == MAX_RESP_HEADERS) CB_FAIL(r, K_TOO_LARGE, "too many response header fields");
    if (r->nhdrs == r->hdrs_cap) {
      unsigned cap = r->hdrs_cap ? r->hdrs_cap * 2 : 16;
      hdr_t *n = realloc(r->hdrs, cap * sizeof *n);
      if (!n) CB_FAIL(r, K_PROTOCOL, "out of memory");
      r->hdrs = n;
      r->hdrs_cap = cap;
    }
    hdr_t *h = &r->hdrs[r->nhdrs++];
    memset(h, 0, sizeof *h);
    h->name_off = (uint32_t)r->head.len;
    r->hstate = 1;
  }
  if (wxd_buf_reserve(&r->head, len)) CB_FAIL(r, K_PROTOCOL, "out of memory");
  char *dst = r->head.data + r->head.len;
  for (size_t i = 0; i < len; i++) {
    unsigned char ch = (unsigned char)at[i];
    dst[i] = (char)(ch >= 'A' && ch <= 'Z' ? ch + 32 : ch);
  }
  r->head.len += len;
  r->hdrs[r->nhdrs - 1].name_len += (uint32_t)len;
  return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len) {
  fetch_req_t *r = p->data;
  if (r->in_trailers) return 0;
  hdr_t *h = &r->hdrs[r->nhdrs - 1];
  if (r->hstate != 2) {
    h->value_off = (uint32_t)r->head.len;
    r->hstate = 2;
  }
  if (wxd_buf_append(&r->head, at, len)) CB_FAIL(r, K_PROTOCOL, "out of memory");
  h->value_len += (uint32_t)len;
  return 0;
}

static int on_header_value_complete(llhttp_t *p) {
  fetch_req_t *r = p->data;
  r->hstate = 0;
  return 0;
}

static int on_headers_complete(llhttp_t *p) {
  fetch_req_t *r = p->data;
  int status = llhttp_get_status_code(p);
  r->status = status;
  if (llhttp_get_http_major(p) != 1) CB_FAIL(r, K_PROTOCOL, "unsupported HTTP version");
  if (status == 101) CB_FAIL(r, K_PROTOCOL, "unexpected 101 Switching Protocols");
  if (status < 100 || status > 999) CB_FAIL(r, K_PROTOCOL, "bad status code");
  if (status < 200) {
    /* 100 Continue, 103 Early Hints: interim, followed by the answer. */
    r->interim = 1;
    return 0;
  }
  r->in_trailers = 1;
  int bodiless = r->is_head || status == 204 || status == 304;
  if ((p->flags & F_CONTENT_LENGTH) && p->content_length > r->max_body && !bodiless)
    CB_FAIL(r, K_TOO_LARGE, "response body larger than max_body");
  /* Chunk sizes over max_body are refused as soon as their line is read. */
  if (p->flags & F_CHUNKED) wxd_scan_chunked(&r->scan, bodiless ? UINT64_MAX : r->max_body);
  /* A response to HEAD has no body whatever its headers say. */
  return r->is_head ? 1 : 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len) {
  fetch_req_t *r = p->data;
  if (r->body.len + len > r->max_body) CB_FAIL(r, K_TOO_LARGE, "response body larger than max_body");
  if (wxd_buf_append(&r->body, at, len)) CB_FAIL(r, K_PROTOCOL, "out of memory");
  return 0;
}

static int on_message_complete(llhttp_t *p) {
  fetch_req_t *r = p->data;
  if (!r->interim) r->complete = 1;
  return HPE_PAUSED; /* one response per request: stop at its end */
}

static const llhttp_settings_t parser_settings = {
    .on_message_begin = on_message_begin,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_header_value_complete = on_header_value_complete,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* ---- DNS cache ---- */

static void dns_unlink_waiter(fetch_req_t *r) {
  fetch_dns_t *d = r->dns;
  if (!d) return;
  if (r->wprev) r->wprev->wnext = r->wnext;
  else d->waiters = r->wnext;
  if (r->wnext) r->wnext->wprev = r->wprev;
  r->wprev = r->wnext = NULL;
  r->dns = NULL;
}

static void dns_free(wxd_fetch_pool_t *p, fetch_dns_t *d) {
  fetch_dns_t **pp = &p->dns;
  while (*pp && *pp != d) pp = &(*pp)->next;
  if (*pp) *pp = d->next;
  p->ndns--;
  free(d);
}

/* Drops answers that expired and are not being refreshed. */
static void dns_sweep(wxd_fetch_pool_t *p, int all_idle) {
  uint64_t now = now_ms(p);
  fetch_dns_t *d = p->dns;
  while (d) {
    fetch_dns_t *next = d->next;
    if (!d->pending && !d->waiters && (all_idle || d->expires <= now)) dns_free(p, d);
    d = next;
  }
}

static void set_port(struct sockaddr_storage *ss, int port);

static void on_resolved(uv_getaddrinfo_t *gai, int status, struct addrinfo *res) {
  fetch_dns_t *d = gai->data;
  wxd_fetch_pool_t *p = d->pool;
  if (!p) { /* the pool went first (see wxd_fetch_pool_free) */
    if (res) uv_freeaddrinfo(res);
    free(d);
    return;
  }
  d->pending = 0;
  d->naddrs = 0;
  for (struct addrinfo *ai = res; status == 0 && ai && d->naddrs < MAX_ADDRS; ai = ai->ai_next) {
    if ((ai->ai_family != AF_INET && ai->ai_family != AF_INET6) || ai->ai_addrlen > sizeof d->addrs[0]) continue;
    memcpy(&d->addrs[d->naddrs++], ai->ai_addr, ai->ai_addrlen);
  }
  if (res) uv_freeaddrinfo(res);
  if (status == 0 && d->naddrs == 0) status = UV_EAI_NODATA;
  d->expires = status == 0 ? now_ms(p) + p->dns_ttl_ms : 0;
  /* The waiters leave the entry first: moving them on may start requests
   * that look the name up again, and a failed answer is dropped now. */
  fetch_req_t *list = d->waiters;
  d->waiters = NULL;
  for (fetch_req_t *r = list; r; r = r->wnext) r->dns = NULL;
  char name[256];
  snprintf(name, sizeof name, "%s", d->name);
  struct sockaddr_storage addrs[MAX_ADDRS];
  int naddrs = d->naddrs;
  memcpy(addrs, d->addrs, sizeof addrs);
  if (status != 0) dns_free(p, d);
  /* None of this resumes Lua (failures are reported by each request's
   * timer). */
  while (list) {
    fetch_req_t *r = list;
    list = r->wnext;
    r->wnext = r->wprev = NULL;
    if (status != 0) {
      req_fail(r, K_DNS, "cannot resolve %s: %s", name, uv_strerror(status));
      continue;
    }
    memcpy(r->addrs, addrs, sizeof addrs);
    r->naddrs = naddrs;
    r->addr_i = 0;
    for (int i = 0; i < naddrs; i++) set_port(&r->addrs[i], r->host->port);
    req_connect(r);
  }
}

static fetch_dns_t *dns_get(wxd_fetch_pool_t *p, const char *name) {
  for (fetch_dns_t *d = p->dns; d; d = d->next)
    if (strcmp(d->name, name) == 0) return d;
  if (p->ndns >= DNS_MAX) dns_sweep(p, 1);
  size_t nl = strlen(name);
  fetch_dns_t *d = calloc(1, sizeof *d + nl + 1);
  if (!d) return NULL;
  memcpy(d->name, name, nl + 1);
  d->pool = p;
  d->gai.data = d;
  d->next = p->dns;
  p->dns = d;
  p->ndns++;
  return d;
}

/* ---- TLS contexts ---- */

/* Frees unused contexts while there are more than `keep`. */
static void ctx_trim(wxd_fetch_pool_t *p, unsigned keep) {
  fetch_ctx_t **pp = &p->ctxs;
  while (*pp && p->nctxs > keep) {
    fetch_ctx_t *c = *pp;
    if (c->refs == 0) {
      *pp = c->next;
      SSL_CTX_free(c->ctx);
      free(c);
      p->nctxs--;
    } else {
      pp = &c->next;
    }
  }
}

/* The cached context for these settings, made on first use. NULL with err
 * set when the settings are unusable (a CA file that cannot be read, a bad
 * client certificate). */
static fetch_ctx_t *ctx_get(wxd_fetch_pool_t *p, const unsigned char id[32], const wxd_tls_client_conf_t *conf,
                            char *err, size_t errlen) {
  for (fetch_ctx_t *c = p->ctxs; c; c = c->next)
    if (memcmp(c->id, id, 32) == 0) return c;
  SSL_CTX *ctx = wxd_tls_client_ctx(conf, err, errlen);
  if (!ctx) return NULL;
  ctx_trim(p, CTX_MAX - 1);
  fetch_ctx_t *c = calloc(1, sizeof *c);
  if (!c) {
    SSL_CTX_free(ctx);
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  memcpy(c->id, id, 32);
  c->ctx = ctx;
  c->next = p->ctxs;
  p->ctxs = c;
  p->nctxs++;
  return c;
}

/* ---- hosts and connections ---- */

static void host_maybe_free(fetch_host_t *h) {
  if (h->refs || h->nconns) return;
  wxd_fetch_pool_t *p = h->pool;
  fetch_host_t **pp = &p->hosts;
  while (*pp && *pp != h) pp = &(*pp)->next;
  if (*pp) *pp = h->next;
  p->nhosts--;
  if (h->ctx) h->ctx->refs--;
  free(h);
  ctx_trim(p, CTX_MAX);
}

static fetch_host_t *host_get(wxd_fetch_pool_t *p, const char *name, int port, int tls, const unsigned char id[32]) {
  for (fetch_host_t *h = p->hosts; h; h = h->next)
    if (h->port == port && h->tls == tls && strcmp(h->name, name) == 0 && memcmp(h->ctx_id, id, 32) == 0)
      return h;
  size_t nl = strlen(name);
  fetch_host_t *h = calloc(1, sizeof *h + nl + 1);
  if (!h) return NULL;
  memcpy(h->name, name, nl + 1);
  h->pool = p;
  h->port = port;
  h->tls = tls;
  memcpy(h->ctx_id, id, 32);
  h->next = p->hosts;
  p->hosts = h;
  p->nhosts++;
  return h;
}

static void idle_unlink(fetch_conn_t *c) {
  fetch_host_t *h = c->host;
  wxd_fetch_pool_t *p = h->pool;
  fetch_conn_t **pp = &h->idle;
  while (*pp && *pp != c) pp = &(*pp)->hnext;
  if (*pp) *pp = c->hnext;
  c->hnext = NULL;
  h->nidle--;
  if (c->newer) c->newer->older = c->older;
  else p->idle_newest = c->older;
  if (c->older) c->older->newer = c->newer;
  else p->idle_oldest = c->newer;
  c->newer = c->older = NULL;
  p->nidle--;
}

/* Closes a connection that no request holds (its socket, if parked, is a
 * plain fd) and gives its slot back: a queued request may take it. */
static void conn_destroy(fetch_conn_t *c, int dispatch) {
  fetch_host_t *h = c->host;
  wxd_fetch_pool_t *p = h->pool;
  if (c->fd >= 0) {
    if (c->tls) {
      /* Best effort: a close_notify if the socket takes it now. */
      char buf[256];
      wxd_tls_shutdown(c->tls);
      size_t n = wxd_tls_take(c->tls, buf, sizeof buf);
      if (n > 0 && send(c->fd, buf, n, MSG_NOSIGNAL | MSG_DONTWAIT) < 0) { /* ignored */ }
    }
    close(c->fd);
  }
  wxd_tls_free(c->tls);
  free(c);
  h->nconns--;
  p->nconns--;
  if (dispatch) host_dispatch(h);
  host_maybe_free(h);
}

/* A parked connection is usable when the peer has neither closed it nor
 * sent anything (an idle HTTP connection has nothing to say; bytes there
 * are a close_notify or garbage). */
static int conn_alive(fetch_conn_t *c) {
  char b;
  ssize_t n = recv(c->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
  return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
}

static void conn_park(fetch_conn_t *c) {
  fetch_host_t *h = c->host;
  wxd_fetch_pool_t *p = h->pool;
  if (h->nidle >= p->max_idle || h->nconns > p->max_conns) {
    conn_destroy(c, 1);
    return;
  }
  c->idle_since = now_ms(p);
  c->hnext = h->idle;
  h->idle = c;
  h->nidle++;
  c->older = p->idle_newest;
  c->newer = NULL;
  if (p->idle_newest) p->idle_newest->newer = c;
  else p->idle_oldest = c;
  p->idle_newest = c;
  p->nidle++;
  host_dispatch(h);
}

/* Queued requests take parked connections or free slots, in order. */
static void host_dispatch(fetch_host_t *h) {
  if (h->dispatching) return; /* the outer loop sees the new state */
  h->dispatching = 1;
  h->refs++; /* h stays while we walk */
  while (h->qhead && (h->idle || h->nconns < h->pool->max_conns)) {
    fetch_req_t *r = h->qhead;
    h->qhead = r->wnext;
    if (h->qhead) h->qhead->wprev = NULL;
    else h->qtail = NULL;
    r->wnext = r->wprev = NULL;
    r->queued = 0;
    h->pool->nqueued--;
    req_acquire(r);
  }
  h->dispatching = 0;
  h->refs--; /* the caller frees h if it is unused now */
}

static void queue_unlink(fetch_req_t *r) {
  if (!r->queued) return;
  fetch_host_t *h = r->host;
  if (r->wprev) r->wprev->wnext = r->wnext;
  else h->qhead = r->wnext;
  if (r->wnext) r->wnext->wprev = r->wprev;
  else h->qtail = r->wprev;
  r->wprev = r->wnext = NULL;
  r->queued = 0;
  h->pool->nqueued--;
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
  free(r->hdrs);
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
    if (next == AC_CONNECT) req_connect(r);
    else if (next == AC_RETRY) req_resolve(r);
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
  if (park && c->fd >= 0) conn_park(c);
  else conn_destroy(c, 1);
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
static void req_fail(fetch_req_t *r, int kind, const char *fmt, ...) {
  if (r->failed || r->done) return;
  r->failed = 1;
  r->kind = kind;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(r->detail, sizeof r->detail, fmt, ap);
  va_end(ap);
  queue_unlink(r);
  dns_unlink_waiter(r);
  req_release_conn(r, 0);
  tcp_close(r, AC_NONE);
  uv_timer_start(&r->timer, on_timer, 0, 0);
}

static void push_response(fetch_req_t *r, lua_State *T) {
  lua_createtable(T, 0, 3);
  lua_pushinteger(T, r->status);
  lua_setfield(T, -2, "status");
  lua_createtable(T, 0, (int)r->nhdrs);
  for (unsigned i = 0; i < r->nhdrs; i++) {
    hdr_t *h = &r->hdrs[i];
    const char *name = r->head.data + h->name_off;
    const char *value = h->value_len ? r->head.data + h->value_off : "";
    int cookie = h->name_len == 10 && memcmp(name, "set-cookie", 10) == 0;
    lua_pushlstring(T, name, h->name_len);
    lua_pushvalue(T, -1);
    lua_rawget(T, -3);
    if (cookie) {
      /* Set-Cookie values may hold commas: always a list. */
      if (lua_isnil(T, -1)) {
        lua_pop(T, 1);
        lua_newtable(T);
        lua_pushvalue(T, -2);
        lua_pushvalue(T, -2);
        lua_rawset(T, -5);
      }
      lua_pushlstring(T, value, h->value_len);
      lua_rawseti(T, -2, (int)lua_objlen(T, -2) + 1);
      lua_pop(T, 2);
      continue;
    }
    if (lua_isnil(T, -1)) {
      lua_pop(T, 1);
      lua_pushlstring(T, value, h->value_len);
    } else {
      /* Repeated fields join with ", " (RFC 9110 section 5.3). */
      lua_pushliteral(T, ", ");
      lua_pushlstring(T, value, h->value_len);
      lua_concat(T, 3);
    }
    lua_rawset(T, -3);
  }
  lua_setfield(T, -2, "headers");
  lua_pushlstring(T, r->body.data ? r->body.data : "", r->body.len);
  lua_setfield(T, -2, "body");
}

/* Ends the request: the connection is already released or closed; the
 * coroutine (if any) is resumed last, so that nothing here runs after Lua
 * did. */
static void req_finish(fetch_req_t *r) {
  if (r->done) return;
  r->done = 1;
  r->pool->nactive--;
  queue_unlink(r);
  dns_unlink_waiter(r);
  req_release_conn(r, 0);
  tcp_close(r, AC_NONE);
  uv_timer_stop(&r->timer);
  uv_close((uv_handle_t *)&r->timer, on_timer_closed);
  fetch_host_t *h = r->host;
  r->host = NULL;
  h->refs--;
  host_maybe_free(h);
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
    push_response(r, T);
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
      req_fail(r, K_TIMEOUT, "connect timeout (%g s) %s %s", (double)r->connect_ms / 1000,
               r->queued ? "waiting for a free connection to" : "connecting to", where);
    else if (r->phase == P_SEND)
      req_fail(r, K_TIMEOUT, "send timeout (%g s) writing to %s", (double)r->send_ms / 1000, where);
    else
      req_fail(r, K_TIMEOUT, "read timeout (%g s) reading from %s", (double)r->read_ms / 1000, where);
  } else if (now >= r->total_at) {
    req_fail(r, K_TIMEOUT, "total timeout (%g s) for %s", (double)r->total_ms / 1000, where);
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
  llhttp_init(&r->parser, HTTP_RESPONSE, &parser_settings);
  r->parser.data = r;
  wxd_scan_head(&r->scan, 0);
  resp_reset(r);
  req_phase(r, P_CONNECT, r->connect_ms);
  tcp_close(r, AC_RETRY);
  return 1;
}

static void io_fail(fetch_req_t *r, int err, const char *doing) {
  if (req_retry(r)) return;
  char where[300];
  host_label(r->host, where, sizeof where);
  req_fail(r, K_CONNECT, "%s %s: %s", doing, where, uv_strerror(err));
}

/* Feeds response bytes. Returns 0 for more, 1 when the response is
 * complete (r->leftover tells whether bytes followed it), -1 on failure. */
static int req_parse(fetch_req_t *r, const char *data, size_t len) {
  if (len > 0) r->got_bytes = 1;
  while (len > 0) {
    size_t chunk = len;
    if (r->scan.mode != WXD_SCAN_OFF) {
      int head = r->scan.mode == WXD_SCAN_HEAD;
      switch (wxd_scan(&r->scan, data, len, r->max_header, &chunk)) {
        case WXD_SCAN_OK: break;
        case WXD_SCAN_HEAD_TOO_LARGE:
          req_fail(r, K_TOO_LARGE, "%s", head ? "response headers too large" : "response trailers too large");
          return -1;
        case WXD_SCAN_BODY_TOO_LARGE:
          req_fail(r, K_TOO_LARGE, "%s", "response body larger than max_body");
          return -1;
        case WXD_SCAN_MALFORMED:
          req_fail(r, K_PROTOCOL, "%s", head ? "malformed response head (bare LF, obs-fold or a space in a field name)"
                                             : "malformed chunked body");
          return -1;
        default:
          req_fail(r, K_PROTOCOL, "%s", "malformed chunked body");
          return -1;
      }
    }
    llhttp_errno_t e = llhttp_execute(&r->parser, data, chunk);
    if (e == HPE_PAUSED) {
      size_t used = (size_t)(llhttp_get_error_pos(&r->parser) - data);
      data += used;
      len -= used;
      llhttp_resume(&r->parser);
      if (r->complete) {
        r->leftover = len > 0;
        return 1;
      }
      /* An interim 1xx: its head is done, the real response follows. */
      r->interim = 0;
      r->in_trailers = 0;
      wxd_scan_head(&r->scan, 0);
      continue;
    }
    if (e != HPE_OK) {
      if (r->cb_kind) req_fail(r, r->cb_kind, "%s", r->cb_err);
      else req_fail(r, K_PROTOCOL, "malformed response: %s", llhttp_get_error_reason(&r->parser));
      return -1;
    }
    data += chunk;
    len -= chunk;
  }
  return 0;
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
      req_fail(r, r->cb_kind, "%s", r->cb_err);
      return;
    }
  }
  char where[300];
  host_label(r->host, where, sizeof where);
  if (!r->got_bytes) req_fail(r, K_PROTOCOL, "%s closed the connection without a response", where);
  else req_fail(r, K_PROTOCOL, "%s closed the connection before the response ended", where);
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
      req_fail(r, K_TLS, "%s", wxd_tls_error(r->conn->tls));
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
      req_fail(r, K_TLS, "%s", wxd_tls_error(t));
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
      int pr = req_parse(r, r->pool->plainbuf, n);
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
    req_fail(r, K_TLS, "%s", wxd_tls_error(t));
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
      if (wxd_tls_feed(r->conn->tls, buf->base, (size_t)nread) != 0) req_fail(r, K_TLS, "out of memory");
      else tls_pump(r);
    } else if (req_parse(r, buf->base, (size_t)nread) > 0) {
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

static void req_start_io(fetch_req_t *r) {
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
    req_fail(r, K_CONNECT, "connect to %s: %s", where, uv_strerror(status));
    return;
  }
  r->pool->opened++;
  uv_tcp_nodelay(&r->tcp, 1);
  if (r->host->tls) {
    r->conn->tls = wxd_tls_new_client(r->host->ctx->ctx, r->host->name);
    if (!r->conn->tls) {
      req_fail(r, K_TLS, "out of memory");
      return;
    }
  } else {
    r->tls_ready = 1;
  }
  req_start_io(r);
}

static void req_connect(fetch_req_t *r) {
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
    req_fail(r, K_CONNECT, "connect to %s: %s", where, uv_strerror(rc));
  }
}

static int parse_ip(const char *name, int port, struct sockaddr_storage *ss) {
  memset(ss, 0, sizeof *ss);
  if (uv_ip4_addr(name, port, (struct sockaddr_in *)ss) == 0) return 0;
  if (uv_ip6_addr(name, port, (struct sockaddr_in6 *)ss) == 0) return 0;
  return -1;
}

static void set_port(struct sockaddr_storage *ss, int port) {
  if (ss->ss_family == AF_INET) ((struct sockaddr_in *)ss)->sin_port = htons((uint16_t)port);
  else ((struct sockaddr_in6 *)ss)->sin6_port = htons((uint16_t)port);
}

static void req_resolve(fetch_req_t *r) {
  if (r->failed || r->done) return;
  fetch_host_t *h = r->host;
  wxd_fetch_pool_t *p = r->pool;
  r->addr_i = 0;
  if (parse_ip(h->name, h->port, &r->addrs[0]) == 0) {
    r->naddrs = 1;
    req_connect(r);
    return;
  }
  fetch_dns_t *d = dns_get(p, h->name);
  if (!d) {
    req_fail(r, K_DNS, "out of memory");
    return;
  }
  if (!d->pending && d->naddrs > 0 && d->expires > now_ms(p)) {
    memcpy(r->addrs, d->addrs, sizeof d->addrs);
    r->naddrs = d->naddrs;
    for (int i = 0; i < r->naddrs; i++) set_port(&r->addrs[i], h->port);
    req_connect(r);
    return;
  }
  if (!d->pending) {
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int rc = uv_getaddrinfo(p->loop, &d->gai, on_resolved, d->name, NULL, &hints);
    if (rc != 0) {
      req_fail(r, K_DNS, "cannot resolve %s: %s", h->name, uv_strerror(rc));
      if (!d->waiters) dns_free(p, d);
      return;
    }
    d->pending = 1;
  }
  r->dns = d;
  r->wprev = NULL;
  r->wnext = d->waiters;
  if (d->waiters) d->waiters->wprev = r;
  d->waiters = r;
}

/* Takes a parked connection, or a new one, or waits in the host's queue. */
static void req_acquire(fetch_req_t *r) {
  if (r->failed || r->done) return;
  fetch_host_t *h = r->host;
  wxd_fetch_pool_t *p = r->pool;
  while (h->idle) {
    fetch_conn_t *c = h->idle;
    idle_unlink(c);
    if (!conn_alive(c)) {
      conn_destroy(c, 0);
      continue;
    }
    int rc = uv_tcp_init(p->loop, &r->tcp);
    if (rc == 0) {
      r->tcp.data = r;
      r->tcp_state = SK_OPEN;
      r->handles++;
      rc = uv_tcp_open(&r->tcp, c->fd);
      if (rc == 0) c->fd = -1; /* the handle owns it now */
    }
    r->conn = c;
    if (rc != 0) {
      req_fail(r, K_CONNECT, "cannot reuse a connection: %s", uv_strerror(rc));
      return;
    }
    r->reused = 1;
    r->tls_ready = 1;
    p->reused++;
    req_start_io(r);
    return;
  }
  if (h->nconns < p->max_conns) {
    fetch_conn_t *c = calloc(1, sizeof *c);
    if (!c) {
      req_fail(r, K_CONNECT, "out of memory");
      return;
    }
    c->host = h;
    c->fd = -1;
    h->nconns++;
    p->nconns++;
    r->conn = c;
    req_resolve(r);
    return;
  }
  r->queued = 1;
  p->nqueued++;
  r->wnext = NULL;
  r->wprev = h->qtail;
  if (h->qtail) h->qtail->wnext = r;
  else h->qhead = r;
  h->qtail = r;
}

/* The VM stops waiting (a shutdown deadline): close without resuming. */
static void req_cancel(void *wait) {
  fetch_req_t *r = wait;
  r->co = NULL;
  fetch_dns_t *d = r->dns;
  req_fail(r, K_CANCELLED, "cancelled");
  /* A lookup nobody waits for would only keep the loop alive. */
  if (d && d->pending && !d->waiters) uv_cancel((uv_req_t *)&d->gai);
}

/* ---- pool ---- */

wxd_fetch_pool_t *wxd_fetch_pool_new(uv_loop_t *loop) {
  wxd_fetch_pool_t *p = calloc(1, sizeof *p);
  if (!p) return NULL;
  p->loop = loop;
  p->max_idle = 16;
  p->max_conns = 256;
  p->idle_ms = 60000;
  p->dns_ttl_ms = 30000;
  /* A peer that resets a connection while we write must cost an error, not
   * the process (SIGPIPE's default). Servers set this already; wxd script
   * gets it here. */
  struct sigaction sa;
  if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL) signal(SIGPIPE, SIG_IGN);
  return p;
}

void wxd_fetch_pool_sweep(wxd_fetch_pool_t *p) {
  if (!p) return;
  uint64_t now = now_ms(p);
  while (p->idle_oldest && now - p->idle_oldest->idle_since >= p->idle_ms) {
    fetch_conn_t *c = p->idle_oldest;
    idle_unlink(c);
    conn_destroy(c, 1);
  }
  if (p->ndns > 64) dns_sweep(p, 0);
}

void wxd_fetch_pool_free(wxd_fetch_pool_t *p) {
  if (!p) return;
  while (p->idle_oldest) {
    fetch_conn_t *c = p->idle_oldest;
    idle_unlink(c);
    conn_destroy(c, 0);
  }
  /* With no request in flight, no host or DNS lookup is left in use. */
  while (p->hosts) {
    fetch_host_t *h = p->hosts;
    p->hosts = h->next;
    free(h);
  }
  while (p->dns) {
    fetch_dns_t *d = p->dns;
    p->dns = d->next;
    if (d->pending) {
      /* A lookup whose requests timed out may still run on a loop that
       * outlives this pool (a VM of its own freed while its worker runs):
       * its callback frees it. */
      d->pool = NULL;
      d->waiters = NULL;
      uv_cancel((uv_req_t *)&d->gai);
    } else {
      free(d);
    }
  }
  while (p->ctxs) {
    fetch_ctx_t *c = p->ctxs;
    p->ctxs = c->next;
    SSL_CTX_free(c->ctx);
    free(c);
  }
  free(p);
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

/* SHA-256 over the TLS settings, each with its length, so that two
 * different settings never share a context or a connection. */
static int settings_id(const wxd_tls_client_conf_t *c, unsigned char id[32]) {
  EVP_MD_CTX *md = EVP_MD_CTX_new();
  if (!md) return -1;
  int ok = EVP_DigestInit_ex(md, EVP_sha256(), NULL);
  const char *parts[] = {c->verify ? "v1" : "v0", c->ca_file, c->cert_pem, c->key_pem, c->pkcs12, c->passphrase};
  size_t lens[] = {2, c->ca_file ? strlen(c->ca_file) : 0, c->cert_len, c->key_len, c->pkcs12_len,
                   c->passphrase ? strlen(c->passphrase) : 0};
  for (int i = 0; ok && i < 6; i++) {
    uint64_t n = parts[i] ? (uint64_t)lens[i] + 1 : 0; /* absent differs from empty */
    ok = EVP_DigestUpdate(md, &n, sizeof n) && (!parts[i] || EVP_DigestUpdate(md, parts[i], lens[i]));
  }
  unsigned int len = 0;
  ok = ok && EVP_DigestFinal_ex(md, id, &len);
  EVP_MD_CTX_free(md);
  return ok ? 0 : -1;
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
    if (settings_id(&conf, id) != 0) luaL_error(L, "wxd.http: out of memory");
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
  if (tls && !(ctx = ctx_get(p, id, &conf, err, sizeof err))) return fail_now(L, K_TLS, err);
  fetch_host_t *h = host_get(p, name, (int)port, tls, id);
  fetch_req_t *r = h ? calloc(1, sizeof *r) : NULL;
  char *out = r ? malloc(head_len + body_len + 1) : NULL;
  if (!out) {
    free(r);
    if (h) host_maybe_free(h);
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
  r->connect_ms = connect_ms;
  r->send_ms = send_ms;
  r->read_ms = read_ms;
  r->total_ms = total_ms;
  r->is_head = opt_bool(L, 1, "head");
  r->idempotent = opt_bool(L, 1, "idempotent");
  r->keepalive = opt_bool(L, 1, "keepalive");
  llhttp_init(&r->parser, HTTP_RESPONSE, &parser_settings);
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
  req_acquire(r);
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
      idle_unlink(oldest);
      conn_destroy(oldest, 0);
    }
    host_dispatch(h);
    h->refs--;
    host_maybe_free(h);
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
