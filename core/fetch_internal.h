/* fetch internals: the structures of the outbound HTTP client (fetch.h)
 * and the calls its parts make to each other. Only core/fetch*.c include
 * this. The parts:
 *   fetch.c      a request's life and exchange (CONNECT, SEND, READ,
 *                deadlines, failures) and the Lua module wxd.core.fetch
 *   fetchresp.c  the response: llhttp callbacks, scanner, Lua table
 *   fetchdns.c   RESOLVE and the DNS cache
 *   fetchtls.c   the TLS client context cache
 *   fetchpool.c  hosts, parked connections, queues, ACQUIRE, the pool
 */
#ifndef WXD_FETCH_INTERNAL_H
#define WXD_FETCH_INTERNAL_H

#define OPENSSL_NO_DEPRECATED 1

#include "fetch.h"

#include <llhttp.h>
#include <lua.h>
#include <stdint.h>
#include <sys/socket.h>
#include <uv.h>

#include "buf.h"
#include "hdrs.h"
#include "httpscan.h"
#include "tls.h"
#include "vm.h"

#define MAX_ADDRS 8          /* addresses kept per DNS answer */
#define DNS_MAX 1024         /* names cached per pool */
#define CTX_MAX 32           /* TLS contexts cached per pool */
#define MAX_RESP_HEADERS 256 /* header fields in one response */
#define READBUF_SIZE 65536
#define PLAINBUF_SIZE 16384

enum { K_NONE = 0, K_TIMEOUT, K_CONNECT, K_TLS, K_DNS, K_PROTOCOL, K_TOO_LARGE, K_CANCELLED };

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
  wxd_hdrs_t hdrs;         /* on the heap, up to MAX_RESP_HEADERS; bytes counted by the scanner */
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

static inline uint64_t now_ms(wxd_fetch_pool_t *p) { return uv_now(p->loop); }

/* fetch.c */
/* Records the failure; the request's timer reports it. Idempotent. */
void wxd__fetch_req_fail(fetch_req_t *r, int kind, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Connects to r->addrs[r->addr_i]. */
void wxd__fetch_req_connect(fetch_req_t *r);
/* Reads on r->tcp, then the handshake or the request. */
void wxd__fetch_req_start_io(fetch_req_t *r);

/* fetchresp.c */
extern const llhttp_settings_t wxd__fetch_parser_settings;
void wxd__fetch_resp_reset(fetch_req_t *r);
/* Feeds response bytes. Returns 0 for more, 1 when the response is
 * complete (r->leftover tells whether bytes followed it), -1 on failure. */
int wxd__fetch_req_parse(fetch_req_t *r, const char *data, size_t len);
/* Pushes the response table {status, headers, body} onto T. */
void wxd__fetch_push_response(fetch_req_t *r, lua_State *T);

/* fetchdns.c */
/* The addresses of r->host, then wxd__fetch_req_connect (or a failure). */
void wxd__fetch_req_resolve(fetch_req_t *r);
void wxd__fetch_dns_unlink_waiter(fetch_req_t *r);
/* Drops answers that expired (or all unused ones) and are not being refreshed. */
void wxd__fetch_dns_sweep(wxd_fetch_pool_t *p, int all_idle);

/* fetchtls.c */
int wxd__fetch_settings_id(const wxd_tls_client_conf_t *c, unsigned char id[32]);
fetch_ctx_t *wxd__fetch_ctx_get(wxd_fetch_pool_t *p, const unsigned char id[32], const wxd_tls_client_conf_t *conf,
                                char *err, size_t errlen);
void wxd__fetch_ctx_trim(wxd_fetch_pool_t *p, unsigned keep);

/* fetchpool.c */
/* Takes a parked connection, or a new one, or waits in the host's queue. */
void wxd__fetch_req_acquire(fetch_req_t *r);
fetch_host_t *wxd__fetch_host_get(wxd_fetch_pool_t *p, const char *name, int port, int tls,
                                  const unsigned char id[32]);
void wxd__fetch_host_maybe_free(fetch_host_t *h);
void wxd__fetch_host_dispatch(fetch_host_t *h);
void wxd__fetch_queue_unlink(fetch_req_t *r);
void wxd__fetch_idle_unlink(fetch_conn_t *c);
void wxd__fetch_conn_park(fetch_conn_t *c);
void wxd__fetch_conn_destroy(fetch_conn_t *c, int dispatch);

#endif
