/* queue: see queue.h. */
#include "queue.h"

#include <lauxlib.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "journal.h"

#define STORE_MT "wxd.queue.store"
#define NAME_MAX_LEN 128
#define KEY_MAX_LEN 256
/* Dead letters kept per queue; the oldest go first beyond it. */
#define DEAD_MAX 10000

typedef struct q_queue q_queue_t;

typedef struct q_msg {
  struct q_msg *prev, *next;  /* its queue's live or dead list */
  struct q_msg *hnext;        /* id hash chain */
  q_queue_t *q;
  uint64_t id;
  char *key;                  /* NULL: none */
  char *payload;
  size_t plen;
  char *error;                /* last failure, or NULL */
  int64_t first_at, next_at;  /* ms since the epoch */
  int64_t lease_until;        /* in flight until (ms), when lease != 0 */
  int64_t dead_at;
  uint64_t lease;             /* 0: not in flight; else the delivery's token */
  uint32_t attempts;          /* deliveries started */
  int dead;
} q_msg_t;

typedef struct q_list {
  q_msg_t *head, *tail;
  size_t n;
} q_list_t;

struct q_queue {
  q_queue_t *next;
  char *name;
  q_list_t live;              /* pending and in flight, in push order */
  q_list_t dead;              /* oldest first */
  uint64_t pushed, delivered, retried, expired, killed;
};

typedef struct q_store {
  struct q_store *next;       /* registry */
  char *path;
  pthread_mutex_t mu;
  wxd_journal_t j;
  q_queue_t *queues;
  q_msg_t **buckets;          /* by id */
  size_t nbuckets, count;
  uint64_t next_id, next_lease;
} q_store_t;

static pthread_mutex_t registry_mu = PTHREAD_MUTEX_INITIALIZER;
static q_store_t *registry; /* every store of the process; never freed */

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static char *dup_n(const char *s, size_t len) {
  if (!s) return NULL;
  char *d = malloc(len + 1);
  if (d) {
    memcpy(d, s, len);
    d[len] = '\0';
  }
  return d;
}

/* ---- Lists, queues and the id table (st->mu held) ---- */

static void list_push(q_list_t *l, q_msg_t *m) {
  m->prev = l->tail;
  m->next = NULL;
  if (l->tail) l->tail->next = m;
  else l->head = m;
  l->tail = m;
  l->n++;
}

static void list_remove(q_list_t *l, q_msg_t *m) {
  if (m->prev) m->prev->next = m->next;
  else l->head = m->next;
  if (m->next) m->next->prev = m->prev;
  else l->tail = m->prev;
  m->prev = m->next = NULL;
  l->n--;
}

static q_queue_t *queue_get(q_store_t *st, const char *name, size_t len, int create) {
  for (q_queue_t *q = st->queues; q; q = q->next)
    if (strlen(q->name) == len && memcmp(q->name, name, len) == 0) return q;
  if (!create) return NULL;
  q_queue_t *q = calloc(1, sizeof *q);
  if (!q || !(q->name = dup_n(name, len))) {
    free(q);
    return NULL;
  }
  q->next = st->queues;
  st->queues = q;
  return q;
}

static size_t id_slot(const q_store_t *st, uint64_t id) {
  return (size_t)((id * 11400714819323198485ull) >> 20) & (st->nbuckets - 1);
}

static q_msg_t *msg_find(q_store_t *st, uint64_t id) {
  if (!st->nbuckets) return NULL;
  for (q_msg_t *m = st->buckets[id_slot(st, id)]; m; m = m->hnext)
    if (m->id == id) return m;
  return NULL;
}

static int ids_insert(q_store_t *st, q_msg_t *m) {
  if (st->count >= st->nbuckets) {
    size_t n = st->nbuckets ? st->nbuckets * 2 : 256;
    q_msg_t **b = calloc(n, sizeof *b);
    if (!b) return -1;
    size_t old = st->nbuckets;
    q_msg_t **ob = st->buckets;
    st->buckets = b;
    st->nbuckets = n;
    for (size_t i = 0; i < old; i++) {
      q_msg_t *x = ob[i];
      while (x) {
        q_msg_t *next = x->hnext;
        size_t j = id_slot(st, x->id);
        x->hnext = b[j];
        b[j] = x;
        x = next;
      }
    }
    free(ob);
  }
  size_t j = id_slot(st, m->id);
  m->hnext = st->buckets[j];
  st->buckets[j] = m;
  st->count++;
  return 0;
}

static void ids_remove(q_store_t *st, q_msg_t *m) {
  q_msg_t **p = &st->buckets[id_slot(st, m->id)];
  while (*p && *p != m) p = &(*p)->hnext;
  if (*p) {
    *p = m->hnext;
    st->count--;
  }
}

static void msg_free(q_msg_t *m) {
  free(m->key);
  free(m->payload);
  free(m->error);
  free(m);
}

static void set_error(q_msg_t *m, const char *err, size_t len) {
  char *e = err ? dup_n(err, len) : NULL;
  if (err && !e) return; /* keeps the older error: no memory */
  free(m->error);
  m->error = e;
}

/* Moves a live message to the dead-letter list (a cap drops the oldest). */
static void make_dead(q_store_t *st, q_msg_t *m, int64_t at) {
  q_queue_t *q = m->q;
  list_remove(&q->live, m);
  m->dead = 1;
  m->lease = 0;
  m->dead_at = at;
  list_push(&q->dead, m);
  q->killed++;
  while (q->dead.n > DEAD_MAX) {
    q_msg_t *old = q->dead.head;
    list_remove(&q->dead, old);
    ids_remove(st, old);
    msg_free(old);
  }
}

static void drop(q_store_t *st, q_msg_t *m) {
  list_remove(m->dead ? &m->q->dead : &m->q->live, m);
  ids_remove(st, m);
  msg_free(m);
}

/* ---- Records ---- */

enum { REC_PUSH = 'P', REC_LEASE = 'L', REC_ACK = 'A', REC_RETRY = 'N', REC_DEAD = 'D' };

static int put_push(wxd_buf_t *b, const q_msg_t *m) {
  size_t s;
  int rc = 0;
  wxd_journal_rec_begin(b, &s, &rc);
  wxd_jput_u8(b, REC_PUSH, &rc);
  wxd_jput_i64(b, (int64_t)m->id, &rc);
  wxd_jput_str(b, m->q->name, strlen(m->q->name), &rc);
  wxd_jput_str(b, m->key, m->key ? strlen(m->key) : 0, &rc);
  wxd_jput_str(b, m->payload, m->plen, &rc);
  wxd_jput_i64(b, m->first_at, &rc);
  wxd_jput_i64(b, m->next_at, &rc);
  if (rc == 0) wxd_journal_rec_end(b, s);
  return rc;
}

/* Lease, ack, retry and dead records: the id and what changed. */
static int put_change(wxd_buf_t *b, int type, const q_msg_t *m) {
  size_t s;
  int rc = 0;
  wxd_journal_rec_begin(b, &s, &rc);
  wxd_jput_u8(b, type, &rc);
  wxd_jput_i64(b, (int64_t)m->id, &rc);
  if (type != REC_ACK) wxd_jput_u32(b, m->attempts, &rc);
  if (type == REC_RETRY || type == REC_DEAD) {
    wxd_jput_i64(b, type == REC_RETRY ? m->next_at : m->dead_at, &rc);
    wxd_jput_str(b, m->error, m->error ? strlen(m->error) : 0, &rc);
  }
  if (rc == 0) wxd_journal_rec_end(b, s);
  return rc;
}

/* Appends a change record; on no memory the change stays in memory only
 * (it is in the next compaction's dump) rather than failing a delivery. */
static uint64_t journal_change(q_store_t *st, int type, const q_msg_t *m) {
  size_t mark = st->j.pending.len;
  if (put_change(&st->j.pending, type, m) != 0) {
    st->j.pending.len = mark;
    return st->j.appended;
  }
  return wxd_journal_queued(&st->j);
}

static int dump_list(const q_list_t *l, wxd_buf_t *out) {
  for (const q_msg_t *m = l->head; m; m = m->next) {
    if (put_push(out, m) != 0) return -1;
    if (m->dead) {
      if (put_change(out, REC_DEAD, m) != 0) return -1;
    } else if ((m->attempts || m->error) && put_change(out, REC_RETRY, m) != 0) {
      return -1;
    }
  }
  return 0;
}

static int store_dump(void *ctx, wxd_buf_t *out) {
  q_store_t *st = ctx;
  for (q_queue_t *q = st->queues; q; q = q->next)
    if (dump_list(&q->live, out) != 0 || dump_list(&q->dead, out) != 0) return -1;
  return 0;
}

static int store_replay(void *ctx, const unsigned char *p, size_t len, size_t off, char *err, size_t errlen) {
  q_store_t *st = ctx;
  wxd_jreader_t r = {p, len, 0, 0};
  int type = wxd_jget_u8(&r);
  uint64_t id = (uint64_t)wxd_jget_i64(&r);
  if (id >= st->next_id) st->next_id = id + 1;
  if (type == REC_PUSH) {
    size_t nl, kl, pl;
    const char *name = wxd_jget_str(&r, &nl), *key = wxd_jget_str(&r, &kl), *payload = wxd_jget_str(&r, &pl);
    int64_t first_at = wxd_jget_i64(&r), next_at = wxd_jget_i64(&r);
    if (r.bad || !name || !payload) goto bad;
    if (msg_find(st, id)) return 0; /* written twice: the first stands */
    q_queue_t *q = queue_get(st, name, nl, 1);
    q_msg_t *m = calloc(1, sizeof *m);
    if (!q || !m) {
      free(m);
      goto oom;
    }
    m->q = q;
    m->id = id;
    m->key = dup_n(key, kl);
    m->payload = dup_n(payload, pl);
    m->plen = pl;
    m->first_at = first_at;
    m->next_at = next_at;
    if ((key && !m->key) || !m->payload || ids_insert(st, m) != 0) {
      msg_free(m);
      goto oom;
    }
    list_push(&q->live, m);
    return 0;
  }
  q_msg_t *m = msg_find(st, id);
  if (type == REC_ACK) {
    if (m && !m->dead) {
      m->q->delivered++;
      drop(st, m);
    }
    return r.bad ? -1 : 0;
  }
  uint32_t attempts = wxd_jget_u32(&r);
  if (type == REC_LEASE) {
    if (r.bad) goto bad;
    /* In flight at a crash: due again now, its attempt counted. */
    if (m && !m->dead) m->attempts = attempts;
    return 0;
  }
  if (type != REC_RETRY && type != REC_DEAD) {
    snprintf(err, errlen, "queue journal %s: unknown record type at offset %zu", st->path, off);
    return -1;
  }
  int64_t at = wxd_jget_i64(&r);
  size_t el;
  const char *e = wxd_jget_str(&r, &el);
  if (r.bad) goto bad;
  if (!m || m->dead) return 0;
  m->attempts = attempts;
  set_error(m, e, el);
  if (type == REC_RETRY) m->next_at = at;
  else make_dead(st, m, at);
  return 0;
bad:
  snprintf(err, errlen, "queue journal %s: malformed record at offset %zu", st->path, off);
  return -1;
oom:
  snprintf(err, errlen, "queue journal %s: out of memory", st->path);
  return -1;
}

/* The store of `path` (NULL: memory only), opened and replayed on first use. */
static q_store_t *store_open(const char *path, char *err, size_t errlen) {
  pthread_mutex_lock(&registry_mu);
  for (q_store_t *st = registry; st; st = st->next)
    if ((!path && !st->path) || (path && st->path && strcmp(path, st->path) == 0)) {
      pthread_mutex_unlock(&registry_mu);
      return st;
    }
  q_store_t *st = calloc(1, sizeof *st);
  if (!st || (path && !(st->path = strdup(path)))) {
    free(st);
    pthread_mutex_unlock(&registry_mu);
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  st->next_id = 1;
  pthread_mutex_init(&st->mu, NULL);
  if (wxd_journal_open(&st->j, "queue journal", path, &st->mu, store_replay, store_dump, st, err, errlen) != 0) {
    /* What the replay built stays unreachable with the store: free it. */
    for (q_queue_t *q = st->queues; q;) {
      q_queue_t *next = q->next;
      while (q->live.head) drop(st, q->live.head);
      while (q->dead.head) drop(st, q->dead.head);
      free(q->name);
      free(q);
      q = next;
    }
    free(st->buckets);
    free(st->path);
    pthread_mutex_destroy(&st->mu);
    free(st);
    pthread_mutex_unlock(&registry_mu);
    return NULL;
  }
  st->next = registry;
  registry = st;
  pthread_mutex_unlock(&registry_mu);
  return st;
}

/* ---- Lua ---- */

static q_store_t *check_store(lua_State *L) { return *(q_store_t **)luaL_checkudata(L, 1, STORE_MT); }

static const char *check_name(lua_State *L, int idx, size_t *len) {
  const char *name = luaL_checklstring(L, idx, len);
  if (*len == 0 || *len > NAME_MAX_LEN) luaL_argerror(L, idx, "queue name must be 1..128 bytes");
  return name;
}

static uint64_t check_id(lua_State *L, int idx) {
  const char *s = luaL_checkstring(L, idx);
  char *end;
  unsigned long long v = strtoull(s, &end, 10);
  if (*end || end == s) luaL_argerror(L, idx, "bad message id");
  return (uint64_t)v;
}

static void push_id(lua_State *L, uint64_t id) {
  char b[24];
  snprintf(b, sizeof b, "%llu", (unsigned long long)id);
  lua_pushstring(L, b);
}

/* open(path | nil [, compact_bytes]) -> store | nil, err (compact_bytes: see journal.h) */
static int mod_open(lua_State *L) {
  const char *path = luaL_optstring(L, 1, NULL);
  char err[512] = "";
  q_store_t *st = store_open(path, err, sizeof err);
  if (!st) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  if (lua_isnumber(L, 2)) {
    pthread_mutex_lock(&st->mu);
    st->j.compact_min = st->j.compact_bytes = (size_t)lua_tonumber(L, 2);
    pthread_mutex_unlock(&st->mu);
  }
  q_store_t **box = lua_newuserdata(L, sizeof *box);
  *box = st;
  luaL_getmetatable(L, STORE_MT);
  lua_setmetatable(L, -2);
  return 1;
}

/* st:push(queue, key|nil, payload, delay_ms) -> id, "ok"|"duplicate", seq | nil, err */
static int store_push(lua_State *L) {
  q_store_t *st = check_store(L);
  size_t nl, kl = 0, pl;
  const char *name = check_name(L, 2, &nl);
  const char *key = luaL_optlstring(L, 3, NULL, &kl);
  const char *payload = luaL_checklstring(L, 4, &pl);
  lua_Number delay = luaL_optnumber(L, 5, 0);
  if (key && (kl == 0 || kl > KEY_MAX_LEN || memchr(key, 0, kl))) luaL_argerror(L, 3, "key must be 1..256 bytes");
  int64_t now = now_ms();
  pthread_mutex_lock(&st->mu);
  const char *fail = NULL;
  q_queue_t *q = queue_get(st, name, nl, 1);
  q_msg_t *m = NULL;
  const char *status = "ok";
  uint64_t seq = 0;
  if (!q) fail = "no memory";
  else if (st->j.io_errno) fail = "journal";
  if (!fail && key)
    for (q_msg_t *x = q->live.head; x; x = x->next)
      if (x->key && strcmp(x->key, key) == 0) {
        m = x;
        status = "duplicate";
        seq = st->j.appended; /* its push is in the journal by then */
        break;
      }
  if (!fail && !m) {
    m = calloc(1, sizeof *m);
    if (m) {
      m->q = q;
      m->id = st->next_id;
      m->key = dup_n(key, kl);
      m->payload = dup_n(payload, pl);
      m->plen = pl;
      m->first_at = now;
      m->next_at = now + (int64_t)(delay > 0 ? delay : 0);
    }
    size_t mark = st->j.pending.len;
    if (!m || (key && !m->key) || !m->payload || put_push(&st->j.pending, m) != 0 || ids_insert(st, m) != 0) {
      st->j.pending.len = mark;
      if (m) msg_free(m);
      m = NULL;
      fail = "no memory";
    } else {
      st->next_id++;
      list_push(&q->live, m);
      q->pushed++;
      seq = wxd_journal_queued(&st->j);
    }
  }
  uint64_t id = m ? m->id : 0;
  int io = st->j.io_errno;
  pthread_mutex_unlock(&st->mu);
  if (fail) {
    lua_pushnil(L);
    if (strcmp(fail, "journal") == 0) lua_pushfstring(L, "journal: %s", strerror(io));
    else lua_pushstring(L, fail);
    return 2;
  }
  push_id(L, id);
  lua_pushstring(L, status);
  lua_pushnumber(L, (lua_Number)seq);
  return 3;
}

/* st:sync(seq) -> true | nil, "journal: ..." once durable (yields). */
static int store_sync(lua_State *L) {
  q_store_t *st = check_store(L);
  lua_Number seq = luaL_checknumber(L, 2);
  return wxd_journal_sync(L, &st->j, (uint64_t)seq);
}

/* st:claim(queue, visibility_ms, max_attempts)
 *   -> { id, key, payload, attempt, first_at, lease, last_error } | nil, ms until the next is due (or nil) */
static int store_claim(lua_State *L) {
  q_store_t *st = check_store(L);
  size_t nl;
  const char *name = check_name(L, 2, &nl);
  int64_t visibility = (int64_t)luaL_checknumber(L, 3);
  uint32_t max_attempts = (uint32_t)luaL_checknumber(L, 4);
  int64_t now = now_ms();
  pthread_mutex_lock(&st->mu);
  q_queue_t *q = queue_get(st, name, nl, 0);
  q_msg_t *got = NULL;
  int64_t next_due = -1;
  for (q_msg_t *m = q ? q->live.head : NULL; m && !got;) {
    q_msg_t *next = m->next;
    int64_t due = m->lease ? m->lease_until : m->next_at;
    if (due > now) {
      if (next_due < 0 || due < next_due) next_due = due;
    } else {
      if (m->lease) {
        /* Its consumer never answered: that attempt failed. */
        q->expired++;
        m->lease = 0;
        set_error(m, "visibility timeout", 18);
        if (m->attempts >= max_attempts) {
          make_dead(st, m, now);
          journal_change(st, REC_DEAD, m);
          m = next;
          continue;
        }
      }
      got = m;
    }
    m = next;
  }
  if (got) {
    got->attempts++;
    got->lease = ++st->next_lease;
    got->lease_until = now + visibility;
    journal_change(st, REC_LEASE, got);
    lua_createtable(L, 0, 7);
    push_id(L, got->id);
    lua_setfield(L, -2, "id");
    if (got->key) {
      lua_pushstring(L, got->key);
      lua_setfield(L, -2, "key");
    }
    lua_pushlstring(L, got->payload, got->plen);
    lua_setfield(L, -2, "payload");
    lua_pushnumber(L, got->attempts);
    lua_setfield(L, -2, "attempt");
    lua_pushnumber(L, (lua_Number)got->first_at / 1000);
    lua_setfield(L, -2, "first_at");
    lua_pushnumber(L, (lua_Number)got->lease);
    lua_setfield(L, -2, "lease");
    if (got->error) {
      lua_pushstring(L, got->error);
      lua_setfield(L, -2, "last_error");
    }
  }
  pthread_mutex_unlock(&st->mu);
  if (got) return 1;
  lua_pushnil(L);
  if (next_due >= 0) lua_pushnumber(L, (lua_Number)(next_due - now));
  else lua_pushnil(L);
  return 2;
}

/* st:ack(id) -> true | false (not there: acknowledged before) */
static int store_ack(lua_State *L) {
  q_store_t *st = check_store(L);
  uint64_t id = check_id(L, 2);
  pthread_mutex_lock(&st->mu);
  q_msg_t *m = msg_find(st, id);
  int found = m && !m->dead;
  if (found) {
    m->q->delivered++;
    journal_change(st, REC_ACK, m);
    drop(st, m);
  }
  pthread_mutex_unlock(&st->mu);
  lua_pushboolean(L, found);
  return 1;
}

/* st:nack(id, lease, delay_ms, max_attempts, err) -> "retry" | "dead" | "stale"
 * (stale: no longer this delivery's: acknowledged, or redelivered after
 * its visibility timeout) */
static int store_nack(lua_State *L) {
  q_store_t *st = check_store(L);
  uint64_t id = check_id(L, 2);
  uint64_t lease = (uint64_t)luaL_checknumber(L, 3);
  lua_Number delay = luaL_checknumber(L, 4);
  uint32_t max_attempts = (uint32_t)luaL_checknumber(L, 5);
  size_t el;
  const char *e = luaL_optlstring(L, 6, "failed", &el);
  if (el > 1024) el = 1024;
  int64_t now = now_ms();
  const char *out = "stale";
  pthread_mutex_lock(&st->mu);
  q_msg_t *m = msg_find(st, id);
  if (m && !m->dead && m->lease == lease) {
    m->lease = 0;
    set_error(m, e, el);
    if (m->attempts >= max_attempts) {
      make_dead(st, m, now);
      journal_change(st, REC_DEAD, m);
      out = "dead";
    } else {
      m->next_at = now + (int64_t)(delay > 0 ? delay : 0);
      m->q->retried++;
      journal_change(st, REC_RETRY, m);
      out = "retry";
    }
  }
  pthread_mutex_unlock(&st->mu);
  lua_pushstring(L, out);
  return 1;
}

/* st:dead(queue, limit) -> { { id, key, payload, attempts, last_error, at }, ... } oldest first */
static int store_dead(lua_State *L) {
  q_store_t *st = check_store(L);
  size_t nl;
  const char *name = check_name(L, 2, &nl);
  lua_Integer limit = luaL_optinteger(L, 3, 100);
  lua_newtable(L);
  pthread_mutex_lock(&st->mu);
  q_queue_t *q = queue_get(st, name, nl, 0);
  int i = 0;
  for (q_msg_t *m = q ? q->dead.head : NULL; m && i < limit; m = m->next) {
    lua_createtable(L, 0, 6);
    push_id(L, m->id);
    lua_setfield(L, -2, "id");
    if (m->key) {
      lua_pushstring(L, m->key);
      lua_setfield(L, -2, "key");
    }
    lua_pushlstring(L, m->payload, m->plen);
    lua_setfield(L, -2, "payload");
    lua_pushnumber(L, m->attempts);
    lua_setfield(L, -2, "attempts");
    if (m->error) {
      lua_pushstring(L, m->error);
      lua_setfield(L, -2, "last_error");
    }
    lua_pushnumber(L, (lua_Number)m->dead_at / 1000);
    lua_setfield(L, -2, "at");
    lua_rawseti(L, -2, ++i);
  }
  pthread_mutex_unlock(&st->mu);
  return 1;
}

/* st:stats(queue) -> { pending, inflight, dead, delivered, pushed, retried, expired, commits, compactions } */
static int store_stats(lua_State *L) {
  q_store_t *st = check_store(L);
  size_t nl;
  const char *name = check_name(L, 2, &nl);
  lua_Number v[9] = {0};
  int64_t now = now_ms();
  pthread_mutex_lock(&st->mu);
  q_queue_t *q = queue_get(st, name, nl, 0);
  if (q) {
    for (q_msg_t *m = q->live.head; m; m = m->next) {
      if (m->lease && m->lease_until > now) v[1]++;
      else v[0]++;
    }
    v[2] = (lua_Number)q->dead.n;
    v[3] = (lua_Number)q->delivered;
    v[4] = (lua_Number)q->pushed;
    v[5] = (lua_Number)q->retried;
    v[6] = (lua_Number)q->expired;
  }
  v[7] = (lua_Number)st->j.commits;
  v[8] = (lua_Number)st->j.compactions;
  pthread_mutex_unlock(&st->mu);
  static const char *const names[9] = {"pending", "inflight", "dead", "delivered", "pushed",
                                       "retried", "expired", "commits", "compactions"};
  lua_createtable(L, 0, 9);
  for (int i = 0; i < 9; i++) {
    lua_pushnumber(L, v[i]);
    lua_setfield(L, -2, names[i]);
  }
  return 1;
}

int wxd_open_queue(lua_State *L) {
  static const luaL_Reg methods[] = {{"push", store_push}, {"sync", store_sync}, {"claim", store_claim},
                                     {"ack", store_ack},   {"nack", store_nack}, {"dead", store_dead},
                                     {"stats", store_stats}, {NULL, NULL}};
  luaL_newmetatable(L, STORE_MT);
  lua_createtable(L, 0, 7);
  luaL_register(L, NULL, methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, mod_open);
  lua_setfield(L, -2, "open");
  return 1;
}
