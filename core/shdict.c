/* shdict: see shdict.h. */
#include "shdict.h"

#include "bell.h"
#include "crypto.h"

#include <errno.h>
#include <lauxlib.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <uv.h>

#include "vm.h"

#define SHDICT_MT "wxd.shdict"
#define STATE_MT "wxd.shdict.state"

enum { SHD_NIL = 0, SHD_BOOLEAN, SHD_NUMBER, SHD_STRING };

/* Results of the operations below; each maps to one stable Lua error. */
enum { SHD_OK = 0, SHD_EXISTS, SHD_NOT_FOUND, SHD_NOT_NUMBER, SHD_NOMEM, SHD_MISMATCH };

#define NO_HEAP UINT32_MAX
/* Each entry is charged for its share of the hash index and of the expiry
 * heap (a pointer in each, with the arrays up to half empty after growth). */
#define INDEX_CHARGE 32
#define MIN_BUCKETS 64

typedef struct shd_entry {
  struct shd_entry *hnext;         /* hash chain */
  struct shd_entry *newer, *older; /* LRU list, d->newest ... d->oldest */
  uint64_t hash;
  uint64_t expire_ns;              /* uv_hrtime() deadline; 0: never */
  double num;                      /* SHD_NUMBER; SHD_BOOLEAN as 0 or 1 */
  size_t vlen;                     /* SHD_STRING: bytes after the key */
  size_t charge;                   /* bytes counted against the capacity */
  uint32_t klen;
  uint32_t heap;                   /* index in d->heap, or NO_HEAP */
  uint8_t type;                    /* SHD_* */
  char kv[];                       /* the key, then a string value */
} shd_entry_t;

/* A coroutine waiting for a lock, or for a key's value to change
 * (wait_change). Lives on its waiter's loop; the memory is freed once its
 * timer is closed. Fields marked (mu) are guarded by the dictionary's
 * mutex: a thread removing (or, for a change waiter, writing) a key reads
 * them and posts `wake` to the waiter's loop bell (core/bell.c). */
typedef struct shd_waiter {
  wxd_bell_item_t wake;             /* first member: posted to the loop's bell when the key
                                     * goes away (or changes) */
  wxd_bell_t *bell;                 /* the waiting coroutine's loop's */
  uv_timer_t timer;                 /* timeout, or the holder's expiry; keeps the loop alive */
  wxd_co_t *co;
  wxd_shdict_t *d;
  struct shd_waiter *prev, *next;   /* d->waiters (mu) */
  int linked;                       /* queued on d->waiters (mu) */
  int woken;                        /* dequeued by a remover (mu) */
  int done;                         /* resumed or cancelled (loop thread) */
  int change;                       /* a wait_change waiter, not a lock's */
  uint8_t otype;                    /* change: the value waited away from */
  double onum;
  size_t olen;                      /* change: its string, after the key */
  uint64_t deadline_ns;             /* change: uv_hrtime() of the timeout */
  uint64_t hash;
  size_t klen;
  char key[];
} shd_waiter_t;

struct wxd_shdict {
  pthread_mutex_t mu;
  char name[64];
  size_t cap;                      /* capacity in bytes */
  size_t used;                     /* sum of the entries' charges */
  size_t count;
  uint64_t evictions;              /* live entries dropped to make room */
  uint64_t expired;                /* expired entries reclaimed */
  uint64_t sipkey[2];              /* per-dictionary hash key (flooding) */
  shd_entry_t **buckets;
  size_t nbuckets;                 /* a power of two */
  shd_entry_t *newest, *oldest;
  shd_entry_t **heap;              /* min-heap on expire_ns */
  uint32_t nheap, heapcap;
  shd_waiter_t *waiters, *waiters_tail;
  size_t nchange;                  /* change waiters on d->waiters */
  wxd_shdict_t *next;              /* registry list */
};

struct wxd_shdict_registry {
  wxd_shdict_t *first;
};

/* ---- hashing: SipHash-1-3, keyed per dictionary (keys may come from
 * clients, who must not be able to pick colliding ones) ---- */

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                             \
  do {                                                                       \
    v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);                \
    v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                   \
    v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                   \
    v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);                \
  } while (0)

uint64_t wxd_siphash13(const uint64_t k[2], const void *data, size_t len) {
  const unsigned char *p = data;
  uint64_t v0 = 0x736f6d6570736575ULL ^ k[0], v1 = 0x646f72616e646f6dULL ^ k[1];
  uint64_t v2 = 0x6c7967656e657261ULL ^ k[0], v3 = 0x7465646279746573ULL ^ k[1];
  const unsigned char *end = p + (len & ~(size_t)7);
  for (; p != end; p += 8) {
    uint64_t m;
    memcpy(&m, p, 8);
    v3 ^= m;
    SIPROUND;
    v0 ^= m;
  }
  uint64_t b = (uint64_t)len << 56;
  for (size_t i = 0; i < (len & 7); i++) b |= (uint64_t)p[i] << (8 * i);
  v3 ^= b;
  SIPROUND;
  v0 ^= b;
  v2 ^= 0xff;
  SIPROUND;
  SIPROUND;
  SIPROUND;
  return v0 ^ v1 ^ v2 ^ v3;
}

/* ---- entries (every function here runs with d->mu held) ---- */

static size_t charge_of(size_t klen, size_t vlen) {
  /* What malloc really hands out: the header, the key, the value, its own
   * 8-byte chunk header, rounded up to 16. */
  size_t n = sizeof(shd_entry_t) + klen + vlen + 8;
  return ((n + 15) & ~(size_t)15) + INDEX_CHARGE;
}

static int expired(const shd_entry_t *e, uint64_t now) { return e->expire_ns && e->expire_ns <= now; }

static void heap_set(wxd_shdict_t *d, uint32_t i, shd_entry_t *e) {
  d->heap[i] = e;
  e->heap = i;
}

static void heap_up(wxd_shdict_t *d, uint32_t i) {
  shd_entry_t *e = d->heap[i];
  while (i > 0) {
    uint32_t parent = (i - 1) / 2;
    if (d->heap[parent]->expire_ns <= e->expire_ns) break;
    heap_set(d, i, d->heap[parent]);
    i = parent;
  }
  heap_set(d, i, e);
}

static void heap_down(wxd_shdict_t *d, uint32_t i) {
  shd_entry_t *e = d->heap[i];
  for (;;) {
    uint32_t c = 2 * i + 1;
    if (c >= d->nheap) break;
    if (c + 1 < d->nheap && d->heap[c + 1]->expire_ns < d->heap[c]->expire_ns) c++;
    if (e->expire_ns <= d->heap[c]->expire_ns) break;
    heap_set(d, i, d->heap[c]);
    i = c;
  }
  heap_set(d, i, e);
}

/* Room for one more deadline; -1 when out of memory. */
static int heap_reserve(wxd_shdict_t *d) {
  if (d->nheap < d->heapcap) return 0;
  uint32_t ncap = d->heapcap ? d->heapcap * 2 : 64;
  shd_entry_t **h = realloc(d->heap, ncap * sizeof *h);
  if (!h) return -1;
  d->heap = h;
  d->heapcap = ncap;
  return 0;
}

static void heap_push(wxd_shdict_t *d, shd_entry_t *e) {
  heap_set(d, d->nheap++, e);
  heap_up(d, e->heap);
}

static void heap_remove(wxd_shdict_t *d, shd_entry_t *e) {
  uint32_t i = e->heap;
  e->heap = NO_HEAP;
  shd_entry_t *last = d->heap[--d->nheap];
  if (last == e) return;
  heap_set(d, i, last);
  heap_up(d, i);
  heap_down(d, last->heap);
}

static void lru_unlink(wxd_shdict_t *d, shd_entry_t *e) {
  if (e->newer) e->newer->older = e->older;
  else d->newest = e->older;
  if (e->older) e->older->newer = e->newer;
  else d->oldest = e->newer;
  e->newer = e->older = NULL;
}

static void lru_push(wxd_shdict_t *d, shd_entry_t *e) {
  e->newer = NULL;
  e->older = d->newest;
  if (d->newest) d->newest->newer = e;
  else d->oldest = e;
  d->newest = e;
}

static void touch(wxd_shdict_t *d, shd_entry_t *e) {
  if (d->newest == e) return;
  lru_unlink(d, e);
  lru_push(d, e);
}

/* Takes e out of every structure; the caller frees it. */
static void entry_unlink(wxd_shdict_t *d, shd_entry_t *e) {
  shd_entry_t **p = &d->buckets[e->hash & (d->nbuckets - 1)];
  while (*p != e) p = &(*p)->hnext;
  *p = e->hnext;
  lru_unlink(d, e);
  if (e->heap != NO_HEAP) heap_remove(d, e);
  d->used -= e->charge;
  d->count--;
}

static void waiter_link(wxd_shdict_t *d, shd_waiter_t *w) {
  w->prev = d->waiters_tail;
  w->next = NULL;
  if (d->waiters_tail) d->waiters_tail->next = w;
  else d->waiters = w;
  d->waiters_tail = w;
  w->linked = 1;
  w->woken = 0;
  if (w->change) d->nchange++;
}

static void waiter_dequeue(wxd_shdict_t *d, shd_waiter_t *w) {
  if (w->prev) w->prev->next = w->next;
  else d->waiters = w->next;
  if (w->next) w->next->prev = w->prev;
  else d->waiters_tail = w->prev;
  w->prev = w->next = NULL;
  w->linked = 0;
  if (w->change) d->nchange--;
}

enum { WAKE_LOCK = 1, WAKE_CHANGE = 2 };

/* Something happened to key. WAKE_LOCK (it went away): the first coroutine
 * waiting for its lock may take it; one at a time: a woken lock waiter
 * that cannot use the wake-up passes it on. WAKE_CHANGE (it was written or
 * went away): every coroutine waiting for its value to change looks again. */
static void wake_key(wxd_shdict_t *d, const char *key, size_t klen, uint64_t hash, int what) {
  shd_waiter_t *w = d->waiters;
  while (w) {
    shd_waiter_t *next = w->next;
    if ((what & (w->change ? WAKE_CHANGE : WAKE_LOCK)) && w->hash == hash && w->klen == klen &&
        memcmp(w->key, key, klen) == 0) {
      if (!w->change) what &= ~WAKE_LOCK;
      waiter_dequeue(d, w);
      w->woken = 1;
      wxd_bell_post(w->bell, &w->wake);
      if (!(what & WAKE_LOCK) && (!(what & WAKE_CHANGE) || d->nchange == 0)) return;
    }
    w = next;
  }
}

/* Removes and frees e, waking a waiter of its key. */
static void entry_drop(wxd_shdict_t *d, shd_entry_t *e) {
  entry_unlink(d, e);
  if (d->waiters) wake_key(d, e->kv, e->klen, e->hash, d->nchange ? WAKE_LOCK | WAKE_CHANGE : WAKE_LOCK);
  free(e);
}

/* The live entry for key, or NULL; an expired one met here is dropped. */
static shd_entry_t *lookup(wxd_shdict_t *d, const char *key, size_t klen, uint64_t hash, uint64_t now) {
  for (shd_entry_t *e = d->buckets[hash & (d->nbuckets - 1)]; e; e = e->hnext) {
    if (e->hash == hash && e->klen == klen && memcmp(e->kv, key, klen) == 0) {
      if (expired(e, now)) {
        entry_drop(d, e);
        d->expired++;
        return NULL;
      }
      return e;
    }
  }
  return NULL;
}

/* Frees charges until `need` more bytes fit: expired entries first, then
 * the least recently used. The caller made sure need <= cap. */
static void make_room(wxd_shdict_t *d, size_t need, uint64_t now) {
  while (d->used + need > d->cap) {
    if (d->nheap > 0 && expired(d->heap[0], now)) {
      entry_drop(d, d->heap[0]);
      d->expired++;
    } else if (d->oldest) {
      entry_drop(d, d->oldest);
      d->evictions++;
    } else {
      break;
    }
  }
}

/* Doubles the index when it holds more entries than buckets. Failing to
 * grow only makes chains longer. */
static void maybe_grow(wxd_shdict_t *d) {
  if (d->count < d->nbuckets) return;
  size_t n = d->nbuckets * 2;
  shd_entry_t **b = calloc(n, sizeof *b);
  if (!b) return;
  for (size_t i = 0; i < d->nbuckets; i++) {
    shd_entry_t *e = d->buckets[i];
    while (e) {
      shd_entry_t *next = e->hnext;
      e->hnext = b[e->hash & (n - 1)];
      b[e->hash & (n - 1)] = e;
      e = next;
    }
  }
  free(d->buckets);
  d->buckets = b;
  d->nbuckets = n;
}

typedef struct shd_value {
  int type;
  double num;
  const char *str;
  size_t len;
} shd_value_t;

static void entry_assign(shd_entry_t *e, const shd_value_t *v) {
  e->type = (uint8_t)v->type;
  e->num = v->num;
  e->vlen = v->type == SHD_STRING ? v->len : 0;
  if (e->vlen) memcpy(e->kv + e->klen, v->str, v->len);
}

/* Links a new entry (the heap slot, when it has a deadline, is reserved). */
static void entry_insert(wxd_shdict_t *d, shd_entry_t *e, uint64_t now) {
  make_room(d, e->charge, now);
  maybe_grow(d);
  shd_entry_t **b = &d->buckets[e->hash & (d->nbuckets - 1)];
  e->hnext = *b;
  *b = e;
  lru_push(d, e);
  e->heap = NO_HEAP;
  if (e->expire_ns) heap_push(d, e);
  d->used += e->charge;
  d->count++;
}

enum { MODE_SET, MODE_ADD, MODE_REPLACE };

/* set / add / replace. On SHD_EXISTS, *holder_expire is the existing
 * entry's deadline (locks wait for it). */
static int store(wxd_shdict_t *d, int mode, const char *key, size_t klen, uint64_t hash,
                 const shd_value_t *v, uint64_t expire_ns, uint64_t now, uint64_t *holder_expire) {
  shd_entry_t *e = lookup(d, key, klen, hash, now);
  if (mode == MODE_ADD && e) {
    if (holder_expire) *holder_expire = e->expire_ns;
    return SHD_EXISTS;
  }
  if (mode == MODE_REPLACE && !e) return SHD_NOT_FOUND;
  size_t vlen = v->type == SHD_STRING ? v->len : 0;
  size_t charge = charge_of(klen, vlen);
  if (charge > d->cap) return SHD_NOMEM;
  if (expire_ns && (!e || e->heap == NO_HEAP) && heap_reserve(d) != 0) return SHD_NOMEM;
  if (e && e->charge == charge && vlen <= e->vlen) {
    /* Same charge and the value fits the entry's allocation (which is exact,
     * while charges are rounded to 16): rewrite in place, no allocation. */
    entry_assign(e, v);
    if (e->heap != NO_HEAP && !expire_ns) heap_remove(d, e);
    e->expire_ns = expire_ns;
    if (expire_ns) {
      if (e->heap == NO_HEAP) heap_push(d, e);
      else {
        heap_up(d, e->heap);
        heap_down(d, e->heap);
      }
    }
    touch(d, e);
    if (d->nchange) wake_key(d, key, klen, hash, WAKE_CHANGE);
    return SHD_OK;
  }
  shd_entry_t *n = malloc(sizeof *n + klen + vlen);
  if (!n) return SHD_NOMEM;
  memcpy(n->kv, key, klen);
  n->klen = (uint32_t)klen;
  n->hash = hash;
  n->charge = charge;
  n->expire_ns = expire_ns;
  entry_assign(n, v);
  if (e) {
    /* Replaced, not removed: the key stays, so no lock waiter is woken
     * (change waiters are, below). */
    entry_unlink(d, e);
    free(e);
  }
  entry_insert(d, n, now);
  if (d->nchange) wake_key(d, key, klen, hash, WAKE_CHANGE);
  return SHD_OK;
}

static int incr(wxd_shdict_t *d, const char *key, size_t klen, uint64_t hash, double by, int has_init,
                double init, uint64_t init_expire, uint64_t now, double *out) {
  shd_entry_t *e = lookup(d, key, klen, hash, now);
  if (e) {
    if (e->type != SHD_NUMBER) return SHD_NOT_NUMBER;
    e->num += by;
    *out = e->num;
    touch(d, e);
    if (d->nchange) wake_key(d, key, klen, hash, WAKE_CHANGE);
    return SHD_OK;
  }
  if (!has_init) return SHD_NOT_FOUND;
  shd_value_t v = {SHD_NUMBER, init + by, NULL, 0};
  *out = v.num;
  return store(d, MODE_SET, key, klen, hash, &v, init_expire, now, NULL);
}

/* ---- registry ---- */

static void dict_free(wxd_shdict_t *d) {
  shd_entry_t *e = d->newest;
  while (e) {
    shd_entry_t *next = e->older;
    free(e);
    e = next;
  }
  free(d->buckets);
  free(d->heap);
  pthread_mutex_destroy(&d->mu);
  free(d);
}

wxd_shdict_registry_t *wxd_shdict_registry_new(void) { return calloc(1, sizeof(wxd_shdict_registry_t)); }

wxd_shdict_t *wxd_shdict_find(const wxd_shdict_registry_t *reg, const char *name, size_t len) {
  if (!reg) return NULL;
  for (wxd_shdict_t *d = reg->first; d; d = d->next)
    if (strlen(d->name) == len && memcmp(d->name, name, len) == 0) return d;
  return NULL;
}

static int valid_name(const char *name) {
  size_t n = strlen(name);
  if (n == 0 || n > 63 || (name[0] >= '0' && name[0] <= '9')) return 0;
  for (size_t i = 0; i < n; i++) {
    char c = name[i];
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_')) return 0;
  }
  return 1;
}

int wxd_shdict_registry_add(wxd_shdict_registry_t *reg, const char *name, size_t cap, char *err,
                            size_t errlen) {
  if (!valid_name(name)) {
    snprintf(err, errlen, "shdict \"%s\": a name is 1..63 of a-z, 0-9 and _, not starting with a digit", name);
    return -1;
  }
  if (cap < WXD_SHDICT_MIN_BYTES || cap > WXD_SHDICT_MAX_BYTES) {
    snprintf(err, errlen, "shdict \"%s\": size must be 64k..1024g, got %zu bytes", name, cap);
    return -1;
  }
  if (wxd_shdict_find(reg, name, strlen(name))) {
    snprintf(err, errlen, "shdict \"%s\" is already declared", name);
    return -1;
  }
  wxd_shdict_t *d = calloc(1, sizeof *d);
  if (d) d->buckets = calloc(MIN_BUCKETS, sizeof *d->buckets);
  if (!d || !d->buckets) {
    free(d);
    snprintf(err, errlen, "out of memory");
    return -1;
  }
  pthread_mutex_init(&d->mu, NULL);
  snprintf(d->name, sizeof d->name, "%s", name);
  d->cap = cap;
  d->nbuckets = MIN_BUCKETS;
  if (getrandom(d->sipkey, sizeof d->sipkey, 0) != (ssize_t)sizeof d->sipkey) {
    /* No entropy: still a working table, only predictable. */
    d->sipkey[0] = uv_hrtime();
    d->sipkey[1] = (uint64_t)(uintptr_t)d;
  }
  /* Appended, so that listings follow the order of declaration. */
  wxd_shdict_t **p = &reg->first;
  while (*p) p = &(*p)->next;
  *p = d;
  return 0;
}

void wxd_shdict_registry_free(wxd_shdict_registry_t *reg) {
  if (!reg) return;
  while (reg->first) {
    wxd_shdict_t *next = reg->first->next;
    dict_free(reg->first);
    reg->first = next;
  }
  free(reg);
}

/* ---- Lua ---- */

/* Per Lua state: a scratch buffer that values are copied into while the
 * mutex is held (pushing them onto the stack may raise, so it happens after
 * unlocking), and the private registry outside a server. */
typedef struct shd_state {
  char *buf;
  size_t cap;
  wxd_shdict_registry_t *own;
} shd_state_t;

typedef struct shd_ud {
  wxd_shdict_t *d;
} shd_ud_t;

/* Keeps scratch buffers from pinning a large value's memory. */
#define SCRATCH_KEEP (256 * 1024)

static shd_state_t *state(lua_State *L) { return lua_touserdata(L, lua_upvalueindex(1)); }

/* Grows the scratch buffer; no Lua call, so it may run under a mutex. */
static int scratch_reserve(shd_state_t *st, size_t n) {
  if (n <= st->cap) return 0;
  size_t ncap = st->cap * 2 > n ? st->cap * 2 : n;
  char *b = realloc(st->buf, ncap);
  if (!b) return -1;
  st->buf = b;
  st->cap = ncap;
  return 0;
}

/* e's value into v, a string's bytes copied to the state's scratch (the
 * entry may change once the mutex is released): 0, or -1 out of memory. */
static int value_to_scratch(shd_state_t *st, const shd_entry_t *e, shd_value_t *v) {
  v->type = e->type;
  v->num = e->num;
  if (e->type != SHD_STRING) return 0;
  if (scratch_reserve(st, e->vlen) != 0) return -1;
  if (e->vlen) memcpy(st->buf, e->kv + e->klen, e->vlen);
  v->len = e->vlen;
  return 0;
}

static void scratch_trim(shd_state_t *st) {
  if (st->cap > SCRATCH_KEEP) {
    free(st->buf);
    st->buf = NULL;
    st->cap = 0;
  }
}

static wxd_shdict_registry_t *registry_of(lua_State *L) {
  wxd_vm_t *vm = wxd_vm_get(L);
  if (vm && vm->shdicts) return vm->shdicts;
  return state(L)->own;
}

static wxd_shdict_t *check_dict(lua_State *L, int idx) {
  shd_ud_t *ud = luaL_checkudata(L, idx, SHDICT_MT);
  return ud->d;
}

static const char *check_key(lua_State *L, int idx, size_t *len) {
  if (lua_type(L, idx) != LUA_TSTRING) luaL_typerror(L, idx, "string");
  const char *k = lua_tolstring(L, idx, len);
  luaL_argcheck(L, *len >= 1 && *len <= WXD_SHDICT_KEY_MAX, idx, "a key is 1..65535 bytes");
  return k;
}

static void check_value(lua_State *L, int idx, shd_value_t *v) {
  memset(v, 0, sizeof *v);
  switch (lua_type(L, idx)) {
  case LUA_TSTRING:
    v->type = SHD_STRING;
    v->str = lua_tolstring(L, idx, &v->len);
    break;
  case LUA_TNUMBER:
    v->type = SHD_NUMBER;
    v->num = lua_tonumber(L, idx);
    break;
  case LUA_TBOOLEAN:
    v->type = SHD_BOOLEAN;
    v->num = lua_toboolean(L, idx);
    break;
  default:
    luaL_argerror(L, idx, "expected a string, number or boolean (encode a table, e.g. with wxd.json.encode)");
  }
}

/* A number, not a string that looks like one. */
static lua_Number check_number(lua_State *L, int idx) {
  if (lua_type(L, idx) != LUA_TNUMBER) luaL_typerror(L, idx, "number");
  return lua_tonumber(L, idx);
}

/* TTL in seconds (fractions allowed); none/nil/0: never expires. Returns
 * the deadline or 0. */
static uint64_t check_ttl(lua_State *L, int idx, uint64_t now) {
  if (lua_isnoneornil(L, idx)) return 0;
  lua_Number s = check_number(L, idx);
  luaL_argcheck(L, s >= 0 && s <= 1e9, idx, "expected a TTL in seconds, 0..1e9");
  if (s == 0) return 0;
  uint64_t ns = (uint64_t)(s * 1e9);
  return now + (ns ? ns : 1);
}

static uint64_t hash_key(const wxd_shdict_t *d, const char *key, size_t klen) {
  return wxd_siphash13(d->sipkey, key, klen);
}

static int push_result(lua_State *L, int rc) {
  if (rc == SHD_OK) {
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pushnil(L);
  switch (rc) {
  case SHD_EXISTS: lua_pushliteral(L, "exists"); break;
  case SHD_NOT_FOUND: lua_pushliteral(L, "not found"); break;
  case SHD_NOT_NUMBER: lua_pushliteral(L, "not a number"); break;
  case SHD_MISMATCH: lua_pushliteral(L, "mismatch"); break;
  default: lua_pushliteral(L, "no memory"); break;
  }
  return 2;
}

/* d:get(key) -> value, or nil when absent or expired. */
static int dict_get(lua_State *L) {
  shd_state_t *st = state(L);
  wxd_shdict_t *d = check_dict(L, 1);
  size_t klen;
  const char *key = check_key(L, 2, &klen);
  uint64_t h = hash_key(d, key, klen);
  shd_value_t v = {SHD_NIL, 0, NULL, 0};
  int nomem = 0;
  pthread_mutex_lock(&d->mu);
  shd_entry_t *e = lookup(d, key, klen, h, uv_hrtime());
  if (e) {
    touch(d, e);
    nomem = value_to_scratch(st, e, &v) != 0;
  }
  pthread_mutex_unlock(&d->mu);
  if (nomem) return push_result(L, SHD_NOMEM);
  switch (v.type) {
  case SHD_STRING:
    lua_pushlstring(L, st->buf ? st->buf : "", v.len);
    scratch_trim(st);
    break;
  case SHD_NUMBER: lua_pushnumber(L, v.num); break;
  case SHD_BOOLEAN: lua_pushboolean(L, v.num != 0); break;
  default: lua_pushnil(L); break;
  }
  return 1;
}

static int write_op(lua_State *L, int mode) {
  wxd_shdict_t *d = check_dict(L, 1);
  size_t klen;
  const char *key = check_key(L, 2, &klen);
  shd_value_t v;
  uint64_t now = uv_hrtime();
  if (mode == MODE_SET && lua_isnoneornil(L, 3)) {
    /* set(key, nil) deletes, as with a Lua table. */
    lua_settop(L, 2);
    uint64_t h = hash_key(d, key, klen);
    pthread_mutex_lock(&d->mu);
    shd_entry_t *e = lookup(d, key, klen, h, now);
    if (e) entry_drop(d, e);
    pthread_mutex_unlock(&d->mu);
    return push_result(L, SHD_OK);
  }
  check_value(L, 3, &v);
  uint64_t expire = check_ttl(L, 4, now);
  uint64_t h = hash_key(d, key, klen);
  pthread_mutex_lock(&d->mu);
  int rc = store(d, mode, key, klen, h, &v, expire, now, NULL);
  pthread_mutex_unlock(&d->mu);
  return push_result(L, rc);
}

/* d:set(key, value [, ttl]) -> true | nil, "no memory" */
static int dict_set(lua_State *L) { return write_op(L, MODE_SET); }
/* d:add(key, value [, ttl]) -> true | nil, "exists" | nil, "no memory" */
static int dict_add(lua_State *L) { return write_op(L, MODE_ADD); }
/* d:replace(key, value [, ttl]) -> true | nil, "not found" | nil, "no memory" */
static int dict_replace(lua_State *L) { return write_op(L, MODE_REPLACE); }

/* True when the entry holds exactly the value v (same type and content). */
static int entry_equals(const shd_entry_t *e, const shd_value_t *v) {
  if (e->type != v->type) return 0;
  if (v->type == SHD_STRING) return e->vlen == v->len && memcmp(e->kv + e->klen, v->str, v->len) == 0;
  return e->num == v->num;
}

/* d:cas(key, old, new [, ttl]) -> true | nil, "mismatch" | nil, "no memory"
 * Atomically: when the key holds `old` (nil: the key is absent), it gets
 * `new` (nil: the key is deleted). The building block of wxd.store's
 * compare-and-set (e.g. replacing exactly the token another worker has not
 * already replaced). */
static int dict_cas(lua_State *L) {
  wxd_shdict_t *d = check_dict(L, 1);
  size_t klen;
  const char *key = check_key(L, 2, &klen);
  int want_absent = lua_isnil(L, 3);
  int remove = lua_isnoneornil(L, 4);
  shd_value_t old, nv;
  if (!want_absent) check_value(L, 3, &old);
  if (!remove) check_value(L, 4, &nv);
  uint64_t now = uv_hrtime();
  uint64_t expire = check_ttl(L, 5, now);
  uint64_t h = hash_key(d, key, klen);
  int rc = SHD_MISMATCH;
  pthread_mutex_lock(&d->mu);
  shd_entry_t *e = lookup(d, key, klen, h, now);
  if (want_absent ? e == NULL : (e != NULL && entry_equals(e, &old))) {
    if (remove) {
      if (e) entry_drop(d, e);
      rc = SHD_OK;
    } else {
      rc = store(d, MODE_SET, key, klen, h, &nv, expire, now, NULL);
    }
  }
  pthread_mutex_unlock(&d->mu);
  return push_result(L, rc);
}

/* d:incr(key [, by=1 [, init [, init_ttl]]]) -> new value | nil, err */
static int dict_incr(lua_State *L) {
  wxd_shdict_t *d = check_dict(L, 1);
  size_t klen;
  const char *key = check_key(L, 2, &klen);
  lua_Number by = lua_isnoneornil(L, 3) ? 1 : check_number(L, 3);
  int has_init = !lua_isnoneornil(L, 4);
  lua_Number init = has_init ? check_number(L, 4) : 0;
  uint64_t now = uv_hrtime();
  uint64_t init_expire = check_ttl(L, 5, now);
  uint64_t h = hash_key(d, key, klen);
  double out = 0;
  pthread_mutex_lock(&d->mu);
  int rc = incr(d, key, klen, h, by, has_init, init, init_expire, now, &out);
  pthread_mutex_unlock(&d->mu);
  if (rc != SHD_OK) return push_result(L, rc);
  lua_pushnumber(L, out);
  return 1;
}

/* d:delete(key) -> true */
static int dict_delete(lua_State *L) {
  lua_settop(L, 2);
  lua_pushnil(L);
  return write_op(L, MODE_SET);
}

/* d:ttl(key) -> seconds left (0: no TTL) | nil, "not found" */
static int dict_ttl(lua_State *L) {
  wxd_shdict_t *d = check_dict(L, 1);
  size_t klen;
  const char *key = check_key(L, 2, &klen);
  uint64_t h = hash_key(d, key, klen);
  uint64_t now = uv_hrtime(), expire = 0;
  pthread_mutex_lock(&d->mu);
  shd_entry_t *e = lookup(d, key, klen, h, now);
  if (e) expire = e->expire_ns;
  pthread_mutex_unlock(&d->mu);
  if (!e) return push_result(L, SHD_NOT_FOUND);
  lua_pushnumber(L, expire ? (lua_Number)(expire - now) / 1e9 : 0);
  return 1;
}

/* d:keys([max=1024]) -> array of live keys, most recently used first; max 0
 * means all of them. */
static int dict_keys(lua_State *L) {
  shd_state_t *st = state(L);
  wxd_shdict_t *d = check_dict(L, 1);
  lua_Integer max = luaL_optinteger(L, 2, 1024);
  luaL_argcheck(L, max >= 0, 2, "expected a count >= 0 (0: all)");
  size_t off = 0, n = 0;
  int nomem = 0;
  pthread_mutex_lock(&d->mu);
  uint64_t now = uv_hrtime();
  shd_entry_t *e = d->newest;
  while (e && (max == 0 || n < (size_t)max)) {
    shd_entry_t *older = e->older;
    if (expired(e, now)) {
      entry_drop(d, e);
      d->expired++;
    } else if (scratch_reserve(st, off + sizeof(uint32_t) + e->klen) != 0) {
      nomem = 1;
      break;
    } else {
      memcpy(st->buf + off, &e->klen, sizeof(uint32_t));
      memcpy(st->buf + off + sizeof(uint32_t), e->kv, e->klen);
      off += sizeof(uint32_t) + e->klen;
      n++;
    }
    e = older;
  }
  pthread_mutex_unlock(&d->mu);
  if (nomem) return push_result(L, SHD_NOMEM);
  lua_createtable(L, (int)n, 0);
  off = 0;
  for (size_t i = 1; i <= n; i++) {
    uint32_t kl;
    memcpy(&kl, st->buf + off, sizeof kl);
    lua_pushlstring(L, st->buf + off + sizeof kl, kl);
    lua_rawseti(L, -2, (int)i);
    off += sizeof kl + kl;
  }
  scratch_trim(st);
  return 1;
}

/* d:flush_all(): removes every entry (and wakes every lock waiter). */
static int dict_flush_all(lua_State *L) {
  wxd_shdict_t *d = check_dict(L, 1);
  pthread_mutex_lock(&d->mu);
  while (d->newest) {
    shd_entry_t *e = d->newest;
    entry_unlink(d, e);
    free(e);
  }
  while (d->waiters) {
    shd_waiter_t *w = d->waiters;
    waiter_dequeue(d, w);
    w->woken = 1;
    wxd_bell_post(w->bell, &w->wake);
  }
  pthread_mutex_unlock(&d->mu);
  return 0;
}

void wxd_shdict_registry_each(const wxd_shdict_registry_t *reg, void (*fn)(void *arg, const wxd_shdict_usage_t *u),
                              void *arg) {
  for (wxd_shdict_t *d = reg ? reg->first : NULL; d; d = d->next) {
    pthread_mutex_lock(&d->mu);
    wxd_shdict_usage_t u = {d->name, d->cap, d->used, d->count, d->evictions, d->expired};
    pthread_mutex_unlock(&d->mu);
    fn(arg, &u);
  }
}

/* d:stats() -> { name, capacity, used, count, evictions, expired } */
static int dict_stats(lua_State *L) {
  wxd_shdict_t *d = check_dict(L, 1);
  pthread_mutex_lock(&d->mu);
  size_t used = d->used, count = d->count;
  uint64_t ev = d->evictions, ex = d->expired;
  pthread_mutex_unlock(&d->mu);
  lua_createtable(L, 0, 6);
  lua_pushstring(L, d->name);
  lua_setfield(L, -2, "name");
  lua_pushnumber(L, (lua_Number)d->cap);
  lua_setfield(L, -2, "capacity");
  lua_pushnumber(L, (lua_Number)used);
  lua_setfield(L, -2, "used");
  lua_pushnumber(L, (lua_Number)count);
  lua_setfield(L, -2, "count");
  lua_pushnumber(L, (lua_Number)ev);
  lua_setfield(L, -2, "evictions");
  lua_pushnumber(L, (lua_Number)ex);
  lua_setfield(L, -2, "expired");
  return 1;
}

static int dict_tostring(lua_State *L) {
  wxd_shdict_t *d = check_dict(L, 1);
  lua_pushfstring(L, "wxd.shdict \"%s\"", d->name);
  return 1;
}

/* ---- locks ---- */

static void waiter_closed(uv_handle_t *h) { free(h->data); }

/* A wake-up still queued on the bell is taken back; the memory goes with
 * the timer's close (at once when the worker's final walk closed it). */
static void waiter_close(shd_waiter_t *w) {
  wxd_bell_unpost(w->bell, &w->wake);
  if (uv_is_closing((uv_handle_t *)&w->timer)) free(w);
  else uv_close((uv_handle_t *)&w->timer, waiter_closed);
}

/* Woken (the key went away), or the timer fired: leave the queue and let
 * lock.lua try again. */
static void waiter_resume(shd_waiter_t *w) {
  if (w->done) return;
  w->done = 1;
  pthread_mutex_lock(&w->d->mu);
  if (w->linked) waiter_dequeue(w->d, w);
  pthread_mutex_unlock(&w->d->mu);
  waiter_close(w);
  wxd_co_t *co = w->co;
  lua_pushnil(co->T);
  lua_pushliteral(co->T, "wait");
  wxd_co_resume(co, 2);
}

static void change_recheck(shd_waiter_t *w);

static void waiter_on_wake(wxd_bell_item_t *it) {
  shd_waiter_t *w = (shd_waiter_t *)it;
  if (w->change) change_recheck(w);
  else waiter_resume(w);
}

static void waiter_on_timer(uv_timer_t *t) {
  shd_waiter_t *w = t->data;
  if (w->change) change_recheck(w);
  else waiter_resume(w);
}

/* The waiting VM shuts down: close without resuming. A wake-up it received
 * but can no longer use goes to the next waiter of the key. */
static void waiter_cancel(void *p) {
  shd_waiter_t *w = p;
  if (w->done) return;
  w->done = 1;
  wxd_shdict_t *d = w->d;
  pthread_mutex_lock(&d->mu);
  if (w->linked) waiter_dequeue(d, w);
  else if (w->woken && !w->change) wake_key(d, w->key, w->klen, w->hash, WAKE_LOCK);
  pthread_mutex_unlock(&d->mu);
  waiter_close(w);
}

/* d:_lock(key, token, expire_s, wait_ms) -> true | nil, "timeout" |
 * nil, "no memory"; or waits (at most wait_ms, less when the holder's lock
 * expires sooner) and returns nil, "wait": the caller tries again. Waiting
 * needs a wxd coroutine. */
static int dict_lock(lua_State *L) {
  wxd_shdict_t *d = check_dict(L, 1);
  size_t klen;
  const char *key = check_key(L, 2, &klen);
  shd_value_t tok = {SHD_STRING, 0, NULL, 0};
  tok.str = luaL_checklstring(L, 3, &tok.len);
  uint64_t now = uv_hrtime();
  uint64_t expire = check_ttl(L, 4, now);
  lua_Number wait_ms = check_number(L, 5);
  wxd_co_t *co = wxd_co_lookup(L);
  uint64_t h = hash_key(d, key, klen);
  shd_waiter_t *w = NULL;
  if (wait_ms > 0 && co && co->vm->bell) { /* no bell (wxd check): no waiting */
    w = calloc(1, sizeof *w + klen);
    if (!w) return push_result(L, SHD_NOMEM);
    memcpy(w->key, key, klen);
    w->klen = klen;
    w->hash = h;
    w->d = d;
    w->co = co;
  }
  uint64_t holder = 0;
  pthread_mutex_lock(&d->mu);
  int rc = store(d, MODE_ADD, key, klen, h, &tok, expire, now, &holder);
  if (rc != SHD_EXISTS || wait_ms <= 0 || !w) {
    pthread_mutex_unlock(&d->mu);
    free(w);
    if (rc == SHD_EXISTS && wait_ms > 0) wxd_co_current(L, "wxd.lock"); /* raises */
    if (rc == SHD_EXISTS) {
      lua_pushnil(L);
      lua_pushliteral(L, "timeout");
      return 2;
    }
    return push_result(L, rc);
  }
  /* Queued under the same mutex hold as the failed attempt, so that an
   * unlock in between cannot be missed. */
  w->wake.run = waiter_on_wake;
  w->bell = co->vm->bell;
  waiter_link(d, w);
  pthread_mutex_unlock(&d->mu);
  double ms = ceil(wait_ms);
  if (holder) {
    double left = ceil((double)(holder - now) / 1e6) + 1;
    if (left < ms) ms = left;
  }
  if (ms < 1) ms = 1;
  uv_timer_init(co->vm->loop, &w->timer);
  w->timer.data = w;
  uv_update_time(co->vm->loop);
  uv_timer_start(&w->timer, waiter_on_timer, (uint64_t)ms, 0);
  return wxd_co_yield_cancellable(co, L, waiter_cancel, w);
}

/* d:_unlock(key, token) -> true | nil, "mismatch" | nil, "not found":
 * deletes the key only while its value is this token (compare and delete
 * under the mutex). */
static int dict_unlock(lua_State *L) {
  wxd_shdict_t *d = check_dict(L, 1);
  size_t klen, tlen;
  const char *key = check_key(L, 2, &klen);
  const char *token = luaL_checklstring(L, 3, &tlen);
  uint64_t h = hash_key(d, key, klen);
  int rc;
  pthread_mutex_lock(&d->mu);
  shd_entry_t *e = lookup(d, key, klen, h, uv_hrtime());
  if (!e) rc = SHD_NOT_FOUND;
  else if (e->type != SHD_STRING || e->vlen != tlen || memcmp(e->kv + e->klen, token, tlen) != 0)
    rc = SHD_MISMATCH;
  else {
    entry_drop(d, e);
    rc = SHD_OK;
  }
  pthread_mutex_unlock(&d->mu);
  return push_result(L, rc);
}

/* ---- waiting for a value to change ---- */

/* True when e (NULL: absent) holds the waiter's old value. */
static int change_same(const shd_waiter_t *w, const shd_entry_t *e) {
  if (!e) return w->otype == SHD_NIL;
  shd_value_t old = {w->otype, w->onum, w->key + w->klen, w->olen};
  return w->otype != SHD_NIL && entry_equals(e, &old);
}

/* A copy of e's value (NULL: absent) taken under the mutex, pushed after. */
typedef struct shd_copy {
  shd_value_t v;
  char *str;                       /* owned, SHD_STRING only */
  int nomem;
} shd_copy_t;

static void copy_value(const shd_entry_t *e, shd_copy_t *c) {
  memset(c, 0, sizeof *c);
  if (!e) return;
  c->v.type = e->type;
  c->v.num = e->num;
  if (e->type != SHD_STRING) return;
  c->str = malloc(e->vlen ? e->vlen : 1);
  if (!c->str) {
    c->nomem = 1;
    return;
  }
  memcpy(c->str, e->kv + e->klen, e->vlen);
  c->v.len = e->vlen;
}

/* Pushes the copy (frees it): 1 value, or nil, "no memory". */
static int push_copy(lua_State *L, shd_copy_t *c) {
  if (c->nomem) return push_result(L, SHD_NOMEM);
  switch (c->v.type) {
  case SHD_STRING: lua_pushlstring(L, c->str, c->v.len); break;
  case SHD_NUMBER: lua_pushnumber(L, c->v.num); break;
  case SHD_BOOLEAN: lua_pushboolean(L, c->v.num != 0); break;
  default: lua_pushnil(L); break;
  }
  free(c->str);
  return 1;
}

/* Milliseconds until `at` (uv_hrtime), rounded up, plus one so that the
 * timer never fires before it; at least 1. */
static uint64_t ms_until(uint64_t at, uint64_t now) {
  if (at <= now) return 1;
  return (at - now + 999999) / 1000000 + 1;
}

/* Queues w (under the mutex) and arms its timer for the earlier of its
 * timeout and the expiry of the entry it waits on (expiry removes the key
 * without any writer to wake it). */
static void change_arm(shd_waiter_t *w, uint64_t entry_expire, uint64_t now) {
  uint64_t at = w->deadline_ns;
  if (entry_expire && entry_expire < at) at = entry_expire;
  uv_update_time(w->co->vm->loop);
  uv_timer_start(&w->timer, waiter_on_timer, ms_until(at, now), 0);
}

/* Woken (the key was written or removed) or the timer fired: resume the
 * coroutine with the new value or "timeout", or wait on if the value is
 * still the old one (a write of the same value, an early timer). The
 * check and the re-queueing happen under one mutex hold, so no write in
 * between is missed. */
static void change_recheck(shd_waiter_t *w) {
  if (w->done) return;
  wxd_shdict_t *d = w->d;
  uint64_t now = uv_hrtime();
  shd_copy_t c;
  pthread_mutex_lock(&d->mu);
  if (w->linked) waiter_dequeue(d, w);
  shd_entry_t *e = lookup(d, w->key, w->klen, w->hash, now);
  int same = change_same(w, e);
  if (same && now < w->deadline_ns) {
    uint64_t expire = e ? e->expire_ns : 0;
    waiter_link(d, w);
    pthread_mutex_unlock(&d->mu);
    change_arm(w, expire, now);
    return;
  }
  if (!same) copy_value(e, &c);
  pthread_mutex_unlock(&d->mu);
  w->done = 1;
  waiter_close(w);
  wxd_co_t *co = w->co;
  if (same) {
    lua_pushnil(co->T);
    lua_pushliteral(co->T, "timeout");
    wxd_co_resume(co, 2);
    return;
  }
  wxd_co_resume(co, push_copy(co->T, &c));
}

/* d:wait_change(key, old, timeout_s) -> value | nil | nil, "timeout" |
 * nil, "no memory". When key does not hold `old` (nil: absent), returns its
 * value at once (nil when absent). Otherwise the coroutine waits, woken the
 * moment the key is written (set, add, replace, incr, cas), removed
 * (delete, eviction, flush) or expires, and returns the new value; if the
 * value is still `old` at the timeout, nil, "timeout". A write of the same
 * value goes on waiting. Waiting needs a wxd coroutine; a cancelled
 * coroutine (a VM shutting down, a killed task) leaves the queue. */
static int dict_wait_change(lua_State *L) {
  shd_state_t *st = state(L);
  wxd_shdict_t *d = check_dict(L, 1);
  size_t klen;
  const char *key = check_key(L, 2, &klen);
  shd_value_t old = {SHD_NIL, 0, NULL, 0};
  if (!lua_isnil(L, 3)) check_value(L, 3, &old);
  lua_Number timeout = check_number(L, 4);
  luaL_argcheck(L, timeout >= 0 && timeout <= 1e9, 4, "expected a timeout in seconds, 0..1e9");
  uint64_t h = hash_key(d, key, klen);
  shd_waiter_t *w = NULL;
  for (;;) {
    uint64_t now = uv_hrtime();
    pthread_mutex_lock(&d->mu);
    shd_entry_t *e = lookup(d, key, klen, h, now);
    int same = e ? (old.type != SHD_NIL && entry_equals(e, &old)) : old.type == SHD_NIL;
    if (!same) {
      /* Changed already: the common case, no allocation but the scratch. */
      shd_value_t v = {SHD_NIL, 0, NULL, 0};
      int nomem = 0;
      if (e) nomem = value_to_scratch(st, e, &v) != 0;
      pthread_mutex_unlock(&d->mu);
      free(w);
      if (nomem) return push_result(L, SHD_NOMEM);
      shd_copy_t c = {v, NULL, 0};
      if (v.type == SHD_STRING) {
        lua_pushlstring(L, st->buf ? st->buf : "", v.len);
        scratch_trim(st);
        return 1;
      }
      return push_copy(L, &c);
    }
    if (timeout <= 0) {
      pthread_mutex_unlock(&d->mu);
      free(w);
      lua_pushnil(L);
      lua_pushliteral(L, "timeout");
      return 2;
    }
    if (w) {
      /* Queued under the same mutex hold as the check, so that a write in
       * between cannot be missed. */
      wxd_co_t *co = w->co;
      uint64_t expire = e ? e->expire_ns : 0;
      w->wake.run = waiter_on_wake;
      w->bell = co->vm->bell;
      w->deadline_ns = now + (uint64_t)(timeout * 1e9);
      waiter_link(d, w);
      pthread_mutex_unlock(&d->mu);
      uv_timer_init(co->vm->loop, &w->timer);
      w->timer.data = w;
      change_arm(w, expire, now);
      return wxd_co_yield_cancellable(co, L, waiter_cancel, w);
    }
    pthread_mutex_unlock(&d->mu);
    /* Waiting: allocate outside the mutex, then look again. */
    wxd_co_t *co = wxd_co_current(L, "wxd.shdict wait_change"); /* raises outside a coroutine */
    if (!co->vm->bell) return luaL_error(L, "wxd.shdict wait_change: this loop has no bell to be woken by");
    size_t olen = old.type == SHD_STRING ? old.len : 0;
    w = calloc(1, sizeof *w + klen + olen);
    if (!w) return push_result(L, SHD_NOMEM);
    memcpy(w->key, key, klen);
    if (olen) memcpy(w->key + klen, old.str, olen);
    w->klen = klen;
    w->hash = h;
    w->d = d;
    w->co = co;
    w->change = 1;
    w->otype = (uint8_t)old.type;
    w->onum = old.num;
    w->olen = olen;
  }
}

/* ---- module functions ---- */

static void push_dict(lua_State *L, wxd_shdict_t *d) {
  shd_ud_t *ud = lua_newuserdata(L, sizeof *ud);
  ud->d = d;
  luaL_getmetatable(L, SHDICT_MT);
  lua_setmetatable(L, -2);
}

/* shdict.find(name) -> dict userdata | nil */
static int mod_find(lua_State *L) {
  size_t len;
  const char *name = luaL_checklstring(L, 1, &len);
  wxd_shdict_t *d = wxd_shdict_find(registry_of(L), name, len);
  if (!d) {
    lua_pushnil(L);
    return 1;
  }
  push_dict(L, d);
  return 1;
}

/* shdict.declare(name, bytes) -> dict userdata | nil, err. Outside a
 * server only (lua/wxd/shdict.lua raises the errors at its caller);
 * declaring an existing name with the same size returns it. */
static int mod_declare(lua_State *L) {
  shd_state_t *st = state(L);
  const char *name = luaL_checkstring(L, 1);
  lua_Number bytes = luaL_checknumber(L, 2);
  wxd_vm_t *vm = wxd_vm_get(L);
  char err[256] = "";
  wxd_shdict_t *d = NULL;
  if (vm && vm->shdicts) {
    snprintf(err, sizeof err, "a server's dictionaries come from config.lua");
  } else if (!(bytes >= (lua_Number)WXD_SHDICT_MIN_BYTES && bytes <= (lua_Number)WXD_SHDICT_MAX_BYTES)) {
    snprintf(err, sizeof err, "shdict \"%s\": size must be 64k..1024g", name);
  } else if (!st->own && !(st->own = wxd_shdict_registry_new())) {
    snprintf(err, sizeof err, "out of memory");
  } else if ((d = wxd_shdict_find(st->own, name, strlen(name))) != NULL) {
    if (d->cap != (size_t)bytes)
      snprintf(err, sizeof err, "shdict \"%s\" is already declared with %zu bytes", name, d->cap);
  } else if (wxd_shdict_registry_add(st->own, name, (size_t)bytes, err, sizeof err) == 0) {
    d = wxd_shdict_find(st->own, name, strlen(name));
  }
  if (err[0]) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  push_dict(L, d);
  return 1;
}

/* shdict.in_server() -> true when dictionaries come from a server's config. */
static int mod_in_server(lua_State *L) {
  wxd_vm_t *vm = wxd_vm_get(L);
  lua_pushboolean(L, vm && vm->shdicts);
  return 1;
}

/* shdict.names() -> the declared names, in order of declaration. */
static int mod_names(lua_State *L) {
  const wxd_shdict_registry_t *reg = registry_of(L);
  lua_newtable(L);
  int i = 0;
  for (wxd_shdict_t *d = reg ? reg->first : NULL; d; d = d->next) {
    lua_pushstring(L, d->name);
    lua_rawseti(L, -2, ++i);
  }
  return 1;
}

/* shdict.token() -> 32 random hex digits (a lock holder's identity). */
static int mod_token(lua_State *L) {
  unsigned char r[16];
  if (wxd_random_bytes(r, sizeof r) != 0) return luaL_error(L, "shdict.token: no random bytes (errno %d)", errno);
  static const char hex[] = "0123456789abcdef";
  char out[32];
  for (int i = 0; i < 16; i++) {
    out[2 * i] = hex[r[i] >> 4];
    out[2 * i + 1] = hex[r[i] & 15];
  }
  lua_pushlstring(L, out, sizeof out);
  return 1;
}

static int state_gc(lua_State *L) {
  shd_state_t *st = lua_touserdata(L, 1);
  free(st->buf);
  st->buf = NULL;
  st->cap = 0;
  /* Lock waiters of this state's loop were resumed or cancelled before the
   * VM closed (wxd_vm_free requires it), so none is queued here. */
  wxd_shdict_registry_free(st->own);
  st->own = NULL;
  return 0;
}

int wxd_open_shdict(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"get", dict_get},         {"set", dict_set},       {"add", dict_add},
      {"replace", dict_replace}, {"incr", dict_incr},     {"delete", dict_delete},
      {"ttl", dict_ttl},         {"keys", dict_keys},     {"flush_all", dict_flush_all},
      {"stats", dict_stats},     {"_lock", dict_lock},    {"_unlock", dict_unlock},
      {"cas", dict_cas},         {"wait_change", dict_wait_change},
      {NULL, NULL},
  };
  static const luaL_Reg fns[] = {
      {"find", mod_find},   {"declare", mod_declare}, {"in_server", mod_in_server},
      {"names", mod_names}, {"token", mod_token},     {NULL, NULL},
  };
  shd_state_t *st = lua_newuserdata(L, sizeof *st);
  memset(st, 0, sizeof *st);
  luaL_newmetatable(L, STATE_MT);
  lua_pushcfunction(L, state_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  int sidx = lua_gettop(L);

  luaL_newmetatable(L, SHDICT_MT);
  lua_createtable(L, 0, 12);
  lua_pushvalue(L, sidx);
  luaL_openlib(L, NULL, methods, 1);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, dict_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushliteral(L, "wxd.shdict");
  lua_setfield(L, -2, "__metatable");
  lua_pop(L, 1);

  lua_createtable(L, 0, 5);
  lua_pushvalue(L, sidx);
  luaL_openlib(L, NULL, fns, 1);
  return 1;
}
