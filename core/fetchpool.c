/* fetch: the connection pool (see fetch.h): hosts, their parked
 * keep-alive connections and queues of waiting requests, the ACQUIRE step
 * of a request, and the pool's life (new, sweep, free). */
#include "fetch_internal.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* ---- hosts and connections ---- */

void wxd__fetch_host_maybe_free(fetch_host_t *h) {
  if (h->refs || h->nconns) return;
  wxd_fetch_pool_t *p = h->pool;
  fetch_host_t **pp = &p->hosts;
  while (*pp && *pp != h) pp = &(*pp)->next;
  if (*pp) *pp = h->next;
  p->nhosts--;
  if (h->ctx) h->ctx->refs--;
  free(h);
  wxd__fetch_ctx_trim(p, CTX_MAX);
}

fetch_host_t *wxd__fetch_host_get(wxd_fetch_pool_t *p, const char *name, int port, int tls, const unsigned char id[32]) {
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

void wxd__fetch_idle_unlink(fetch_conn_t *c) {
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
void wxd__fetch_conn_destroy(fetch_conn_t *c, int dispatch) {
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
  if (dispatch) wxd__fetch_host_dispatch(h);
  wxd__fetch_host_maybe_free(h);
}

/* A parked connection is usable when the peer has neither closed it nor
 * sent anything (an idle HTTP connection has nothing to say; bytes there
 * are a close_notify or garbage). */
static int conn_alive(fetch_conn_t *c) {
  char b;
  ssize_t n = recv(c->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
  return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
}

void wxd__fetch_conn_park(fetch_conn_t *c) {
  fetch_host_t *h = c->host;
  wxd_fetch_pool_t *p = h->pool;
  if (h->nidle >= p->max_idle || h->nconns > p->max_conns) {
    wxd__fetch_conn_destroy(c, 1);
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
  wxd__fetch_host_dispatch(h);
}

/* Queued requests take parked connections or free slots, in order. */
void wxd__fetch_host_dispatch(fetch_host_t *h) {
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
    wxd__fetch_req_acquire(r);
  }
  h->dispatching = 0;
  h->refs--; /* the caller frees h if it is unused now */
}

void wxd__fetch_queue_unlink(fetch_req_t *r) {
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

/* Takes a parked connection, or a new one, or waits in the host's queue. */
void wxd__fetch_req_acquire(fetch_req_t *r) {
  if (r->failed || r->done) return;
  fetch_host_t *h = r->host;
  wxd_fetch_pool_t *p = r->pool;
  while (h->idle) {
    fetch_conn_t *c = h->idle;
    wxd__fetch_idle_unlink(c);
    if (!conn_alive(c)) {
      wxd__fetch_conn_destroy(c, 0);
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
      wxd__fetch_req_fail(r, K_CONNECT, "cannot reuse a connection: %s", uv_strerror(rc));
      return;
    }
    r->reused = 1;
    r->tls_ready = 1;
    p->reused++;
    wxd__fetch_req_start_io(r);
    return;
  }
  if (h->nconns < p->max_conns) {
    fetch_conn_t *c = calloc(1, sizeof *c);
    if (!c) {
      wxd__fetch_req_fail(r, K_CONNECT, "out of memory");
      return;
    }
    c->host = h;
    c->fd = -1;
    h->nconns++;
    p->nconns++;
    r->conn = c;
    wxd__fetch_req_resolve(r);
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
    wxd__fetch_idle_unlink(c);
    wxd__fetch_conn_destroy(c, 1);
  }
  if (p->ndns > 64) wxd__fetch_dns_sweep(p, 0);
}

void wxd_fetch_pool_free(wxd_fetch_pool_t *p) {
  if (!p) return;
  while (p->idle_oldest) {
    fetch_conn_t *c = p->idle_oldest;
    wxd__fetch_idle_unlink(c);
    wxd__fetch_conn_destroy(c, 0);
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
