/* paystate: see paystate.h. */
#include "paystate.h"

#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <limits.h>
#include <stdarg.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "buf.h"
#include "journal.h"
#include "log.h"
#include "vm.h"

/* ---- The transition table ---- */

enum {
  S_CREATED, S_PAYING, S_PAID, S_FAILED, S_CONFIRMED, S_CLOSED, S_REFUNDING, S_REFUNDED, S_REFUND_FAILED,
  S_COUNT
};

static const char *const state_names[S_COUNT] = {
    "CREATED", "PAYING", "PAID", "FAILED", "CONFIRMED", "CLOSED", "REFUNDING", "REFUNDED", "REFUND_FAILED",
};

#define TO(s) (1u << (s))
/* legal_to[from] has bit `to` set when from -> to is legal (docs/order.md). */
static const unsigned legal_to[S_COUNT] = {
    [S_CREATED] = TO(S_PAYING) | TO(S_CLOSED),
    [S_PAYING] = TO(S_PAID) | TO(S_FAILED) | TO(S_CLOSED),
    [S_PAID] = TO(S_CONFIRMED) | TO(S_REFUNDING),
    [S_FAILED] = 0,
    [S_CONFIRMED] = TO(S_REFUNDING),
    [S_CLOSED] = 0,
    [S_REFUNDING] = TO(S_REFUNDED) | TO(S_REFUND_FAILED),
    [S_REFUNDED] = 0,
    [S_REFUND_FAILED] = TO(S_REFUNDING),
};
/* An illegal event into one of these states means money moved that the
 * order no longer expects (a payment success for a CLOSED order): it is a
 * "late" event, recorded with the order for reconciliation. */
static const unsigned late_targets = TO(S_PAID) | TO(S_REFUNDED);

static int is_legal(int from, int to) { return (legal_to[from] & TO(to)) != 0; }
static int is_late(int from, int to) { return from != to && (late_targets & TO(to)) != 0; }

static int state_parse(const char *s) {
  for (int i = 0; i < S_COUNT; i++)
    if (strcmp(s, state_names[i]) == 0) return i;
  return -1;
}

/* ---- Orders ---- */

typedef struct ps_entry {
  uint8_t from, to;
  int64_t at;
  char *event, *key, *data; /* data: JSON text or NULL */
} ps_entry_t;

typedef struct ps_list {
  ps_entry_t *v;
  size_t n, cap;
} ps_list_t;

typedef struct ps_order {
  struct ps_order *next;  /* hash chain */
  char *no, *currency, *appid, *mchid, *openid, *description, *key;
  int64_t amount, created_at, updated_at, version;
  int state;
  ps_list_t hist;         /* transitions, oldest first */
  ps_list_t late;         /* late events, oldest first */
  uint64_t seq;           /* journal sequence of its last change */
  uint64_t forget_seq;    /* nonzero: forgotten (retention) by the FORGET record of this sequence; the
                           * order is invisible and freed once that record is durable */
  struct ps_order *limbo_next; /* in st->limbo while forgotten but not yet freed */
} ps_order_t;

typedef struct ps_store {
  struct ps_store *next;  /* registry */
  char *path;             /* journal; NULL: memory only */
  pthread_mutex_t mu;
  ps_order_t **buckets;
  size_t nbuckets, count;
  wxd_journal_t j;        /* records, sequence numbers, durability (core/journal.c) */
  uint64_t n_transitions, n_duplicates, n_illegal, n_late, n_forgotten;
  ps_order_t *limbo;      /* forgotten orders whose FORGET record is not yet durable */
  size_t n_limbo;
  int sweeping;           /* a forget_due is between its scan and its FORGET records */
  size_t sweep_at;        /* bucket where the next forget_due scan starts (batches resume) */
} ps_store_t;

static pthread_mutex_t registry_mu = PTHREAD_MUTEX_INITIALIZER;
static ps_store_t *registry; /* every store of the process; never freed */

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint64_t hash_str(const char *s) {
  uint64_t h = 1469598103934665603ull;
  for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
  return h;
}

/* The live order `no`, or NULL. A forgotten order still in the table (its
 * FORGET record not yet durable) is not found; *gone_seq, when given, gets
 * the sequence a "not found" must wait for then (0: none). */
static ps_order_t *order_find_seq(ps_store_t *st, const char *no, uint64_t *gone_seq) {
  if (gone_seq) *gone_seq = 0;
  if (!st->nbuckets) return NULL;
  for (ps_order_t *o = st->buckets[hash_str(no) & (st->nbuckets - 1)]; o; o = o->next)
    if (strcmp(o->no, no) == 0) {
      if (!o->forget_seq) return o;
      if (gone_seq && o->forget_seq > *gone_seq) *gone_seq = o->forget_seq;
    }
  return NULL;
}

static ps_order_t *order_find(ps_store_t *st, const char *no) { return order_find_seq(st, no, NULL); }

/* Takes this very order out of its hash chain (the table is chained, so
 * the other orders' places do not move). */
static void store_unlink(ps_store_t *st, ps_order_t *o) {
  ps_order_t **pp = &st->buckets[hash_str(o->no) & (st->nbuckets - 1)];
  while (*pp && *pp != o) pp = &(*pp)->next;
  if (*pp) {
    *pp = o->next;
    st->count--;
  }
}

/* Makes room for one more order; -1 when out of memory. */
static int store_grow(ps_store_t *st) {
  if (st->count < st->nbuckets) return 0;
  size_t n = st->nbuckets ? st->nbuckets * 2 : 64;
  ps_order_t **b = calloc(n, sizeof *b);
  if (!b) return -1;
  for (size_t i = 0; i < st->nbuckets; i++) {
    ps_order_t *o = st->buckets[i];
    while (o) {
      ps_order_t *next = o->next;
      size_t j = hash_str(o->no) & (n - 1);
      o->next = b[j];
      b[j] = o;
      o = next;
    }
  }
  free(st->buckets);
  st->buckets = b;
  st->nbuckets = n;
  return 0;
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

static void entry_free(ps_entry_t *e) {
  free(e->event);
  free(e->key);
  free(e->data);
}

static void order_free(ps_order_t *o) {
  for (size_t i = 0; i < o->hist.n; i++) entry_free(&o->hist.v[i]);
  for (size_t i = 0; i < o->late.n; i++) entry_free(&o->late.v[i]);
  free(o->hist.v);
  free(o->late.v);
  free(o->no);
  free(o->currency);
  free(o->appid);
  free(o->mchid);
  free(o->openid);
  free(o->description);
  free(o->key);
  free(o);
}

static int list_reserve(ps_list_t *l) {
  if (l->n < l->cap) return 0;
  size_t cap = l->cap ? l->cap * 2 : 4;
  ps_entry_t *v = realloc(l->v, cap * sizeof *v);
  if (!v) return -1;
  l->v = v;
  l->cap = cap;
  return 0;
}

/* ---- Encoding: journal records and snapshots share one format ----
 * (core/journal.c's little-endian integers and length-prefixed strings) */

static int put_u32(wxd_buf_t *b, uint32_t v) {
  int rc = 0;
  wxd_jput_u32(b, v, &rc);
  return rc;
}

static int put_i64(wxd_buf_t *b, int64_t v) {
  int rc = 0;
  wxd_jput_i64(b, v, &rc);
  return rc;
}

static int put_u8(wxd_buf_t *b, int v) {
  int rc = 0;
  wxd_jput_u8(b, v, &rc);
  return rc;
}

/* A string; NULL stays NULL. */
static int put_str(wxd_buf_t *b, const char *s) {
  int rc = 0;
  wxd_jput_str(b, s, s ? strlen(s) : 0, &rc);
  return rc;
}

static char *get_dup(wxd_jreader_t *r, int *oom) {
  size_t len;
  const char *s = wxd_jget_str(r, &len);
  if (!s) return NULL;
  char *d = dup_n(s, len);
  if (!d) *oom = 1;
  return d;
}

/* Longest out_trade_no the store takes (WeChat Pay allows 32). */
#define PS_NO_MAX 128

/* FORGET (retention): the order left the store; its archive line is on
 * disk already. A journal without them replays as before; code older than
 * them refuses a journal that has one (unknown record type). */
enum { REC_CREATE = 'C', REC_TRANSITION = 'T', REC_LATE = 'L', REC_FORGET = 'F' };

/* Appends a record around the payload (length, crc: core/journal.c). */
static int rec_begin(wxd_buf_t *b, size_t *start) {
  int rc = 0;
  wxd_journal_rec_begin(b, start, &rc);
  return rc;
}

static void rec_end(wxd_buf_t *b, size_t start) { wxd_journal_rec_end(b, start); }

static int put_create(wxd_buf_t *b, const ps_order_t *o) {
  size_t s;
  int rc = rec_begin(b, &s) | put_u8(b, REC_CREATE) | put_str(b, o->no) | put_i64(b, o->amount) |
           put_str(b, o->currency) | put_str(b, o->appid) | put_str(b, o->mchid) | put_str(b, o->openid) |
           put_str(b, o->description) | put_str(b, o->key) | put_i64(b, o->created_at);
  if (rc == 0) rec_end(b, s);
  return rc;
}

static int put_entry(wxd_buf_t *b, int type, const char *no, int64_t version, const ps_entry_t *e) {
  size_t s;
  int rc = rec_begin(b, &s) | put_u8(b, type) | put_str(b, no) | put_u8(b, e->from) | put_u8(b, e->to) |
           put_i64(b, version) | put_i64(b, e->at) | put_str(b, e->event) | put_str(b, e->key) |
           put_str(b, e->data);
  if (rc == 0) rec_end(b, s);
  return rc;
}

static int put_forget(wxd_buf_t *b, const ps_order_t *o, int64_t at) {
  size_t s;
  int rc = rec_begin(b, &s) | put_u8(b, REC_FORGET) | put_str(b, o->no) | put_i64(b, o->version) | put_i64(b, at);
  if (rc == 0) rec_end(b, s);
  return rc;
}

/* A whole order, for the caller to turn into a Lua table outside the lock. */
static int put_snapshot(wxd_buf_t *b, const ps_order_t *o) {
  int rc = put_str(b, o->no) | put_i64(b, o->amount) | put_str(b, o->currency) | put_str(b, o->appid) |
           put_str(b, o->mchid) | put_str(b, o->openid) | put_str(b, o->description) | put_i64(b, o->created_at) |
           put_i64(b, o->updated_at) | put_i64(b, o->version) | put_u8(b, o->state) |
           put_u32(b, (uint32_t)o->hist.n) | put_u32(b, (uint32_t)o->late.n);
  const ps_list_t *lists[2] = {&o->hist, &o->late};
  for (int l = 0; l < 2; l++)
    for (size_t i = 0; i < lists[l]->n; i++) {
      const ps_entry_t *e = &lists[l]->v[i];
      rc |= put_u8(b, e->from) | put_u8(b, e->to) | put_i64(b, e->at) | put_str(b, e->event) |
            put_str(b, e->key) | put_str(b, e->data);
    }
  return rc;
}

/* ---- Applying changes (live and at replay) ---- */

static int store_insert(ps_store_t *st, ps_order_t *o) {
  if (store_grow(st) != 0) return -1;
  size_t j = hash_str(o->no) & (st->nbuckets - 1);
  o->next = st->buckets[j];
  st->buckets[j] = o;
  st->count++;
  return 0;
}

/* Appends a copy of the entry to the order's list; -1 when out of memory. */
static int entry_add(ps_list_t *l, int from, int to, int64_t at, const char *event, const char *key,
                     const char *data) {
  if (list_reserve(l) != 0) return -1;
  ps_entry_t e = {(uint8_t)from, (uint8_t)to, at, dup_n(event, event ? strlen(event) : 0),
                  dup_n(key, key ? strlen(key) : 0), dup_n(data, data ? strlen(data) : 0)};
  if ((event && !e.event) || (key && !e.key) || (data && !e.data)) {
    entry_free(&e);
    return -1;
  }
  l->v[l->n++] = e;
  return 0;
}

/* ---- The journal ---- */

/* A record is in st->j.pending (appended under st->mu): its sequence number. */
static uint64_t journal_queued(ps_store_t *st) { return wxd_journal_queued(&st->j); }

/* Replays one record into st (wxd_journal_open's callback). Returns 0, or
 * -1 with err set: records that contradict each other fail the open. */
static int journal_replay(void *ctx, const unsigned char *payload, size_t plen, size_t off, char *err,
                          size_t errlen) {
  ps_store_t *st = ctx;
  wxd_jreader_t r = {payload, plen, 0, 0};
  int type = wxd_jget_u8(&r);
  int oom = 0;
  size_t nolen;
  const char *nop = wxd_jget_str(&r, &nolen);
  char no[PS_NO_MAX + 1];
  if (!nop || nolen >= sizeof no) {
    snprintf(err, errlen, "order journal %s: malformed record at offset %zu", st->path, off);
    return -1;
  }
  memcpy(no, nop, nolen);
  no[nolen] = '\0';
  ps_order_t *o = order_find(st, no);
  if (type == REC_CREATE) {
    ps_order_t *n = calloc(1, sizeof *n);
    if (!n) goto oom;
    n->no = dup_n(no, nolen);
    n->amount = wxd_jget_i64(&r);
    n->currency = get_dup(&r, &oom);
    n->appid = get_dup(&r, &oom);
    n->mchid = get_dup(&r, &oom);
    n->openid = get_dup(&r, &oom);
    n->description = get_dup(&r, &oom);
    n->key = get_dup(&r, &oom);
    n->created_at = n->updated_at = wxd_jget_i64(&r);
    if (!n->no || oom || r.bad || o || store_insert(st, n) != 0) {
      order_free(n);
      if (oom || (!r.bad && !o)) goto oom;
      snprintf(err, errlen, "order journal %s: bad create record for %s at offset %zu", st->path, no, off);
      return -1;
    }
  } else if (type == REC_TRANSITION || type == REC_LATE) {
    int from = wxd_jget_u8(&r), to = wxd_jget_u8(&r);
    int64_t version = wxd_jget_i64(&r), at = wxd_jget_i64(&r);
    size_t el, kl, dl;
    const char *ev = wxd_jget_str(&r, &el), *key = wxd_jget_str(&r, &kl), *dat = wxd_jget_str(&r, &dl);
    if (r.bad || !o || !key || from >= S_COUNT || to >= S_COUNT ||
        (type == REC_TRANSITION && (o->state != from || version != o->version + 1))) {
      snprintf(err, errlen, "order journal %s: inconsistent record for %s at offset %zu", st->path, no, off);
      return -1;
    }
    char *e = dup_n(ev, el), *k = dup_n(key, kl), *d = dup_n(dat, dl);
    int rc = (ev && !e) || (key && !k) || (dat && !d) ? -1
             : entry_add(type == REC_TRANSITION ? &o->hist : &o->late, from, to, at, e, k, d);
    free(e);
    free(k);
    free(d);
    if (rc != 0) goto oom;
    if (type == REC_TRANSITION) {
      o->state = to;
      o->version = version;
      o->updated_at = at;
    }
  } else if (type == REC_FORGET) {
    int64_t version = wxd_jget_i64(&r);
    (void)wxd_jget_i64(&r); /* when: for people reading the journal */
    if (r.bad || !o || version != o->version) {
      snprintf(err, errlen, "order journal %s: inconsistent record for %s at offset %zu", st->path, no, off);
      return -1;
    }
    store_unlink(st, o);
    order_free(o);
  } else {
    snprintf(err, errlen, "order journal %s: unknown record type at offset %zu", st->path, off);
    return -1;
  }
  return 0;
oom:
  snprintf(err, errlen, "order journal %s: out of memory", st->path);
  return -1;
}

/* Every order as records, into b (wxd_journal_open's callback; st->mu held). */
static int journal_dump(void *ctx, wxd_buf_t *b) {
  ps_store_t *st = ctx;
  for (size_t i = 0; i < st->nbuckets; i++)
    for (ps_order_t *o = st->buckets[i]; o; o = o->next) {
      if (o->forget_seq) continue; /* its FORGET record is pending: the dump is what remains */
      if (put_create(b, o) != 0) return -1;
      for (size_t j = 0; j < o->hist.n; j++)
        if (put_entry(b, REC_TRANSITION, o->no, (int64_t)j + 1, &o->hist.v[j]) != 0) return -1;
      for (size_t j = 0; j < o->late.n; j++)
        if (put_entry(b, REC_LATE, o->no, 0, &o->late.v[j]) != 0) return -1;
    }
  return 0;
}

static void store_free(ps_store_t *st) {
  for (size_t i = 0; i < st->nbuckets; i++) {
    ps_order_t *o = st->buckets[i];
    while (o) {
      ps_order_t *next = o->next;
      order_free(o);
      o = next;
    }
  }
  free(st->buckets);
  free(st->path);
  pthread_mutex_destroy(&st->mu);
  free(st);
}

/* The store of `path` (NULL: the process's memory-only store), opened and
 * replayed on first use. */
static ps_store_t *store_open(const char *path, char *err, size_t errlen) {
  pthread_mutex_lock(&registry_mu);
  for (ps_store_t *st = registry; st; st = st->next)
    if ((!path && !st->path) || (path && st->path && strcmp(path, st->path) == 0)) {
      pthread_mutex_unlock(&registry_mu);
      return st;
    }
  ps_store_t *st = calloc(1, sizeof *st);
  if (!st || (path && !(st->path = strdup(path)))) {
    free(st);
    pthread_mutex_unlock(&registry_mu);
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  pthread_mutex_init(&st->mu, NULL);
  /* Replayed, then compacted at open; no compaction while running
   * (compact_bytes 0): the file grows until the next start, which also
   * leaves forgotten orders out. */
  if (wxd_journal_open(&st->j, "order journal", path, &st->mu, journal_replay, journal_dump, st, err, errlen) != 0) {
    store_free(st);
    pthread_mutex_unlock(&registry_mu);
    return NULL;
  }
  st->j.compact_bytes = 0;
  if (path) wxd_logf(WXD_LOG_INFO, -1, "order journal %s: %zu orders", path, st->count);
  st->next = registry;
  registry = st;
  pthread_mutex_unlock(&registry_mu);
  return st;
}

/* ---- Operations: under st->mu, no Lua ---- */

typedef struct ps_result {
  int is_order;     /* 1: snapshot + status; 0: nil + msg */
  wxd_buf_t snap;
  const char *status; /* "ok" | "duplicate" */
  char msg[128];
  int late;         /* msg is an illegal transition that was recorded as late */
  uint64_t seq;     /* durable from this sequence on */
} ps_result_t;

static void result_error(ps_result_t *r, const char *msg) {
  r->is_order = 0;
  snprintf(r->msg, sizeof r->msg, "%s", msg);
}

static void result_order(ps_result_t *r, const ps_order_t *o, const char *status) {
  r->is_order = 1;
  r->status = status;
  r->seq = o->seq;
  if (put_snapshot(&r->snap, o) != 0) result_error(r, "no memory");
}

static void result_io_error(ps_store_t *st, ps_result_t *r) {
  snprintf(r->msg, sizeof r->msg, "journal: %s", strerror(st->j.io_errno));
  r->is_order = 0;
}

typedef struct create_args {
  const char *no, *currency, *appid, *mchid, *openid, *description, *key;
  int64_t amount;
} create_args_t;

static int same_str(const char *a, const char *b) { return (!a && !b) || (a && b && strcmp(a, b) == 0); }

static void op_create(ps_store_t *st, const create_args_t *a, ps_result_t *r) {
  ps_order_t *o = order_find(st, a->no);
  if (o) {
    int same = o->amount == a->amount && same_str(o->currency, a->currency) && same_str(o->appid, a->appid) &&
               same_str(o->mchid, a->mchid) && same_str(o->openid, a->openid);
    if ((a->key && same_str(a->key, o->key)) || same) {
      st->n_duplicates++;
      result_order(r, o, "duplicate");
    } else {
      result_error(r, "exists");
    }
    return;
  }
  if (st->j.io_errno) return result_io_error(st, r);
  ps_order_t *n = calloc(1, sizeof *n);
  if (!n) return result_error(r, "no memory");
  n->no = strdup(a->no);
  n->currency = strdup(a->currency);
  n->appid = dup_n(a->appid, a->appid ? strlen(a->appid) : 0);
  n->mchid = dup_n(a->mchid, a->mchid ? strlen(a->mchid) : 0);
  n->openid = dup_n(a->openid, a->openid ? strlen(a->openid) : 0);
  n->description = dup_n(a->description, a->description ? strlen(a->description) : 0);
  n->key = dup_n(a->key, a->key ? strlen(a->key) : 0);
  n->amount = a->amount;
  n->created_at = n->updated_at = now_ms();
  n->state = S_CREATED;
  size_t mark = st->j.pending.len;
  if (!n->no || !n->currency || (a->appid && !n->appid) || (a->mchid && !n->mchid) ||
      (a->openid && !n->openid) || (a->description && !n->description) || (a->key && !n->key) ||
      put_create(&st->j.pending, n) != 0 || store_insert(st, n) != 0) {
    st->j.pending.len = mark;
    order_free(n);
    return result_error(r, "no memory");
  }
  n->seq = journal_queued(st);
  result_order(r, n, "ok");
}

typedef struct transition_args {
  const char *no, *key, *event, *data;
  int to;
  int64_t expect_version; /* -1: any */
  /* A notification's check against the order (transition_checked): */
  int check;              /* compare the fields below first */
  const char *mchid, *appid, *currency; /* NULL: must be absent (appid: check_appid) */
  int check_appid;
  double amount;
  const char *ref;        /* JSON text `"field":value`: an entry into `to` under another key
                           * whose data holds it means the event was applied before */
} transition_args_t;

/* The checks of a notification against its order, under the same lock as
 * its transition: 0 to go on, else r holds the answer. */
static int check_notification(ps_store_t *st, ps_order_t *o, const transition_args_t *a, ps_result_t *r) {
  (void)st;
  if (!same_str(o->mchid, a->mchid)) return result_error(r, "mchid mismatch"), 1;
  if (a->check_appid && !same_str(o->appid, a->appid)) return result_error(r, "appid mismatch"), 1;
  if ((double)o->amount != a->amount) return result_error(r, "amount mismatch"), 1;
  if (!same_str(o->currency, a->currency)) return result_error(r, "currency mismatch"), 1;
  if (a->ref)
    for (size_t i = 0; i < o->hist.n; i++) {
      const ps_entry_t *e = &o->hist.v[i];
      if (e->to == a->to && strcmp(e->key, a->key) != 0 && e->data && strstr(e->data, a->ref)) {
        result_order(r, o, "already");
        return 1;
      }
    }
  return 0;
}

static void op_transition(ps_store_t *st, const transition_args_t *a, ps_result_t *r) {
  ps_order_t *o = order_find_seq(st, a->no, &r->seq);
  if (!o) return result_error(r, "not found"); /* once its FORGET record, if any, is durable */
  if (a->check && check_notification(st, o, a, r)) return;
  /* The key first: a retried event is a duplicate even when the order has
   * moved on since (PAID, then CONFIRMED, then PAID's retry). */
  for (size_t i = 0; i < o->hist.n; i++)
    if (strcmp(o->hist.v[i].key, a->key) == 0) {
      if (o->hist.v[i].to != a->to) return result_error(r, "key reused for another transition");
      st->n_duplicates++;
      return result_order(r, o, "duplicate");
    }
  for (size_t i = 0; i < o->late.n; i++)
    if (strcmp(o->late.v[i].key, a->key) == 0) {
      snprintf(r->msg, sizeof r->msg, "illegal transition %s -> %s", state_names[o->late.v[i].from],
               state_names[o->late.v[i].to]);
      r->seq = o->seq; /* recorded already: durable once the order is */
      return;
    }
  if (a->expect_version >= 0 && a->expect_version != o->version) return result_error(r, "version conflict");
  int from = o->state;
  if (!is_legal(from, a->to)) {
    snprintf(r->msg, sizeof r->msg, "illegal transition %s -> %s", state_names[from], state_names[a->to]);
    if (!is_late(from, a->to)) {
      st->n_illegal++;
      return;
    }
    if (st->j.io_errno) return result_io_error(st, r);
    size_t mark = st->j.pending.len;
    ps_entry_t e = {(uint8_t)from, (uint8_t)a->to, now_ms(), (char *)a->event, (char *)a->key, (char *)a->data};
    if (put_entry(&st->j.pending, REC_LATE, o->no, 0, &e) != 0 ||
        entry_add(&o->late, from, a->to, e.at, a->event, a->key, a->data) != 0) {
      st->j.pending.len = mark;
      return result_error(r, "no memory");
    }
    st->n_late++;
    r->late = 1;
    o->seq = r->seq = journal_queued(st);
    return;
  }
  if (st->j.io_errno) return result_io_error(st, r);
  size_t mark = st->j.pending.len;
  ps_entry_t e = {(uint8_t)from, (uint8_t)a->to, now_ms(), (char *)a->event, (char *)a->key, (char *)a->data};
  if (put_entry(&st->j.pending, REC_TRANSITION, o->no, o->version + 1, &e) != 0 ||
      entry_add(&o->hist, from, a->to, e.at, a->event, a->key, a->data) != 0) {
    st->j.pending.len = mark;
    return result_error(r, "no memory");
  }
  o->state = a->to;
  o->version++;
  o->updated_at = e.at;
  o->seq = journal_queued(st);
  st->n_transitions++;
  result_order(r, o, "ok");
}

/* ---- Lua ---- */

#define STORE_MT "wxd.order.store"

static ps_store_t *check_store(lua_State *L) {
  ps_store_t **box = luaL_checkudata(L, 1, STORE_MT);
  return *box;
}

static void push_entry(lua_State *L, wxd_jreader_t *r) {
  int from = wxd_jget_u8(r), to = wxd_jget_u8(r);
  int64_t at = wxd_jget_i64(r);
  lua_createtable(L, 0, 6);
  lua_pushstring(L, state_names[from < S_COUNT ? from : 0]);
  lua_setfield(L, -2, "from");
  lua_pushstring(L, state_names[to < S_COUNT ? to : 0]);
  lua_setfield(L, -2, "to");
  lua_pushnumber(L, (lua_Number)at);
  lua_setfield(L, -2, "at");
  static const char *const names[3] = {"event", "key", "data"};
  for (int i = 0; i < 3; i++) {
    size_t len;
    const char *s = wxd_jget_str(r, &len);
    if (!s) continue;
    lua_pushlstring(L, s, len);
    lua_setfield(L, -2, names[i]);
  }
}

static void push_snapshot(lua_State *L, const wxd_buf_t *b) {
  wxd_jreader_t r = {(const unsigned char *)b->data, b->len, 0, 0};
  lua_createtable(L, 0, 14);
  size_t len;
  const char *s = wxd_jget_str(&r, &len);
  lua_pushlstring(L, s ? s : "", len);
  lua_setfield(L, -2, "out_trade_no");
  lua_pushnumber(L, (lua_Number)wxd_jget_i64(&r));
  lua_setfield(L, -2, "amount");
  static const char *const strs[] = {"currency", "appid", "mchid", "payer_openid", "description"};
  for (int i = 0; i < 5; i++) {
    s = wxd_jget_str(&r, &len);
    if (!s) continue;
    lua_pushlstring(L, s, len);
    lua_setfield(L, -2, strs[i]);
  }
  lua_pushnumber(L, (lua_Number)wxd_jget_i64(&r));
  lua_setfield(L, -2, "created_at");
  lua_pushnumber(L, (lua_Number)wxd_jget_i64(&r));
  lua_setfield(L, -2, "updated_at");
  lua_pushnumber(L, (lua_Number)wxd_jget_i64(&r));
  lua_setfield(L, -2, "version");
  int state = wxd_jget_u8(&r);
  lua_pushstring(L, state_names[state < S_COUNT ? state : 0]);
  lua_setfield(L, -2, "state");
  uint32_t nh = wxd_jget_u32(&r), nl = wxd_jget_u32(&r);
  const char *lists[2] = {"history", "late"};
  uint32_t counts[2] = {nh, nl};
  for (int l = 0; l < 2; l++) {
    lua_createtable(L, (int)counts[l], 0);
    for (uint32_t i = 0; i < counts[l] && !r.bad; i++) {
      push_entry(L, &r);
      lua_rawseti(L, -2, (int)i + 1);
    }
    lua_setfield(L, -2, lists[l]);
  }
}

/* Pushes a result: o, status | nil, msg [, "late"]. Frees the snapshot. */
static int push_result(lua_State *L, ps_result_t *r) {
  int n;
  if (r->is_order) {
    push_snapshot(L, &r->snap);
    lua_pushstring(L, r->status);
    n = 2;
  } else {
    lua_pushnil(L);
    lua_pushstring(L, r->msg);
    n = 2;
    if (r->late) {
      lua_pushliteral(L, "late");
      n = 3;
    }
  }
  wxd_buf_free(&r->snap);
  return n;
}

/* wxd_journal_wait's callbacks: the result once durable (or the journal's
 * error), or dropped with a coroutine that went away. */
static int push_durable(lua_State *L, void *data, int err) {
  ps_result_t *r = data;
  if (err) {
    snprintf(r->msg, sizeof r->msg, "journal: %s", strerror(err));
    r->is_order = 0;
  }
  int n = push_result(L, r);
  free(r);
  return n;
}

static void drop_result(void *data) {
  ps_result_t *r = data;
  wxd_buf_free(&r->snap);
  free(r);
}

/* Returns the result once its change is durable: at once when it is, by
 * yielding the calling wxd coroutine, or by blocking outside one. `r` is
 * heap-allocated and owned from here on. st->mu is not held. */
static int finish(lua_State *L, ps_store_t *st, ps_result_t *r) {
  return wxd_journal_wait(L, &st->j, r->seq, push_durable, drop_result, r);
}

static ps_result_t *new_result(lua_State *L) {
  ps_result_t *r = calloc(1, sizeof *r);
  if (!r) luaL_error(L, "wxd.order: out of memory");
  return r;
}

static const char *opt_field(lua_State *L, int t, const char *name, int required) {
  lua_getfield(L, t, name);
  const char *s = NULL;
  if (lua_type(L, -1) == LUA_TSTRING) s = lua_tostring(L, -1);
  else if (!lua_isnil(L, -1) || required)
    luaL_error(L, "wxd.order: %s must be a string%s", name, required ? "" : " or nil");
  lua_pop(L, 1); /* the string stays anchored in the table */
  return s;
}

/* open(path | nil) -> store | nil, err. */
static int mod_open(lua_State *L) {
  const char *path = luaL_optstring(L, 1, NULL);
  char err[512] = "";
  ps_store_t *st = store_open(path, err, sizeof err);
  if (!st) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  ps_store_t **box = lua_newuserdata(L, sizeof *box);
  *box = st;
  luaL_getmetatable(L, STORE_MT);
  lua_setmetatable(L, -2);
  return 1;
}

/* st:create{...} -> o, "ok" | o, "duplicate" | nil, "exists" | nil, err */
static int store_create(lua_State *L) {
  ps_store_t *st = check_store(L);
  luaL_checktype(L, 2, LUA_TTABLE);
  create_args_t a = {0};
  a.no = opt_field(L, 2, "out_trade_no", 1);
  a.currency = opt_field(L, 2, "currency", 1);
  a.appid = opt_field(L, 2, "appid", 0);
  a.mchid = opt_field(L, 2, "mchid", 0);
  a.openid = opt_field(L, 2, "payer_openid", 0);
  a.description = opt_field(L, 2, "description", 0);
  a.key = opt_field(L, 2, "key", 0);
  if (!a.no[0] || strlen(a.no) > PS_NO_MAX) luaL_error(L, "wxd.order: out_trade_no must be 1..%d bytes", PS_NO_MAX);
  lua_getfield(L, 2, "amount");
  a.amount = (int64_t)luaL_checknumber(L, -1);
  lua_pop(L, 1);
  ps_result_t *r = new_result(L);
  pthread_mutex_lock(&st->mu);
  op_create(st, &a, r);
  pthread_mutex_unlock(&st->mu);
  return finish(L, st, r);
}

/* st:get(no) -> o, "ok" | nil, "not found" */
static int store_get(lua_State *L) {
  ps_store_t *st = check_store(L);
  const char *no = luaL_checkstring(L, 2);
  ps_result_t *r = new_result(L);
  pthread_mutex_lock(&st->mu);
  ps_order_t *o = order_find_seq(st, no, &r->seq);
  if (o) result_order(r, o, "ok");
  else result_error(r, "not found"); /* once its FORGET record, if any, is durable */
  pthread_mutex_unlock(&st->mu);
  return finish(L, st, r);
}

/* st:transition(no, to, key, event, data_json|nil, expect_version|-1)
 *   -> o, "ok" | o, "duplicate" | nil, err [, "late"] */
static int store_transition(lua_State *L) {
  ps_store_t *st = check_store(L);
  transition_args_t a = {0};
  a.no = luaL_checkstring(L, 2);
  const char *to = luaL_checkstring(L, 3);
  luaL_argcheck(L, strlen(a.no) <= PS_NO_MAX, 2, "out_trade_no too long");
  a.key = luaL_checkstring(L, 4);
  a.event = luaL_optstring(L, 5, NULL);
  a.data = luaL_optstring(L, 6, NULL);
  a.expect_version = (int64_t)luaL_optnumber(L, 7, -1);
  a.to = state_parse(to);
  if (a.to < 0) return luaL_argerror(L, 3, "unknown state");
  ps_result_t *r = new_result(L);
  pthread_mutex_lock(&st->mu);
  op_transition(st, &a, r);
  pthread_mutex_unlock(&st->mu);
  return finish(L, st, r);
}

/* st:transition_checked(no, to, key, event, data_json|nil, mchid|nil, appid|false|nil, amount,
 *                       currency, ref|nil)
 *   -> as transition, or nil, "mchid mismatch" | "appid mismatch" | "amount mismatch" |
 *      "currency mismatch", or o, "already" (ref found under another key).
 * wxd.pay's notification step in one call: the order is checked against
 * the notification and moved under one lock, with one copy of it back.
 * appid false: not compared. */
static int store_transition_checked(lua_State *L) {
  ps_store_t *st = check_store(L);
  transition_args_t a = {0};
  a.no = luaL_checkstring(L, 2);
  const char *to = luaL_checkstring(L, 3);
  luaL_argcheck(L, strlen(a.no) <= PS_NO_MAX, 2, "out_trade_no too long");
  a.key = luaL_checkstring(L, 4);
  a.event = luaL_optstring(L, 5, NULL);
  a.data = luaL_optstring(L, 6, NULL);
  a.expect_version = -1;
  a.check = 1;
  a.mchid = luaL_optstring(L, 7, NULL);
  a.check_appid = !(lua_type(L, 8) == LUA_TBOOLEAN && !lua_toboolean(L, 8));
  a.appid = a.check_appid ? luaL_optstring(L, 8, NULL) : NULL;
  a.amount = luaL_checknumber(L, 9);
  a.currency = luaL_checkstring(L, 10);
  a.ref = luaL_optstring(L, 11, NULL);
  a.to = state_parse(to);
  if (a.to < 0) return luaL_argerror(L, 3, "unknown state");
  ps_result_t *r = new_result(L);
  pthread_mutex_lock(&st->mu);
  op_transition(st, &a, r);
  pthread_mutex_unlock(&st->mu);
  return finish(L, st, r);
}

/* st:due(cutoff_ms, limit) -> { out_trade_no, ... } of CREATED or PAYING
 * orders created at or before cutoff_ms (the unpaid-order closer). */
static int store_due(lua_State *L) {
  ps_store_t *st = check_store(L);
  int64_t cutoff = (int64_t)luaL_checknumber(L, 2);
  size_t limit = (size_t)luaL_optinteger(L, 3, 100);
  wxd_buf_t b = {0};
  size_t n = 0;
  pthread_mutex_lock(&st->mu);
  for (size_t i = 0; i < st->nbuckets && n < limit; i++)
    for (ps_order_t *o = st->buckets[i]; o && n < limit; o = o->next)
      if ((o->state == S_CREATED || o->state == S_PAYING) && o->created_at <= cutoff && !o->forget_seq) {
        if (put_str(&b, o->no) != 0) break;
        n++;
      }
  pthread_mutex_unlock(&st->mu);
  lua_createtable(L, (int)n, 0);
  wxd_jreader_t r = {(const unsigned char *)b.data, b.len, 0, 0};
  for (size_t i = 0; i < n; i++) {
    size_t len;
    const char *s = wxd_jget_str(&r, &len);
    if (!s) break;
    lua_pushlstring(L, s, len);
    lua_rawseti(L, -2, (int)i + 1);
  }
  wxd_buf_free(&b);
  return 1;
}

/* ---- Retention ----
 * Orders whose last change is old enough leave the store: a final one
 * (FAILED, CLOSED, REFUNDED) after the final cutoff, a settled one (PAID,
 * CONFIRMED, REFUND_FAILED: money was taken and may still be refunded)
 * after the settled cutoff. CREATED, PAYING and REFUNDING stay: the closer
 * and notifications still act on them. Order of events, so that a crash
 * anywhere loses nothing: the orders' JSON lines are appended to the
 * archive and fsync'd; then, under the lock, a FORGET record per order is
 * queued and the order hidden (lookups say "not found" once that record is
 * durable); the order's memory is freed once it is durable (reap). */

static const unsigned final_states = TO(S_FAILED) | TO(S_CLOSED) | TO(S_REFUNDED);
static const unsigned settled_states = TO(S_PAID) | TO(S_CONFIRMED) | TO(S_REFUND_FAILED);

static int is_forgettable(const ps_order_t *o, int64_t final_cutoff, int64_t settled_cutoff) {
  if (final_states & TO(o->state)) return o->updated_at <= final_cutoff;
  if (settled_states & TO(o->state)) return o->updated_at <= settled_cutoff;
  return 0;
}

/* Frees the forgotten orders whose FORGET record is durable (mutex held). */
static void reap(ps_store_t *st) {
  ps_order_t **pp = &st->limbo;
  while (*pp) {
    ps_order_t *o = *pp;
    if (o->forget_seq <= st->j.durable && !st->j.io_errno) {
      *pp = o->limbo_next;
      store_unlink(st, o);
      order_free(o);
      st->n_limbo--;
    } else {
      pp = &o->limbo_next;
    }
  }
}

static int json_raw(wxd_buf_t *b, const char *s) { return wxd_buf_append(b, s, strlen(s)); }

static int json_str(wxd_buf_t *b, const char *s) {
  size_t len = strlen(s);
  if (len > (SIZE_MAX - 2) / 6 || wxd_buf_reserve(b, 6 * len + 2) != 0) return -1;
  b->data[b->len++] = '"';
  b->len += wxd_json_escape(b->data + b->len, 6 * len, s, len);
  b->data[b->len++] = '"';
  return 0;
}

static int json_int(wxd_buf_t *b, int64_t v) {
  char num[32];
  int n = snprintf(num, sizeof num, "%lld", (long long)v);
  return wxd_buf_append(b, num, (size_t)n);
}

/* ,"name":"value" when value is not NULL (an absent field, as get has it). */
static int json_opt(wxd_buf_t *b, const char *name, const char *v) {
  if (!v) return 0;
  return json_raw(b, ",\"") | json_raw(b, name) | json_raw(b, "\":") | json_str(b, v);
}

static int json_entries(wxd_buf_t *b, const char *name, const ps_list_t *l) {
  int rc = json_raw(b, ",\"") | json_raw(b, name) | json_raw(b, "\":[");
  for (size_t i = 0; i < l->n; i++) {
    const ps_entry_t *e = &l->v[i];
    rc |= json_raw(b, i ? ",{\"from\":\"" : "{\"from\":\"") | json_raw(b, state_names[e->from]) |
          json_raw(b, "\",\"to\":\"") | json_raw(b, state_names[e->to]) | json_raw(b, "\",\"at\":") |
          json_int(b, e->at) | json_opt(b, "event", e->event) | json_opt(b, "key", e->key);
    /* data is JSON text already (wxd.order encodes it): kept as it is */
    if (e->data) rc |= json_raw(b, ",\"data\":") | json_raw(b, e->data);
    rc |= json_raw(b, "}");
  }
  return rc | json_raw(b, "]");
}

/* The order as one JSON line, with the fields order.get returns. */
static int put_archive_line(wxd_buf_t *b, const ps_order_t *o) {
  return json_raw(b, "{\"out_trade_no\":") | json_str(b, o->no) | json_raw(b, ",\"amount\":") |
         json_int(b, o->amount) | json_opt(b, "currency", o->currency) | json_opt(b, "appid", o->appid) |
         json_opt(b, "mchid", o->mchid) | json_opt(b, "payer_openid", o->openid) |
         json_opt(b, "description", o->description) | json_raw(b, ",\"state\":\"") |
         json_raw(b, state_names[o->state]) | json_raw(b, "\",\"version\":") | json_int(b, o->version) |
         json_raw(b, ",\"created_at\":") | json_int(b, o->created_at) | json_raw(b, ",\"updated_at\":") |
         json_int(b, o->updated_at) | json_entries(b, "history", &o->hist) | json_entries(b, "late", &o->late) |
         json_raw(b, "}\n");
}

typedef struct forget_wait {
  ps_store_t *st;
  size_t n;
} forget_wait_t;

/* wxd_journal_wait's callbacks for forget_due. */
static int push_forgotten(lua_State *L, void *data, int err) {
  forget_wait_t *w = data;
  ps_store_t *st = w->st;
  size_t n = w->n;
  free(w);
  if (err) {
    lua_pushnil(L);
    lua_pushfstring(L, "journal: %s", strerror(err));
    return 2;
  }
  pthread_mutex_lock(&st->mu);
  reap(st);
  pthread_mutex_unlock(&st->mu);
  lua_pushnumber(L, (lua_Number)n);
  return 1;
}

static void drop_forgotten(void *data) { free(data); } /* the next sweep reaps */

/* nil, message (lua_pushfstring's format). */
static int push_fail(lua_State *L, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  lua_pushnil(L);
  lua_pushvfstring(L, fmt, ap);
  va_end(ap);
  return 2;
}

/* st:forget_due(final_cutoff_ms, settled_cutoff_ms, limit, archive_path|nil) -> n | nil, err
 * Forgets at most `limit` due orders (see above), archiving them first
 * unless archive_path is nil. Returns once their FORGET records are
 * durable. Errors: "archive <path>: <strerror>" (nothing forgotten),
 * "journal: <strerror>", "sweep running" (another call is between its scan
 * and its records), "no memory". Blocks the calling thread for the
 * archive's write and fsync. */
static int store_forget_due(lua_State *L) {
  ps_store_t *st = check_store(L);
  int64_t final_cutoff = (int64_t)luaL_checknumber(L, 2), settled_cutoff = (int64_t)luaL_checknumber(L, 3);
  lua_Integer limit = luaL_checkinteger(L, 4);
  const char *archive = luaL_optstring(L, 5, NULL);
  luaL_argcheck(L, limit > 0, 4, "limit must be > 0");
  forget_wait_t *w = calloc(1, sizeof *w);
  if (!w) return luaL_error(L, "wxd.order: out of memory");
  wxd_buf_t lines = {0}, due = {0};
  size_t n = 0;
  int rc = 0, busy = 0, io = 0;
  pthread_mutex_lock(&st->mu);
  reap(st);
  if (st->sweeping) busy = 1;
  else if (st->j.io_errno) io = st->j.io_errno;
  /* From where the last batch stopped, once around the table at most: a
   * sweep's batches do not rescan the orders kept before them. */
  size_t nb = st->nbuckets, start = nb ? st->sweep_at & (nb - 1) : 0;
  for (size_t k = 0; k < nb && !busy && !io && !rc; k++) {
    size_t i = (start + k) & (nb - 1);
    for (ps_order_t *o = st->buckets[i]; o && n < (size_t)limit && !rc; o = o->next) {
      /* An order whose last change is not durable yet waits for the next sweep. */
      if (o->forget_seq || o->seq > st->j.durable || !is_forgettable(o, final_cutoff, settled_cutoff)) continue;
      rc = put_str(&due, o->no) | put_i64(&due, o->version) | put_u32(&due, (uint32_t)o->late.n);
      if (archive) rc |= put_archive_line(&lines, o);
      n++;
    }
    if (n >= (size_t)limit) {
      st->sweep_at = i; /* this bucket may hold more */
      break;
    }
  }
  if (n && !rc) st->sweeping = 1;
  pthread_mutex_unlock(&st->mu);
  int e = 0;
  if (!busy && !io && !rc && n && archive) e = wxd_journal_append_file(archive, lines.data, lines.len);
  wxd_buf_free(&lines);
  if (busy || io || rc || !n || e) {
    if (n && !rc) {
      pthread_mutex_lock(&st->mu);
      st->sweeping = 0;
      pthread_mutex_unlock(&st->mu);
    }
    wxd_buf_free(&due);
    free(w);
    if (busy) return push_fail(L, "sweep running");
    if (io) return push_fail(L, "journal: %s", strerror(io));
    if (rc) return push_fail(L, "no memory");
    if (e) return push_fail(L, "archive %s: %s", archive, strerror(e));
    lua_pushnumber(L, 0);
    return 1;
  }
  /* Archived: now the FORGET records, for the orders that did not change
   * meanwhile (one that did keeps its place and its archive line is
   * superseded by a later one when it is due again). */
  uint64_t last = 0;
  size_t forgot = 0;
  wxd_jreader_t r = {(const unsigned char *)due.data, due.len, 0, 0};
  pthread_mutex_lock(&st->mu);
  int64_t at = now_ms();
  for (size_t i = 0; i < n && !st->j.io_errno; i++) {
    size_t len;
    const char *s = wxd_jget_str(&r, &len);
    int64_t version = wxd_jget_i64(&r);
    uint32_t nlate = wxd_jget_u32(&r);
    char no[PS_NO_MAX + 1];
    if (!s || len > PS_NO_MAX) break;
    memcpy(no, s, len);
    no[len] = '\0';
    ps_order_t *o = order_find(st, no);
    if (!o || o->version != version || o->late.n != nlate) continue;
    size_t mark = st->j.pending.len;
    if (put_forget(&st->j.pending, o, at) != 0) {
      st->j.pending.len = mark;
      break;
    }
    o->forget_seq = last = journal_queued(st);
    o->limbo_next = st->limbo;
    st->limbo = o;
    st->n_limbo++;
    st->n_forgotten++;
    forgot++;
  }
  io = st->j.io_errno;
  st->sweeping = 0;
  pthread_mutex_unlock(&st->mu);
  wxd_buf_free(&due);
  if (!forgot) {
    free(w);
    if (io) return push_fail(L, "journal: %s", strerror(io));
    lua_pushnumber(L, 0);
    return 1;
  }
  w->st = st;
  w->n = forgot;
  return wxd_journal_wait(L, &st->j, last, push_forgotten, drop_forgotten, w);
}

/* st:stats() -> { orders, transitions, duplicates, illegal, late, commits, forgotten } */
static int store_stats(lua_State *L) {
  ps_store_t *st = check_store(L);
  pthread_mutex_lock(&st->mu);
  lua_Number v[7] = {(lua_Number)(st->count - st->n_limbo), (lua_Number)st->n_transitions,
                     (lua_Number)st->n_duplicates, (lua_Number)st->n_illegal, (lua_Number)st->n_late,
                     (lua_Number)st->j.commits, (lua_Number)st->n_forgotten};
  pthread_mutex_unlock(&st->mu);
  static const char *const names[7] = {"orders", "transitions", "duplicates", "illegal", "late", "commits",
                                       "forgotten"};
  lua_createtable(L, 0, 7);
  for (int i = 0; i < 7; i++) {
    lua_pushnumber(L, v[i]);
    lua_setfield(L, -2, names[i]);
  }
  return 1;
}

/* states() -> { "CREATED", ... } in table order. */
static int mod_states(lua_State *L) {
  lua_createtable(L, S_COUNT, 0);
  for (int i = 0; i < S_COUNT; i++) {
    lua_pushstring(L, state_names[i]);
    lua_rawseti(L, -2, i + 1);
  }
  return 1;
}

/* legal(from, to) -> boolean, and whether an illegal one is "late". */
static int mod_legal(lua_State *L) {
  int from = state_parse(luaL_checkstring(L, 1)), to = state_parse(luaL_checkstring(L, 2));
  if (from < 0) return luaL_argerror(L, 1, "unknown state");
  if (to < 0) return luaL_argerror(L, 2, "unknown state");
  lua_pushboolean(L, is_legal(from, to));
  lua_pushboolean(L, !is_legal(from, to) && is_late(from, to));
  return 2;
}

/* pairs() -> " CREATED>PAYING CREATED>CLOSED ... ", " PAID REFUNDED ":
 * the table as text for the Redis transition script. */
static int mod_pairs(lua_State *L) {
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  luaL_addchar(&b, ' ');
  for (int f = 0; f < S_COUNT; f++)
    for (int t = 0; t < S_COUNT; t++)
      if (is_legal(f, t)) {
        luaL_addstring(&b, state_names[f]);
        luaL_addchar(&b, '>');
        luaL_addstring(&b, state_names[t]);
        luaL_addchar(&b, ' ');
      }
  luaL_pushresult(&b);
  luaL_buffinit(L, &b);
  luaL_addchar(&b, ' ');
  for (int t = 0; t < S_COUNT; t++)
    if (late_targets & TO(t)) {
      luaL_addstring(&b, state_names[t]);
      luaL_addchar(&b, ' ');
    }
  luaL_pushresult(&b);
  return 2;
}

/* retention() -> { "FAILED", ... }, { "PAID", ... }: the states forgotten
 * after the final and after the settled retention (Redis mode sets its
 * keys' expiry from them). */
static int mod_retention(lua_State *L) {
  const unsigned sets[2] = {final_states, settled_states};
  for (int k = 0; k < 2; k++) {
    lua_newtable(L);
    int n = 0;
    for (int i = 0; i < S_COUNT; i++)
      if (sets[k] & TO(i)) {
        lua_pushstring(L, state_names[i]);
        lua_rawseti(L, -2, ++n);
      }
  }
  return 2;
}

int wxd_open_order(lua_State *L) {
  static const luaL_Reg methods[] = {{"create", store_create}, {"get", store_get},
                                     {"transition", store_transition},
                                     {"transition_checked", store_transition_checked}, {"due", store_due},
                                     {"forget_due", store_forget_due},
                                     {"stats", store_stats}, {NULL, NULL}};
  static const luaL_Reg fns[] = {{"open", mod_open}, {"states", mod_states}, {"legal", mod_legal},
                                 {"pairs", mod_pairs}, {"retention", mod_retention}, {NULL, NULL}};
  luaL_newmetatable(L, STORE_MT);
  lua_createtable(L, 0, 5);
  luaL_register(L, NULL, methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  lua_createtable(L, 0, 4);
  luaL_register(L, NULL, fns);
  return 1;
}
