/* fetch: the RESOLVE step of a request (see fetch.c) and the pool's DNS
 * cache: one uv_getaddrinfo per name shared by every request waiting for
 * it, answers kept for dns_ttl_ms, literal IP addresses used as they are. */
#include "fetch_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

/* ---- DNS cache ---- */

void wxd__fetch_dns_unlink_waiter(fetch_req_t *r) {
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
void wxd__fetch_dns_sweep(wxd_fetch_pool_t *p, int all_idle) {
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
      wxd__fetch_req_fail(r, K_DNS, "cannot resolve %s: %s", name, uv_strerror(status));
      continue;
    }
    memcpy(r->addrs, addrs, sizeof addrs);
    r->naddrs = naddrs;
    r->addr_i = 0;
    for (int i = 0; i < naddrs; i++) set_port(&r->addrs[i], r->host->port);
    wxd__fetch_req_connect(r);
  }
}

static fetch_dns_t *dns_get(wxd_fetch_pool_t *p, const char *name) {
  for (fetch_dns_t *d = p->dns; d; d = d->next)
    if (strcmp(d->name, name) == 0) return d;
  if (p->ndns >= DNS_MAX) wxd__fetch_dns_sweep(p, 1);
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

void wxd__fetch_req_resolve(fetch_req_t *r) {
  if (r->failed || r->done) return;
  fetch_host_t *h = r->host;
  wxd_fetch_pool_t *p = r->pool;
  r->addr_i = 0;
  if (parse_ip(h->name, h->port, &r->addrs[0]) == 0) {
    r->naddrs = 1;
    wxd__fetch_req_connect(r);
    return;
  }
  fetch_dns_t *d = dns_get(p, h->name);
  if (!d) {
    wxd__fetch_req_fail(r, K_DNS, "out of memory");
    return;
  }
  if (!d->pending && d->naddrs > 0 && d->expires > now_ms(p)) {
    memcpy(r->addrs, d->addrs, sizeof d->addrs);
    r->naddrs = d->naddrs;
    for (int i = 0; i < r->naddrs; i++) set_port(&r->addrs[i], h->port);
    wxd__fetch_req_connect(r);
    return;
  }
  if (!d->pending) {
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int rc = uv_getaddrinfo(p->loop, &d->gai, on_resolved, d->name, NULL, &hints);
    if (rc != 0) {
      wxd__fetch_req_fail(r, K_DNS, "cannot resolve %s: %s", h->name, uv_strerror(rc));
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
