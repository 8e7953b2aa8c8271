/* redis: see redis.h.
 *
 * Life of a connection:
 *   IDLE        never used
 *   CONNECTING  resolving, connecting, then the handshake (AUTH, SELECT);
 *               commands wait in `waiting`; one timer bounds it all
 *   READY       commands go to the output buffer and the FIFO
 *   DOWN        failed or dropped: commands fail at once until retry_at;
 *               a subscriber connection's timer reconnects by itself
 *
 * Life of a command: it is written (READY) or waits (CONNECTING), then sits
 * in the FIFO until its replies arrived. It owns a timer (the timeout, or
 * a zero-delay failure report) and is freed once the timer is closed and
 * it is in no list.
 */
#include "redis.h"

#include <hiredis/hiredis.h>
#include <lauxlib.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "log.h"
#include "buf.h"

#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 2000
#define READBUF_SIZE 16384
#define MAX_ARGS 1048576

enum { ST_IDLE = 0, ST_CONNECTING, ST_READY, ST_DOWN };
enum { L_NONE = 0, L_WAIT, L_FIFO };
enum { K_NONE = 0, K_TIMEOUT, K_CLOSED, K_CONNECT, K_AUTH };
static const char *const kind_names[] = {"", "timeout", "closed", "connect", "auth"};
enum { HS_AUTH = 1, HS_SELECT };

typedef struct rd_conn rd_conn_t;
typedef struct rd_cmd rd_cmd_t;
typedef struct wxd_redis_sub rd_sub_t;

/* One socket (one connection attempt), freed by its close callback. */
typedef struct rd_link {
  union {
    uv_handle_t handle;
    uv_stream_t stream;
    uv_tcp_t tcp;
    uv_pipe_t pipe;
  } u;
  uv_connect_t connect;
  rd_conn_t *conn; /* NULL once the connection let go of it */
  int connected;
  char rbuf[READBUF_SIZE];
} rd_link_t;

/* A name lookup; outlives the connection's interest in it. */
typedef struct rd_gai {
  uv_getaddrinfo_t req;
  rd_conn_t *conn; /* NULL once abandoned */
} rd_gai_t;

typedef struct rd_write {
  uv_write_t req;
  size_t len;
  char data[];
} rd_write_t;

struct wxd_redis_pool {
  uv_loop_t *loop;
  int worker;               /* for the log; -1 outside a server */
  rd_conn_t *conns;
};

struct rd_conn {
  rd_conn_t *next;          /* pool->conns */
  wxd_redis_pool_t *pool;   /* NULL once the pool closed it */
  uv_loop_t *loop;
  int worker;
  uv_timer_t timer;         /* connect deadline, or reconnect (subscriber) */
  uv_prepare_t flush;       /* writes `out` once per loop turn */
  int handles;              /* embedded handles not yet closed */
  unsigned refs;            /* Lua handles (CONN_MT) pointing here */
  int state;
  int sub;                  /* a subscriber connection */
  rd_link_t *link;
  rd_gai_t *gai;
  redisReader *reader;
  wxd_buf_t out;            /* formatted commands not yet written */
  rd_cmd_t *fifo_head, *fifo_tail; /* sent, awaiting replies */
  rd_cmd_t *wait_head, *wait_tail; /* waiting for the connection */
  struct sockaddr_storage addrs[4]; /* what the name resolved to */
  int naddrs, addr_i;
  int hs[2];                /* handshake replies expected (HS_*) */
  int nhs, hs_i;
  uint64_t connect_ms;
  uint64_t backoff_ms, retry_at;
  int was_ready;            /* for the log: lost vs never connected */
  int err_kind;             /* the last failure, for fast failures */
  char err[300];
  rd_sub_t *subs;
  unsigned npending;        /* commands in the FIFO or waiting */
  uint64_t seq;             /* message deliveries (subscriber) */
  /* from the URL, parsed by lua/wxd/redis.lua */
  char *key, *label, *host, *path, *user, *pass;
  int port, db;
};

struct rd_cmd {
  rd_cmd_t *next;
  rd_conn_t *conn;
  wxd_co_t *co;             /* NULL once resumed or cancelled: a tombstone */
  uv_timer_t timer;
  char *buf;                /* formatted, while waiting for the connection */
  size_t len;
  unsigned n, got;          /* replies expected, received */
  redisReply **replies;
  int list;                 /* L_* */
  int pipeline;
  int fail_kind;            /* reported by the timer */
  char detail[400];
  unsigned timer_closed : 1;
};

struct wxd_redis_sub {
  rd_sub_t *next;           /* conn->subs */
  rd_sub_t *vnext;          /* the VM's subscriptions */
  rd_conn_t *conn;
  wxd_vm_t *vm;
  rd_sub_t **box;           /* the Lua handle, or NULL */
  int fn_ref;
  int pattern;
  uint64_t mark;            /* delivery in progress (conn->seq) */
  size_t nlen;
  char *name;
};

static void conn_connect(rd_conn_t *c);
static void tcp_connect(rd_conn_t *c);
static void conn_fail(rd_conn_t *c, int kind, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void conn_maybe_free(rd_conn_t *c);
static void cmd_on_timer(uv_timer_t *t);

/* ---- commands ---- */

static void cmd_free_replies(rd_cmd_t *cmd) {
  if (!cmd->replies) return;
  for (unsigned i = 0; i < cmd->got; i++) freeReplyObject(cmd->replies[i]);
  free(cmd->replies);
  cmd->replies = NULL;
  cmd->got = 0;
}

static void cmd_maybe_free(rd_cmd_t *cmd) {
  if (!cmd->timer_closed || cmd->list != L_NONE) return;
  cmd_free_replies(cmd);
  free(cmd->buf);
  free(cmd);
}

static void cmd_timer_closed(uv_handle_t *h) {
  rd_cmd_t *cmd = h->data;
  cmd->timer_closed = 1;
  cmd_maybe_free(cmd);
}

static void cmd_close_timer(rd_cmd_t *cmd) {
  if (!uv_is_closing((uv_handle_t *)&cmd->timer)) uv_close((uv_handle_t *)&cmd->timer, cmd_timer_closed);
}

static void wait_unlink(rd_conn_t *c, rd_cmd_t *cmd) {
  rd_cmd_t **p = &c->wait_head, *prev = NULL;
  while (*p && *p != cmd) {
    prev = *p;
    p = &(*p)->next;
  }
  if (!*p) return;
  *p = cmd->next;
  if (c->wait_tail == cmd) c->wait_tail = prev;
  cmd->next = NULL;
  cmd->list = L_NONE;
  c->npending--;
}

static void list_push(rd_cmd_t **head, rd_cmd_t **tail, rd_cmd_t *cmd) {
  cmd->next = NULL;
  if (*tail) (*tail)->next = cmd;
  else *head = cmd;
  *tail = cmd;
}

/* Reports a failure from the command's own timer (see the top of redis.h). */
static void cmd_fail_later(rd_cmd_t *cmd, int kind, const char *detail) {
  if (!cmd->co || cmd->fail_kind) return;
  cmd->fail_kind = kind;
  snprintf(cmd->detail, sizeof cmd->detail, "%s", detail);
  uv_timer_start(&cmd->timer, cmd_on_timer, 0, 0);
}

/* Pushes one reply; errors inside arrays become { err = msg }. */
static void push_reply(lua_State *T, const redisReply *r) {
  switch (r->type) {
  case REDIS_REPLY_STATUS:
  case REDIS_REPLY_STRING: lua_pushlstring(T, r->str, r->len); break;
  case REDIS_REPLY_INTEGER: lua_pushnumber(T, (lua_Number)r->integer); break;
  case REDIS_REPLY_ERROR:
    lua_createtable(T, 0, 1);
    lua_pushlstring(T, r->str, r->len);
    lua_setfield(T, -2, "err");
    break;
  case REDIS_REPLY_ARRAY:
    lua_createtable(T, r->elements > 1000000 ? 1000000 : (int)r->elements, 0);
    for (size_t i = 0; i < r->elements; i++) {
      push_reply(T, r->element[i]);
      lua_rawseti(T, -2, (int)i + 1);
    }
    break;
  default: lua_pushlightuserdata(T, NULL); break; /* nil: redis.null */
  }
}

/* Resumes the coroutine with its replies (all arrived). */
static void cmd_deliver(rd_cmd_t *cmd) {
  wxd_co_t *co = cmd->co;
  cmd->co = NULL;
  uv_timer_stop(&cmd->timer);
  cmd_close_timer(cmd);
  lua_State *T = co->T;
  int n = 1;
  lua_checkstack(T, 64); /* hiredis nests arrays 7 deep at most */
  if (cmd->pipeline) {
    lua_createtable(T, (int)cmd->n, 0);
    for (unsigned i = 0; i < cmd->n; i++) {
      push_reply(T, cmd->replies[i]);
      lua_rawseti(T, -2, (int)i + 1);
    }
  } else if (cmd->replies[0]->type == REDIS_REPLY_ERROR) {
    lua_pushnil(T);
    lua_pushlstring(T, cmd->replies[0]->str, cmd->replies[0]->len);
    n = 2;
  } else {
    push_reply(T, cmd->replies[0]);
  }
  cmd_free_replies(cmd);
  wxd_co_resume(co, n);
}

/* Timeout, or a failure reported at zero delay. */
static void cmd_on_timer(uv_timer_t *t) {
  rd_cmd_t *cmd = t->data;
  wxd_co_t *co = cmd->co;
  if (!co) return;
  cmd->co = NULL;
  int kind = cmd->fail_kind ? cmd->fail_kind : K_TIMEOUT;
  if (!cmd->fail_kind) {
    rd_conn_t *c = cmd->conn;
    snprintf(cmd->detail, sizeof cmd->detail, "no reply from %s within the timeout", c->label);
    /* Not sent yet: it never will be. Sent: a tombstone until its reply. */
    if (cmd->list == L_WAIT) wait_unlink(c, cmd);
  }
  cmd_close_timer(cmd);
  lua_State *T = co->T;
  lua_pushnil(T);
  lua_pushstring(T, kind_names[kind]);
  lua_pushstring(T, cmd->detail);
  wxd_co_resume(co, 3);
}

/* The VM stops waiting (shutdown deadline): close without resuming. */
static void cmd_cancel(void *wait) {
  rd_cmd_t *cmd = wait;
  cmd->co = NULL;
  uv_timer_stop(&cmd->timer);
  if (cmd->list == L_WAIT) wait_unlink(cmd->conn, cmd);
  cmd_close_timer(cmd);
}

/* ---- output ---- */

static void on_written(uv_write_t *req, int status) {
  rd_write_t *w = (rd_write_t *)req;
  rd_link_t *link = req->handle->data;
  free(w);
  if (status != 0 && status != UV_ECANCELED && link->conn)
    conn_fail(link->conn, K_CLOSED, "writing to %s: %s", link->conn->label, uv_strerror(status));
}

static void on_flush(uv_prepare_t *p) {
  rd_conn_t *c = p->data;
  uv_prepare_stop(p);
  if (!c->link || !c->link->connected || c->out.len == 0) return;
  rd_write_t *w = malloc(sizeof *w + c->out.len);
  if (!w) {
    conn_fail(c, K_CLOSED, "out of memory");
    return;
  }
  memcpy(w->data, c->out.data, c->out.len);
  w->len = c->out.len;
  c->out.len = 0;
  uv_buf_t b = uv_buf_init(w->data, (unsigned)w->len);
  int rc = uv_write(&w->req, &c->link->u.stream, &b, 1, on_written);
  if (rc != 0) {
    free(w);
    conn_fail(c, K_CLOSED, "writing to %s: %s", c->label, uv_strerror(rc));
  }
}

static int conn_append(rd_conn_t *c, const char *data, size_t len) {
  if (wxd_buf_append(&c->out, data, len)) return -1;
  if (!uv_is_active((uv_handle_t *)&c->flush)) uv_prepare_start(&c->flush, on_flush);
  return 0;
}

/* Appends a command given as C strings. */
static int conn_append_cmd(rd_conn_t *c, int argc, const char **argv) {
  size_t lens[4];
  for (int i = 0; i < argc; i++) lens[i] = strlen(argv[i]);
  char *s = NULL;
  int n = redisFormatCommandArgv(&s, argc, argv, lens);
  if (n < 0) return -1;
  int rc = conn_append(c, s, (size_t)n);
  redisFreeCommand(s);
  return rc;
}

static void sub_send(rd_conn_t *c, const rd_sub_t *s, int subscribe) {
  const char *verb = s->pattern ? (subscribe ? "PSUBSCRIBE" : "PUNSUBSCRIBE") : (subscribe ? "SUBSCRIBE" : "UNSUBSCRIBE");
  const char *argv[2] = {verb, s->name};
  size_t lens[2] = {strlen(verb), s->nlen};
  char *out = NULL;
  int n = redisFormatCommandArgv(&out, 2, argv, lens);
  if (n < 0) return;
  conn_append(c, out, (size_t)n);
  redisFreeCommand(out);
}

/* ---- connection state ---- */

static void conn_ready(rd_conn_t *c) {
  c->state = ST_READY;
  c->backoff_ms = 0;
  c->err_kind = K_NONE;
  if (c->was_ready == 2) wxd_logf(WXD_LOG_INFO, c->worker, "redis: reconnected to %s", c->label);
  c->was_ready = 1;
  uv_timer_stop(&c->timer);
  /* Waiting commands go out in one write, in the order they were made. */
  while (c->wait_head) {
    rd_cmd_t *cmd = c->wait_head;
    c->wait_head = cmd->next;
    if (!c->wait_head) c->wait_tail = NULL;
    if (conn_append(c, cmd->buf, cmd->len)) {
      cmd->list = L_NONE;
      c->npending--;
      cmd_fail_later(cmd, K_CLOSED, "out of memory");
      continue;
    }
    free(cmd->buf);
    cmd->buf = NULL;
    cmd->list = L_FIFO;
    list_push(&c->fifo_head, &c->fifo_tail, cmd);
  }
  if (c->sub)
    for (rd_sub_t *s = c->subs; s; s = s->next) sub_send(c, s, 1);
}

static void on_link_closed(uv_handle_t *h) { free(h->data); }

static void link_drop(rd_conn_t *c) {
  rd_link_t *link = c->link;
  if (!link) return;
  c->link = NULL;
  link->conn = NULL;
  uv_close(&link->u.handle, on_link_closed);
}

static void on_reconnect_timer(uv_timer_t *t) {
  rd_conn_t *c = t->data;
  if (c->state == ST_CONNECTING) {
    conn_fail(c, K_CONNECT, "connect timeout (%llu ms) to %s", (unsigned long long)c->connect_ms, c->label);
  } else if (c->state == ST_DOWN && c->sub && c->subs) {
    conn_connect(c);
  }
}

/* Ends the connection: commands sent fail with "closed", waiting ones
 * with this failure; both through their timers. */
static void conn_fail(rd_conn_t *c, int kind, const char *fmt, ...) {
  if (c->state != ST_CONNECTING && c->state != ST_READY) return;
  char detail[sizeof c->err];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(detail, sizeof detail, fmt, ap);
  va_end(ap);
  int lost = c->state == ST_READY;
  if (!lost && kind == K_CLOSED) kind = K_CONNECT; /* never usable: a failure to connect */
  link_drop(c);
  if (c->gai) {
    c->gai->conn = NULL;
    c->gai = NULL;
  }
  if (c->reader) redisReaderFree(c->reader);
  c->reader = NULL;
  c->out.len = 0;
  c->nhs = c->hs_i = 0;
  uv_prepare_stop(&c->flush);
  uv_timer_stop(&c->timer);
  c->state = ST_DOWN;
  c->err_kind = kind;
  snprintf(c->err, sizeof c->err, "%s", detail);
  uint64_t now = uv_now(c->loop);
  if (lost) {
    /* A drop (a restart, an idle timeout): the next use reconnects. */
    c->backoff_ms = 0;
    c->retry_at = now;
    c->was_ready = 2;
    wxd_logf(WXD_LOG_WARN, c->worker, "redis: %s", detail);
  } else {
    c->backoff_ms = c->backoff_ms ? c->backoff_ms * 2 : BACKOFF_MIN_MS;
    if (c->backoff_ms > BACKOFF_MAX_MS) c->backoff_ms = BACKOFF_MAX_MS;
    c->retry_at = now + c->backoff_ms;
    wxd_logf(c->backoff_ms == BACKOFF_MIN_MS ? WXD_LOG_WARN : WXD_LOG_DEBUG, c->worker, "redis: %s", detail);
  }
  while (c->fifo_head) {
    rd_cmd_t *cmd = c->fifo_head;
    c->fifo_head = cmd->next;
    cmd->next = NULL;
    cmd->list = L_NONE;
    c->npending--;
    cmd_free_replies(cmd);
    if (cmd->co) {
      char d[sizeof cmd->detail];
      snprintf(d, sizeof d, "connection lost before the reply: %s", detail);
      cmd_fail_later(cmd, K_CLOSED, d);
    } else {
      cmd_maybe_free(cmd); /* a tombstone */
    }
  }
  c->fifo_tail = NULL;
  while (c->wait_head) {
    rd_cmd_t *cmd = c->wait_head;
    c->wait_head = cmd->next;
    cmd->next = NULL;
    cmd->list = L_NONE;
    c->npending--;
    cmd_fail_later(cmd, kind, detail);
  }
  c->wait_tail = NULL;
  if (c->sub && c->subs && c->pool) uv_timer_start(&c->timer, on_reconnect_timer, lost ? BACKOFF_MIN_MS : c->backoff_ms, 0);
}

/* ---- input ---- */

static void sub_dispatch(rd_conn_t *c, redisReply *r);

/* A reply of the handshake (AUTH, SELECT). Returns -1 when it failed. */
static int handshake_reply(rd_conn_t *c, redisReply *r) {
  int what = c->hs[c->hs_i++];
  if (r->type == REDIS_REPLY_ERROR) {
    if (what == HS_AUTH) conn_fail(c, K_AUTH, "AUTH to %s refused: %.*s", c->label, (int)r->len, r->str);
    else conn_fail(c, K_CONNECT, "SELECT %d on %s refused: %.*s", c->db, c->label, (int)r->len, r->str);
    return -1;
  }
  if (c->hs_i == c->nhs) conn_ready(c);
  return 0;
}

/* One complete reply: the handshake's, a message (subscriber), or the
 * next command's. Returns -1 when the connection ended. */
static int on_reply(rd_conn_t *c, redisReply *r) {
  if (c->hs_i < c->nhs) {
    int rc = handshake_reply(c, r);
    freeReplyObject(r);
    return rc;
  }
  if (c->sub) {
    sub_dispatch(c, r);
    freeReplyObject(r);
    return c->link ? 0 : -1;
  }
  rd_cmd_t *cmd = c->fifo_head;
  if (!cmd) {
    freeReplyObject(r);
    conn_fail(c, K_CLOSED, "unexpected reply from %s", c->label);
    return -1;
  }
  cmd->replies[cmd->got++] = r;
  if (cmd->got < cmd->n) return 0;
  c->fifo_head = cmd->next;
  if (!c->fifo_head) c->fifo_tail = NULL;
  cmd->next = NULL;
  cmd->list = L_NONE;
  c->npending--;
  if (cmd->co) cmd_deliver(cmd); /* may run Lua, which may add commands */
  else cmd_maybe_free(cmd);      /* the late reply of a timed-out command */
  return c->link ? 0 : -1;
}

static void on_alloc(uv_handle_t *h, size_t size, uv_buf_t *buf) {
  (void)size;
  rd_link_t *link = h->data;
  *buf = uv_buf_init(link->rbuf, sizeof link->rbuf);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  (void)buf;
  rd_link_t *link = s->data;
  rd_conn_t *c = link->conn;
  if (!c || nread == 0) return;
  if (nread < 0) {
    if (nread == UV_EOF) conn_fail(c, K_CLOSED, "%s closed the connection", c->label);
    else conn_fail(c, K_CLOSED, "reading from %s: %s", c->label, uv_strerror((int)nread));
    return;
  }
  if (redisReaderFeed(c->reader, link->rbuf, (size_t)nread) != REDIS_OK) {
    conn_fail(c, K_CLOSED, "bad reply from %s: %s", c->label, c->reader->errstr);
    return;
  }
  redisReader *reader = c->reader;
  while (c->link == link && c->reader == reader) {
    void *reply = NULL;
    if (redisReaderGetReply(reader, &reply) != REDIS_OK) {
      conn_fail(c, K_CLOSED, "bad reply from %s: %s", c->label, reader->errstr);
      return;
    }
    if (!reply) return;
    if (on_reply(c, reply) != 0) return;
  }
}

static void link_start(rd_conn_t *c, rd_link_t *link) {
  link->connected = 1;
  c->reader = redisReaderCreate();
  if (!c->reader) {
    conn_fail(c, K_CONNECT, "out of memory");
    return;
  }
  int rc = uv_read_start(&link->u.stream, on_alloc, on_read);
  if (rc != 0) {
    conn_fail(c, K_CONNECT, "connect to %s: %s", c->label, uv_strerror(rc));
    return;
  }
  c->nhs = c->hs_i = 0;
  if (c->pass) {
    const char *argv[3] = {"AUTH", c->user ? c->user : c->pass, c->pass};
    conn_append_cmd(c, c->user ? 3 : 2, argv);
    c->hs[c->nhs++] = HS_AUTH;
  }
  if (c->db != 0) {
    char db[16];
    snprintf(db, sizeof db, "%d", c->db);
    const char *argv[2] = {"SELECT", db};
    conn_append_cmd(c, 2, argv);
    c->hs[c->nhs++] = HS_SELECT;
  }
  if (c->nhs == 0) conn_ready(c);
}

static void on_connect(uv_connect_t *req, int status) {
  rd_link_t *link = req->data;
  rd_conn_t *c = link->conn;
  if (!c) return; /* abandoned (timeout, pool closed) */
  if (status != 0 && c->addr_i + 1 < c->naddrs) {
    /* "localhost" may be ::1 first while Redis listens on 127.0.0.1. */
    link_drop(c);
    c->addr_i++;
    tcp_connect(c);
    return;
  }
  if (status != 0) {
    conn_fail(c, K_CONNECT, "connect to %s: %s", c->label, uv_strerror(status));
    return;
  }
  link_start(c, link);
}

static rd_link_t *link_new(rd_conn_t *c) {
  rd_link_t *link = calloc(1, sizeof *link);
  if (!link) return NULL;
  link->conn = c;
  link->connect.data = link;
  int rc = c->path ? uv_pipe_init(c->loop, &link->u.pipe, 0) : uv_tcp_init(c->loop, &link->u.tcp);
  if (rc != 0) {
    free(link);
    return NULL;
  }
  link->u.handle.data = link;
  uv_unref(&link->u.handle); /* an idle connection keeps no loop alive */
  if (!c->path) uv_tcp_nodelay(&link->u.tcp, 1);
  c->link = link;
  return link;
}

static void tcp_connect(rd_conn_t *c) {
  const struct sockaddr *addr = (const struct sockaddr *)&c->addrs[c->addr_i];
  rd_link_t *link = link_new(c);
  if (!link) {
    conn_fail(c, K_CONNECT, "out of memory");
    return;
  }
  int rc = uv_tcp_connect(&link->connect, &link->u.tcp, addr, on_connect);
  if (rc != 0) conn_fail(c, K_CONNECT, "connect to %s: %s", c->label, uv_strerror(rc));
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  rd_gai_t *g = req->data;
  rd_conn_t *c = g->conn;
  free(g);
  if (c) c->gai = NULL;
  if (c && status == 0) {
    c->naddrs = c->addr_i = 0;
    for (struct addrinfo *ai = res; ai && c->naddrs < 4; ai = ai->ai_next) {
      if ((ai->ai_family != AF_INET && ai->ai_family != AF_INET6) || ai->ai_addrlen > sizeof c->addrs[0]) continue;
      memcpy(&c->addrs[c->naddrs++], ai->ai_addr, ai->ai_addrlen);
    }
  }
  if (c && status == 0 && c->naddrs > 0) tcp_connect(c);
  else if (c) conn_fail(c, K_CONNECT, "cannot resolve %s: %s", c->label, uv_strerror(status ? status : UV_EAI_NODATA));
  if (res) uv_freeaddrinfo(res);
}

static void conn_connect(rd_conn_t *c) {
  c->state = ST_CONNECTING;
  uv_update_time(c->loop);
  uv_timer_start(&c->timer, on_reconnect_timer, c->connect_ms, 0);
  if (c->path) {
    rd_link_t *link = link_new(c);
    if (!link) {
      conn_fail(c, K_CONNECT, "out of memory");
      return;
    }
    uv_pipe_connect(&link->connect, &link->u.pipe, c->path, on_connect);
    return;
  }
  struct sockaddr_storage *ss = &c->addrs[0];
  memset(ss, 0, sizeof *ss);
  c->addr_i = 0;
  c->naddrs = 1;
  if (uv_ip4_addr(c->host, c->port, (struct sockaddr_in *)ss) == 0 ||
      uv_ip6_addr(c->host, c->port, (struct sockaddr_in6 *)ss) == 0) {
    tcp_connect(c);
    return;
  }
  rd_gai_t *g = calloc(1, sizeof *g);
  if (!g) {
    conn_fail(c, K_CONNECT, "out of memory");
    return;
  }
  g->conn = c;
  g->req.data = g;
  char port[8];
  snprintf(port, sizeof port, "%d", c->port);
  struct addrinfo hints;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  int rc = uv_getaddrinfo(c->loop, &g->req, on_resolved, c->host, port, &hints);
  if (rc != 0) {
    free(g);
    conn_fail(c, K_CONNECT, "cannot resolve %s: %s", c->label, uv_strerror(rc));
    return;
  }
  c->gai = g;
}

/* Opens the connection if it may be used now. Returns 0 when commands can
 * be queued on it, or -1 when they must fail at once (c->err). */
static int conn_use(rd_conn_t *c) {
  uv_update_time(c->loop);
  if (c->state == ST_READY || c->state == ST_CONNECTING) return 0;
  if (c->state == ST_DOWN && uv_now(c->loop) < c->retry_at) return -1;
  conn_connect(c);
  return c->state == ST_DOWN ? -1 : 0;
}

/* ---- subscriptions ---- */

static void sub_run_done(wxd_co_t *co, int status) {
  if (status != 0) wxd_co_log_error(co, "redis subscriber error");
}

static int reply_is(const redisReply *r, const char *s) {
  size_t n = strlen(s);
  return r->type == REDIS_REPLY_STRING && r->len == n && strncasecmp(r->str, s, n) == 0;
}

static void sub_dispatch(rd_conn_t *c, redisReply *r) {
  if (r->type == REDIS_REPLY_ERROR) {
    wxd_logf(WXD_LOG_ERROR, c->worker, "redis: subscriber connection to %s: %.*s", c->label, (int)r->len, r->str);
    return;
  }
  if (r->type != REDIS_REPLY_ARRAY || r->elements < 3) return;
  int pattern = reply_is(r->element[0], "pmessage");
  if (!pattern && !reply_is(r->element[0], "message")) return; /* confirmations */
  if (pattern && r->elements < 4) return;
  const redisReply *name = r->element[1];
  const redisReply *channel = r->element[pattern ? 2 : 1];
  const redisReply *payload = r->element[pattern ? 3 : 2];
  if (name->type != REDIS_REPLY_STRING || channel->type != REDIS_REPLY_STRING || payload->type != REDIS_REPLY_STRING)
    return;
  /* Mark first, then deliver one at a time from the head: a callback may
   * unsubscribe (free) any subscription, or add new ones. */
  uint64_t seq = ++c->seq;
  for (rd_sub_t *s = c->subs; s; s = s->next)
    if (s->pattern == pattern && s->nlen == name->len && memcmp(s->name, name->str, name->len) == 0) s->mark = seq;
  for (;;) {
    rd_sub_t *s = c->subs;
    while (s && s->mark != seq) s = s->next;
    if (!s) break;
    s->mark = 0;
    wxd_vm_t *vm = s->vm;
    if (!vm->active) continue;
    wxd_co_t *co = wxd_co_new(vm, WXD_CO_REDIS, sub_run_done, NULL);
    if (!co) {
      wxd_log(WXD_LOG_ERROR, vm->worker, "redis subscriber: out of memory", NULL);
      continue;
    }
    lua_State *T = co->T;
    lua_rawgeti(T, LUA_REGISTRYINDEX, s->fn_ref);
    lua_pushlstring(T, payload->str, payload->len);
    lua_pushlstring(T, channel->str, channel->len);
    if (pattern) lua_pushlstring(T, name->str, name->len);
    wxd_co_resume(co, pattern ? 3 : 2);
  }
}

/* Releases a subscription: unsubscribes when it was the last on its name. */
static void sub_free(rd_sub_t *s, int unref) {
  rd_conn_t *c = s->conn;
  rd_sub_t **p = &c->subs;
  while (*p && *p != s) p = &(*p)->next;
  if (*p) *p = s->next;
  p = &s->vm->redis_subs;
  while (*p && *p != s) p = &(*p)->vnext;
  if (*p) *p = s->vnext;
  int last = 1;
  for (rd_sub_t *o = c->subs; o; o = o->next)
    if (o->pattern == s->pattern && o->nlen == s->nlen && memcmp(o->name, s->name, s->nlen) == 0) last = 0;
  if (last && c->state == ST_READY) sub_send(c, s, 0);
  if (unref) luaL_unref(s->vm->L, LUA_REGISTRYINDEX, s->fn_ref);
  if (s->box) *s->box = NULL;
  free(s->name);
  free(s);
  if (!c->subs && c->state == ST_DOWN) uv_timer_stop(&c->timer); /* nobody to reconnect for */
}

void wxd_redis_vm_close(wxd_vm_t *vm) {
  while (vm->redis_subs) sub_free(vm->redis_subs, 1);
}

/* ---- pool ---- */

static void conn_handle_closed(uv_handle_t *h) {
  rd_conn_t *c = h->data;
  c->handles--;
  conn_maybe_free(c);
}

/* Handles keep the struct (not the connection: the pool closes that), so
 * a handle outliving its pool reads a closed connection, never freed
 * memory. */
static void conn_maybe_free(rd_conn_t *c) {
  if (c->handles > 0 || c->refs > 0) return;
  wxd_buf_free(&c->out);
  free(c->key);
  free(c->label);
  free(c->host);
  free(c->path);
  free(c->user);
  free(c->pass);
  free(c);
}

/* Closes the connection for good; commands left never resume. */
static void conn_close(rd_conn_t *c) {
  c->state = ST_DOWN; /* nothing more is sent */
  while (c->subs) sub_free(c->subs, 1);
  c->pool = NULL;
  link_drop(c);
  if (c->gai) c->gai->conn = NULL;
  c->gai = NULL;
  if (c->reader) redisReaderFree(c->reader);
  c->reader = NULL;
  rd_cmd_t *lists[2] = {c->fifo_head, c->wait_head};
  c->fifo_head = c->fifo_tail = c->wait_head = c->wait_tail = NULL;
  for (int i = 0; i < 2; i++) {
    rd_cmd_t *cmd = lists[i];
    while (cmd) {
      rd_cmd_t *next = cmd->next;
      cmd->next = NULL;
      cmd->list = L_NONE;
      if (cmd->co) {
        /* Its coroutine stays suspended; the VM frees it. */
        cmd->co->cancel = NULL;
        cmd->co->wait = NULL;
        cmd->co = NULL;
      }
      uv_timer_stop(&cmd->timer);
      cmd_close_timer(cmd);
      cmd_maybe_free(cmd);
      cmd = next;
    }
  }
  c->state = ST_DOWN;
  uv_close((uv_handle_t *)&c->timer, conn_handle_closed);
  uv_close((uv_handle_t *)&c->flush, conn_handle_closed);
}

wxd_redis_pool_t *wxd_redis_pool_new(uv_loop_t *loop, int worker) {
  wxd_redis_pool_t *p = calloc(1, sizeof *p);
  if (!p) return NULL;
  p->loop = loop;
  p->worker = worker;
  /* A peer that resets the connection while we write must cost an error,
   * not the process (SIGPIPE's default). */
  struct sigaction sa;
  if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL) signal(SIGPIPE, SIG_IGN);
  return p;
}

void wxd_redis_pool_close(wxd_redis_pool_t *p) {
  if (!p) return;
  while (p->conns) {
    rd_conn_t *c = p->conns;
    p->conns = c->next;
    conn_close(c);
  }
  free(p);
}

/* ---- Lua ---- */

#define STATE_MT "wxd.redis.state"
#define SUB_MT "wxd.redis.subscription"
#define CONN_MT "wxd.redis.connection"

/* What Lua holds for a connection: a checked box (full userdata), so that
 * a wrong value raises instead of being taken for a connection. */
typedef struct rd_handle {
  rd_conn_t *conn; /* NULL once collected */
} rd_handle_t;

typedef struct rd_state {
  wxd_redis_pool_t *own; /* outside a server: this VM's pool */
} rd_state_t;

static wxd_redis_pool_t *pool_of(lua_State *L) {
  wxd_vm_t *vm = wxd_vm_get(L);
  if (vm->redis) return vm->redis;
  rd_state_t *st = lua_touserdata(L, lua_upvalueindex(1));
  if (!st->own) st->own = wxd_redis_pool_new(vm->loop, vm->worker);
  if (!st->own) luaL_error(L, "wxd.redis: out of memory");
  return st->own;
}

static const char *str_field(lua_State *L, int t, const char *k, int required) {
  lua_getfield(L, t, k);
  const char *s = NULL;
  if (lua_type(L, -1) == LUA_TSTRING) {
    size_t len;
    s = lua_tolstring(L, -1, &len);
    if (strlen(s) != len) luaL_error(L, "wxd.redis: %s contains NUL", k);
  } else if (!lua_isnil(L, -1) || required) {
    luaL_error(L, "wxd.redis: %s must be a string", k);
  }
  lua_pop(L, 1); /* the string stays anchored in the table */
  return s;
}

static lua_Number int_field(lua_State *L, int t, const char *k, lua_Number min, lua_Number max) {
  lua_getfield(L, t, k);
  lua_Number v = lua_tonumber(L, -1);
  lua_pop(L, 1);
  if (!(v >= min && v <= max) || v != floor(v)) luaL_error(L, "wxd.redis: bad %s", k);
  return v;
}

static char *dup_or_null(const char *s, int *oom) {
  if (!s) return NULL;
  char *d = strdup(s);
  if (!d) *oom = 1;
  return d;
}

static void push_handle(lua_State *L, rd_conn_t *c) {
  rd_handle_t *h = lua_newuserdata(L, sizeof *h);
  h->conn = c;
  c->refs++;
  luaL_getmetatable(L, CONN_MT);
  lua_setmetatable(L, -2);
}

static int handle_gc(lua_State *L) {
  rd_handle_t *h = luaL_checkudata(L, 1, CONN_MT);
  rd_conn_t *c = h->conn;
  h->conn = NULL;
  if (c) {
    c->refs--;
    conn_maybe_free(c); /* a no-op until its pool closed it */
  }
  return 0;
}

/* The connection of the handle at idx: raises unless it is a handle of
 * this kind (sub: a subscriber connection). */
static rd_conn_t *check_handle(lua_State *L, int idx, int sub) {
  rd_handle_t *h = luaL_checkudata(L, idx, CONN_MT);
  rd_conn_t *c = h->conn;
  if (!c || c->sub != sub) luaL_argerror(L, idx, sub ? "expected a subscriber connection" : "expected a connection");
  return c;
}

/* connection(spec, subscriber) -> a handle (CONN_MT) of the connection for
 * spec.key, made on first use. spec (lua/wxd/redis.lua): key, label,
 * host and port or path, user, password, db, connect_ms. The pool owns
 * the connection; a handle keeps only its memory, so a handle used after
 * its pool closed gets "the connection pool is closed". */
static int rd_connection(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  int sub = lua_toboolean(L, 2);
  const char *key = str_field(L, 1, "key", 1);
  const char *label = str_field(L, 1, "label", 1);
  const char *host = str_field(L, 1, "host", 0);
  const char *path = str_field(L, 1, "path", 0);
  const char *user = str_field(L, 1, "user", 0);
  const char *pass = str_field(L, 1, "password", 0);
  int port = path ? 0 : (int)int_field(L, 1, "port", 1, 65535);
  int db = (int)int_field(L, 1, "db", 0, 1e6);
  uint64_t connect_ms = (uint64_t)int_field(L, 1, "connect_ms", 1, 1e9);
  if (!host == !path) return luaL_error(L, "wxd.redis: expected a host or a path");
  if (user && !pass) return luaL_error(L, "wxd.redis: a user needs a password");
  wxd_redis_pool_t *p = pool_of(L);
  for (rd_conn_t *c = p->conns; c; c = c->next)
    if (c->sub == sub && strcmp(c->key, key) == 0) {
      push_handle(L, c);
      return 1;
    }
  rd_conn_t *c = calloc(1, sizeof *c);
  if (!c) return luaL_error(L, "wxd.redis: out of memory");
  int oom = 0;
  c->key = dup_or_null(key, &oom);
  c->label = dup_or_null(label, &oom);
  c->host = dup_or_null(host, &oom);
  c->path = dup_or_null(path, &oom);
  c->user = dup_or_null(user, &oom);
  c->pass = dup_or_null(pass, &oom);
  if (oom) {
    conn_maybe_free(c);
    return luaL_error(L, "wxd.redis: out of memory");
  }
  c->port = port;
  c->db = db;
  c->connect_ms = connect_ms;
  c->sub = sub;
  c->pool = p;
  c->loop = p->loop;
  c->worker = p->worker;
  uv_timer_init(c->loop, &c->timer);
  c->timer.data = c;
  uv_unref((uv_handle_t *)&c->timer);
  uv_prepare_init(c->loop, &c->flush);
  c->flush.data = c;
  c->handles = 2;
  c->next = p->conns;
  p->conns = c;
  push_handle(L, c);
  return 1;
}

/* A command's argument: a string, or a number written exactly. */
static const char *arg_string(lua_State *L, int idx, size_t *len, char *num, size_t numlen, const char *where) {
  int t = lua_type(L, idx);
  if (t == LUA_TSTRING) return lua_tolstring(L, idx, len);
  if (t == LUA_TNUMBER) {
    lua_Number v = lua_tonumber(L, idx);
    if (v == floor(v) && fabs(v) < 9.2e18) *len = (size_t)snprintf(num, numlen, "%lld", (long long)v);
    else *len = (size_t)snprintf(num, numlen, "%.17g", v);
    return num;
  }
  luaL_error(L, "wxd.redis: %s must be a string or a number, got %s", where, luaL_typename(L, idx));
  return NULL;
}

/* Formats the values of table t (positions 1..n), or the stack from first
 * to last when t == 0, appending to b. Raises on a bad argument, after
 * freeing b (the caller's whole command so far). */
static void format_cmd(lua_State *L, int t, int first, int last, wxd_buf_t *b, const char *where) {
  int argc = t ? (int)lua_objlen(L, t) : last - first + 1;
  if (argc < 1 || argc > MAX_ARGS) {
    wxd_buf_free(b);
    luaL_error(L, "wxd.redis: %s: %s", where, argc < 1 ? "a command needs a name" : "too many arguments");
  }
  const char **argv = malloc((size_t)argc * sizeof *argv);
  size_t *lens = malloc((size_t)argc * sizeof *lens);
  char(*nums)[32] = malloc((size_t)argc * sizeof *nums);
  if (!argv || !lens || !nums) {
    free(argv);
    free(lens);
    free(nums);
    wxd_buf_free(b);
    luaL_error(L, "wxd.redis: out of memory");
  }
  int base = lua_gettop(L);
  const char *bad = NULL;
  if (!lua_checkstack(L, t ? argc + 2 : 2)) bad = "too many arguments";
  for (int i = 0; !bad && i < argc; i++) {
    int idx = first + i;
    if (t) {
      lua_rawgeti(L, t, i + 1);
      idx = lua_gettop(L);
    }
    int ty = lua_type(L, idx);
    if (ty != LUA_TSTRING && ty != LUA_TNUMBER) {
      bad = luaL_typename(L, idx);
      break;
    }
    argv[i] = arg_string(L, idx, &lens[i], nums[i], sizeof nums[i], where);
  }
  char *s = NULL;
  int n = bad ? -1 : redisFormatCommandArgv(&s, argc, argv, lens);
  lua_settop(L, base);
  free(argv);
  free(lens);
  free(nums);
  int rc = n < 0 ? -1 : wxd_buf_append(b, s, (size_t)n);
  if (n >= 0) redisFreeCommand(s);
  if (bad || rc) {
    wxd_buf_free(b);
    if (bad) luaL_error(L, "wxd.redis: %s: arguments must be strings or numbers, got %s", where, bad);
    luaL_error(L, "wxd.redis: out of memory");
  }
}

static int fail_now(lua_State *L, rd_conn_t *c) {
  lua_pushnil(L);
  lua_pushstring(L, kind_names[c->err_kind ? c->err_kind : K_CONNECT]);
  lua_pushstring(L, c->err);
  return 3;
}

/* Queues the formatted bytes of n replies and yields. */
static int submit(lua_State *L, rd_conn_t *c, wxd_co_t *co, uint64_t timeout_ms, wxd_buf_t *b, unsigned n,
                  int pipeline) {
  if (!c->pool || conn_use(c) != 0) {
    wxd_buf_free(b);
    if (!c->pool) snprintf(c->err, sizeof c->err, "the connection pool is closed");
    return fail_now(L, c);
  }
  rd_cmd_t *cmd = calloc(1, sizeof *cmd);
  redisReply **replies = cmd ? calloc(n, sizeof *replies) : NULL;
  if (!replies) {
    free(cmd);
    wxd_buf_free(b);
    return luaL_error(L, "wxd.redis: out of memory");
  }
  cmd->replies = replies;
  cmd->conn = c;
  cmd->co = co;
  cmd->n = n;
  cmd->pipeline = pipeline;
  uv_timer_init(c->loop, &cmd->timer);
  cmd->timer.data = cmd;
  uv_timer_start(&cmd->timer, cmd_on_timer, timeout_ms, 0);
  c->npending++;
  if (c->state == ST_READY) {
    if (conn_append(c, b->data, b->len)) {
      /* Never sent: reported like any failure, from the timer. */
      cmd->list = L_NONE;
      c->npending--;
      cmd->fail_kind = K_CLOSED;
      snprintf(cmd->detail, sizeof cmd->detail, "out of memory");
      uv_timer_start(&cmd->timer, cmd_on_timer, 0, 0);
    } else {
      cmd->list = L_FIFO;
      list_push(&c->fifo_head, &c->fifo_tail, cmd);
    }
    wxd_buf_free(b);
  } else {
    cmd->buf = b->data;
    cmd->len = b->len;
    b->data = NULL;
    cmd->list = L_WAIT;
    list_push(&c->wait_head, &c->wait_tail, cmd);
  }
  return wxd_co_yield_cancellable(co, L, cmd_cancel, cmd);
}

static uint64_t check_timeout(lua_State *L, int idx) {
  lua_Number ms = luaL_checknumber(L, idx);
  luaL_argcheck(L, ms >= 1 && ms <= 1e9, idx, "expected a timeout in ms, 1..1e9");
  return (uint64_t)ms;
}

/* call(conn, timeout_ms, name, args...) -> reply | nil, err [, detail].
 * Waits. */
static int rd_call(lua_State *L) {
  rd_conn_t *c = check_handle(L, 1, 0);
  uint64_t timeout = check_timeout(L, 2);
  /* Checked before anything starts: see wxd_co_current. */
  wxd_co_t *co = wxd_co_current(L, "wxd.redis");
  wxd_buf_t b = {0};
  format_cmd(L, 0, 3, lua_gettop(L), &b, "command");
  return submit(L, c, co, timeout, &b, 1, 0);
}

/* pipeline(conn, timeout_ms, { {name, args...}, ... }) -> { reply or
 * { err = msg }, ... } | nil, kind, detail. One write, one wait. */
static int rd_pipeline(lua_State *L) {
  rd_conn_t *c = check_handle(L, 1, 0);
  uint64_t timeout = check_timeout(L, 2);
  luaL_checktype(L, 3, LUA_TTABLE);
  int n = (int)lua_objlen(L, 3);
  luaL_argcheck(L, n >= 1 && n <= MAX_ARGS, 3, "expected a non-empty list of commands");
  wxd_co_t *co = wxd_co_current(L, "wxd.redis");
  wxd_buf_t b = {0};
  for (int i = 1; i <= n; i++) {
    lua_rawgeti(L, 3, i);
    char where[40];
    snprintf(where, sizeof where, "pipeline command %d", i);
    if (!lua_istable(L, -1)) {
      wxd_buf_free(&b);
      return luaL_error(L, "wxd.redis: %s must be a table", where);
    }
    format_cmd(L, lua_gettop(L), 0, 0, &b, where);
    lua_pop(L, 1);
  }
  return submit(L, c, co, timeout, &b, (unsigned)n, 1);
}

/* subscribe(subconn, pattern, name, fn) -> handle. Does not wait: the
 * subscription starts once the subscriber connection is up. */
static int rd_subscribe(lua_State *L) {
  rd_conn_t *c = check_handle(L, 1, 1);
  if (!c->pool) return luaL_error(L, "wxd.redis: the connection pool is closed");
  int pattern = lua_toboolean(L, 2);
  size_t nlen;
  const char *name = luaL_checklstring(L, 3, &nlen);
  luaL_checktype(L, 4, LUA_TFUNCTION);
  wxd_vm_t *vm = wxd_vm_get(L);
  rd_sub_t **box = lua_newuserdata(L, sizeof *box);
  *box = NULL;
  luaL_getmetatable(L, SUB_MT);
  lua_setmetatable(L, -2);
  rd_sub_t *s = calloc(1, sizeof *s);
  char *nm = s ? malloc(nlen + 1) : NULL;
  if (!nm) {
    free(s);
    return luaL_error(L, "wxd.redis: out of memory");
  }
  memcpy(nm, name, nlen + 1);
  s->name = nm;
  s->nlen = nlen;
  s->pattern = pattern;
  s->conn = c;
  s->vm = vm;
  lua_pushvalue(L, 4);
  s->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  int first = 1;
  for (rd_sub_t *o = c->subs; o; o = o->next)
    if (o->pattern == pattern && o->nlen == nlen && memcmp(o->name, name, nlen) == 0) first = 0;
  s->next = c->subs;
  c->subs = s;
  s->vnext = vm->redis_subs;
  vm->redis_subs = s;
  s->box = box;
  *box = s;
  if (c->state == ST_READY) {
    if (first) sub_send(c, s, 1);
  } else if (!vm->redis && !vm->active) {
    /* `wxd check` loads the app without running it: no connection. */
  } else if (c->state == ST_IDLE || (c->state == ST_DOWN && !uv_is_active((uv_handle_t *)&c->timer))) {
    conn_connect(c);
  }
  return 1;
}

/* handle:unsubscribe(): no more messages. Idempotent. */
static int sub_unsubscribe(lua_State *L) {
  rd_sub_t **box = luaL_checkudata(L, 1, SUB_MT);
  if (*box) sub_free(*box, 1);
  return 0;
}

/* handle:active(): true until unsubscribed (or its generation retired). */
static int sub_active(lua_State *L) {
  rd_sub_t **box = luaL_checkudata(L, 1, SUB_MT);
  lua_pushboolean(L, *box != NULL);
  return 1;
}

/* Dropping the handle keeps the subscription (like a timer). */
static int sub_gc(lua_State *L) {
  rd_sub_t **box = luaL_checkudata(L, 1, SUB_MT);
  if (*box) (*box)->box = NULL;
  *box = NULL;
  return 0;
}

static const char *const state_names[] = {"idle", "connecting", "ready", "down"};

/* info(conn) -> { state, pending, error } for specs and status pages. */
static int rd_info(lua_State *L) {
  luaL_checkudata(L, 1, CONN_MT);
  rd_conn_t *c = ((rd_handle_t *)lua_touserdata(L, 1))->conn;
  if (!c) return luaL_argerror(L, 1, "expected a connection");
  lua_createtable(L, 0, 4);
  lua_pushstring(L, state_names[c->state]);
  lua_setfield(L, -2, "state");
  lua_pushnumber(L, c->npending);
  lua_setfield(L, -2, "pending");
  if (c->err_kind) {
    lua_pushstring(L, c->err);
    lua_setfield(L, -2, "error");
  }
  int n = 0;
  for (rd_sub_t *s = c->subs; s; s = s->next) n++;
  lua_pushnumber(L, n);
  lua_setfield(L, -2, "subscriptions");
  return 1;
}

static int state_gc(lua_State *L) {
  rd_state_t *st = lua_touserdata(L, 1);
  /* wxd script: the Lua state closes after its loop ran; the handles
   * close on the loop's last run. */
  wxd_redis_pool_close(st->own);
  st->own = NULL;
  return 0;
}

int wxd_open_redis(lua_State *L) {
  static const luaL_Reg fns[] = {{"connection", rd_connection}, {"call", rd_call},   {"pipeline", rd_pipeline},
                                 {"subscribe", rd_subscribe},   {"info", rd_info},   {NULL, NULL}};
  static const luaL_Reg sub_methods[] = {{"unsubscribe", sub_unsubscribe}, {"active", sub_active}, {NULL, NULL}};
  luaL_newmetatable(L, SUB_MT);
  lua_createtable(L, 0, 2);
  luaL_register(L, NULL, sub_methods);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, sub_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  luaL_newmetatable(L, CONN_MT);
  lua_pushcfunction(L, handle_gc);
  lua_setfield(L, -2, "__gc");
  lua_pushliteral(L, "wxd.redis.connection");
  lua_setfield(L, -2, "__metatable"); /* opaque: no method to reach */
  lua_pop(L, 1);
  rd_state_t *st = lua_newuserdata(L, sizeof *st);
  st->own = NULL;
  luaL_newmetatable(L, STATE_MT);
  lua_pushcfunction(L, state_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  int sidx = lua_gettop(L);
  lua_createtable(L, 0, 6);
  lua_pushvalue(L, sidx);
  luaL_openlib(L, NULL, fns, 1);
  lua_pushlightuserdata(L, NULL);
  lua_setfield(L, -2, "null");
  /* A replaced or freed generation receives no more pub/sub messages. */
  wxd_vm_on_close(wxd_vm_get(L), WXD_VM_ON_RETIRE | WXD_VM_ON_FREE, wxd_redis_vm_close);
  return 1;
}
