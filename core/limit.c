/* limit: see limit.h. */
#include "limit.h"

#include <lauxlib.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <uv.h>

#include "shdict.h"

#define LIMIT_MT "wxd.limit"
#define MIN_BUCKETS 64
/* Idle keys reclaimed per call: more than one so that reclaiming outpaces
 * new keys, few enough that no call pays for a long sweep. */
#define RECLAIM_PER_CALL 4

enum { KIND_BUCKET = 1, KIND_WINDOW = 2 };

typedef struct lim_entry {
  struct lim_entry *hnext;         /* hash chain */
  struct lim_entry *newer, *older; /* LRU list, l->newest ... l->oldest */
  uint64_t hash;
  double a;                        /* bucket: TAT (ns); window: its start (ns) */
  double prev, cur;                /* window: counts of the previous and current window */
  double idle_at;                  /* ns from which the state equals a fresh one */
  uint32_t klen;
  char key[];
} lim_entry_t;

typedef struct wxd_limiter {
  pthread_mutex_t mu;
  char name[64];
  int kind;                        /* KIND_* */
  double rate, burst;              /* bucket */
  double limit, window_ns;         /* window */
  size_t max_keys;
  size_t count;
  size_t bytes;                    /* entries' charges (the bucket array apart) */
  uint64_t allowed, rejected;
  uint64_t reclaimed;              /* idle keys dropped */
  uint64_t evictions;              /* live keys dropped at max_keys */
  uint64_t sipkey[2];
  lim_entry_t **buckets;
  size_t nbuckets;                 /* a power of two */
  lim_entry_t *newest, *oldest;
  struct wxd_limiter *next;        /* registry list */
} wxd_limiter_t;

/* The process-wide registry: limiters are added, never removed. */
static pthread_mutex_t registry_mu = PTHREAD_MUTEX_INITIALIZER;
static wxd_limiter_t *registry;

/* What malloc hands out for an entry, plus its share of the bucket array. */
static size_t charge_of(size_t klen) {
  size_t n = sizeof(lim_entry_t) + klen + 8;
  return ((n + 15) & ~(size_t)15) + sizeof(lim_entry_t *);
}

/* ---- entries (l->mu held) ---- */

static void lru_unlink(wxd_limiter_t *l, lim_entry_t *e) {
  if (e->newer) e->newer->older = e->older;
  else l->newest = e->older;
  if (e->older) e->older->newer = e->newer;
  else l->oldest = e->newer;
  e->newer = e->older = NULL;
}

static void lru_push(wxd_limiter_t *l, lim_entry_t *e) {
  e->newer = NULL;
  e->older = l->newest;
  if (l->newest) l->newest->newer = e;
  l->newest = e;
  if (!l->oldest) l->oldest = e;
}

static void entry_remove(wxd_limiter_t *l, lim_entry_t *e) {
  lim_entry_t **p = &l->buckets[e->hash & (l->nbuckets - 1)];
  while (*p != e) p = &(*p)->hnext;
  *p = e->hnext;
  lru_unlink(l, e);
  l->count--;
  l->bytes -= charge_of(e->klen);
  free(e);
}

static lim_entry_t *entry_find(wxd_limiter_t *l, uint64_t h, const char *key, size_t klen) {
  for (lim_entry_t *e = l->buckets[h & (l->nbuckets - 1)]; e; e = e->hnext)
    if (e->hash == h && e->klen == klen && memcmp(e->key, key, klen) == 0) return e;
  return NULL;
}

/* Doubles the bucket array; on allocation failure the chains just grow. */
static void grow(wxd_limiter_t *l) {
  size_t n = l->nbuckets * 2;
  lim_entry_t **b = calloc(n, sizeof *b);
  if (!b) return;
  for (size_t i = 0; i < l->nbuckets; i++) {
    lim_entry_t *e = l->buckets[i];
    while (e) {
      lim_entry_t *next = e->hnext;
      e->hnext = b[e->hash & (n - 1)];
      b[e->hash & (n - 1)] = e;
      e = next;
    }
  }
  free(l->buckets);
  l->buckets = b;
  l->nbuckets = n;
}

/* Drops up to `max` of the oldest keys while they are idle; 0: no bound. */
static size_t reclaim(wxd_limiter_t *l, double now, size_t max) {
  size_t n = 0;
  while (l->oldest && l->oldest->idle_at <= now && (max == 0 || n < max)) {
    entry_remove(l, l->oldest);
    l->reclaimed++;
    n++;
  }
  return n;
}

/* A fresh state for `e` at `now`. */
static void entry_reset(const wxd_limiter_t *l, lim_entry_t *e, double now) {
  e->a = l->kind == KIND_BUCKET ? now : floor(now / l->window_ns) * l->window_ns;
  e->prev = e->cur = 0;
  e->idle_at = now;
}

/* ---- the two algorithms (l->mu held). Each fills out[]: remaining,
 * reset (s), retry_after (s, 0 when allowed), and returns 1 when allowed. */

static int bucket_take(wxd_limiter_t *l, lim_entry_t *e, double cost, double now, double out[3]) {
  double t = 1e9 / l->rate;          /* ns per token */
  double tau = l->burst * t;         /* how far ahead of now the TAT may run */
  double tat = e->a > now ? e->a : now;
  double next = tat + cost * t;
  int ok = next - now <= tau + 1e-3; /* 1 ps of slack for rounding */
  if (ok) {
    e->a = next;
    tat = next;
  }
  double rem = floor((tau - (tat - now)) / t + 1e-9);
  out[0] = rem > 0 ? rem : 0;
  out[1] = (tat - now) / 1e9;
  out[2] = ok ? 0 : (next - now - tau) / 1e9;
  e->idle_at = tat;
  return ok;
}

static void window_roll(wxd_limiter_t *l, lim_entry_t *e, double now) {
  if (now < e->a + l->window_ns) return;
  double n = floor((now - e->a) / l->window_ns);
  e->prev = n == 1 ? e->cur : 0;
  e->cur = 0;
  e->a += n * l->window_ns;
}

static int window_take(wxd_limiter_t *l, lim_entry_t *e, double cost, double now, double out[3]) {
  double w = l->window_ns;
  window_roll(l, e, now);
  double elapsed = now - e->a;
  double est = e->prev * (1 - elapsed / w) + e->cur;
  int ok = est + cost <= l->limit + 1e-9;
  double retry = 0;
  if (ok) {
    e->cur += cost;
    est += cost;
  } else {
    double need = l->limit - cost; /* the estimate must fall to this */
    if (need < 0) {
      retry = INFINITY;
    } else if (e->cur <= need && e->prev > 0) {
      double at = w * (1 - (need - e->cur) / e->prev);
      retry = at > elapsed ? at - elapsed : 0;
    } else {
      retry = (w - elapsed) + (e->cur > 0 ? w * (1 - need / e->cur) : 0);
    }
  }
  double rem = floor(l->limit - est + 1e-9);
  out[0] = rem > 0 ? rem : 0;
  double idle = e->cur > 0 ? e->a + 2 * w : e->prev > 0 ? e->a + w : now;
  out[1] = (idle - now) / 1e9;
  out[2] = retry / 1e9;
  e->idle_at = idle;
  return ok;
}

/* Takes `cost` for `key` at `now`. Returns 1 allowed, 0 refused, -1 out of
 * memory (nothing taken). */
static int limiter_take(wxd_limiter_t *l, const char *key, size_t klen, double cost, double now,
                        double out[3]) {
  uint64_t h = wxd_siphash13(l->sipkey, key, klen);
  pthread_mutex_lock(&l->mu);
  reclaim(l, now, RECLAIM_PER_CALL);
  lim_entry_t *e = entry_find(l, h, key, klen);
  if (e) {
    lru_unlink(l, e);
    if (e->idle_at <= now) entry_reset(l, e, now);
  } else {
    while (l->count >= l->max_keys && l->oldest) {
      entry_remove(l, l->oldest);
      l->evictions++;
    }
    e = malloc(sizeof *e + klen);
    if (!e) {
      pthread_mutex_unlock(&l->mu);
      return -1;
    }
    e->hash = h;
    e->klen = (uint32_t)klen;
    memcpy(e->key, key, klen);
    entry_reset(l, e, now);
    size_t b = h & (l->nbuckets - 1);
    e->hnext = l->buckets[b];
    l->buckets[b] = e;
    l->count++;
    l->bytes += charge_of(klen);
    if (l->count > l->nbuckets) grow(l);
  }
  lru_push(l, e);
  int ok = l->kind == KIND_BUCKET ? bucket_take(l, e, cost, now, out) : window_take(l, e, cost, now, out);
  if (ok) l->allowed++;
  else l->rejected++;
  /* A state that is fresh again weighs nothing: drop it now. */
  if (e->idle_at <= now) {
    entry_remove(l, e);
    l->reclaimed++;
  }
  pthread_mutex_unlock(&l->mu);
  return ok;
}

/* ---- registry ---- */

static void set_params(wxd_limiter_t *l, int kind, double a, double b, size_t max_keys) {
  l->kind = kind;
  if (kind == KIND_BUCKET) {
    l->rate = a;
    l->burst = b;
  } else {
    l->limit = a;
    l->window_ns = b * 1e9;
  }
  l->max_keys = max_keys;
}

/* The limiter called `name`, made or updated. NULL: out of memory, or the
 * name belongs to a limiter of the other kind (*kind_clash set). */
static wxd_limiter_t *limiter_get(const char *name, int kind, double a, double b, size_t max_keys, int *kind_clash) {
  *kind_clash = 0;
  pthread_mutex_lock(&registry_mu);
  wxd_limiter_t *l = registry;
  while (l && strcmp(l->name, name) != 0) l = l->next;
  if (l) {
    if (l->kind != kind) {
      *kind_clash = 1;
      l = NULL;
    } else {
      pthread_mutex_lock(&l->mu);
      int changed = kind == KIND_BUCKET ? (l->rate != a || l->burst != b) : (l->limit != a || l->window_ns != b * 1e9);
      set_params(l, kind, a, b, max_keys);
      /* States computed under other parameters would be wrong: start over. */
      if (changed)
        while (l->oldest) entry_remove(l, l->oldest);
      pthread_mutex_unlock(&l->mu);
    }
    pthread_mutex_unlock(&registry_mu);
    return l;
  }
  l = calloc(1, sizeof *l);
  if (l) l->buckets = calloc(MIN_BUCKETS, sizeof *l->buckets);
  if (!l || !l->buckets) {
    free(l);
    pthread_mutex_unlock(&registry_mu);
    return NULL;
  }
  pthread_mutex_init(&l->mu, NULL);
  snprintf(l->name, sizeof l->name, "%s", name);
  l->nbuckets = MIN_BUCKETS;
  set_params(l, kind, a, b, max_keys);
  if (getrandom(l->sipkey, sizeof l->sipkey, 0) != (ssize_t)sizeof l->sipkey) {
    l->sipkey[0] = uv_hrtime();
    l->sipkey[1] = (uint64_t)(uintptr_t)l;
  }
  l->next = registry;
  registry = l;
  pthread_mutex_unlock(&registry_mu);
  return l;
}

/* ---- Lua ---- */

static wxd_limiter_t *check_limiter(lua_State *L) {
  return *(wxd_limiter_t **)luaL_checkudata(L, 1, LIMIT_MT);
}

static double now_arg(lua_State *L, int idx) {
  if (lua_isnoneornil(L, idx)) return (double)uv_hrtime();
  return luaL_checknumber(L, idx) * 1e9;
}

/* limit.new(name, "bucket"|"window", rate|limit, burst|window_s, max_keys) -> limiter */
static int mod_new(lua_State *L) {
  size_t nlen;
  const char *name = luaL_checklstring(L, 1, &nlen);
  const char *kname = luaL_checkstring(L, 2);
  double a = luaL_checknumber(L, 3), b = luaL_checknumber(L, 4);
  lua_Number mk = luaL_optnumber(L, 5, WXD_LIMIT_DEFAULT_MAX_KEYS);
  int kind = strcmp(kname, "bucket") == 0 ? KIND_BUCKET : strcmp(kname, "window") == 0 ? KIND_WINDOW : 0;
  if (!kind) return luaL_error(L, "wxd.limit: kind must be \"bucket\" or \"window\"");
  if (nlen == 0 || nlen >= sizeof((wxd_limiter_t *)0)->name)
    return luaL_error(L, "wxd.limit: name must be 1..63 bytes");
  if (!(a > 0 && a <= 1e9) || !(b > 0 && b <= 1e9))
    return luaL_error(L, "wxd.limit: rate, burst, limit and window must be numbers in (0, 1e9]");
  if (!(mk >= 1 && mk <= 1e9)) return luaL_error(L, "wxd.limit: max_keys must be 1..1e9");
  int clash;
  wxd_limiter_t *l = limiter_get(name, kind, a, b, (size_t)mk, &clash);
  if (!l) {
    if (clash) return luaL_error(L, "wxd.limit: \"%s\" is a limiter of another kind", name);
    lua_pushnil(L);
    lua_pushliteral(L, "no memory");
    return 2;
  }
  wxd_limiter_t **ud = lua_newuserdata(L, sizeof *ud);
  *ud = l;
  luaL_getmetatable(L, LIMIT_MT);
  lua_setmetatable(L, -2);
  return 1;
}

/* lim:take(key [, cost = 1 [, at]]) -> allowed, remaining, reset_s, retry_after_s
 * | nil, "no memory". `at` (seconds on a monotonic clock) is for specs. */
static int lim_take(lua_State *L) {
  wxd_limiter_t *l = check_limiter(L);
  size_t klen;
  const char *key = luaL_checklstring(L, 2, &klen);
  lua_Number cost = luaL_optnumber(L, 3, 1);
  if (klen > WXD_LIMIT_KEY_MAX) return luaL_error(L, "wxd.limit: key longer than %d bytes", WXD_LIMIT_KEY_MAX);
  if (!(cost >= 0 && cost <= 1e9)) return luaL_error(L, "wxd.limit: cost must be a number in 0..1e9");
  double out[3];
  int ok = limiter_take(l, key, klen, cost, now_arg(L, 4), out);
  if (ok < 0) {
    lua_pushnil(L);
    lua_pushliteral(L, "no memory");
    return 2;
  }
  lua_pushboolean(L, ok);
  lua_pushnumber(L, out[0]);
  lua_pushnumber(L, out[1]);
  lua_pushnumber(L, out[2]);
  return 4;
}

/* lim:reset(key) -> true: forgets the key. */
static int lim_reset(lua_State *L) {
  wxd_limiter_t *l = check_limiter(L);
  size_t klen;
  const char *key = luaL_checklstring(L, 2, &klen);
  uint64_t h = wxd_siphash13(l->sipkey, key, klen);
  pthread_mutex_lock(&l->mu);
  lim_entry_t *e = entry_find(l, h, key, klen);
  if (e) entry_remove(l, e);
  pthread_mutex_unlock(&l->mu);
  lua_pushboolean(L, 1);
  return 1;
}

/* lim:sweep([at]) -> number of idle keys reclaimed (every one of them). */
static int lim_sweep(lua_State *L) {
  wxd_limiter_t *l = check_limiter(L);
  double now = now_arg(L, 2);
  size_t n = 0;
  pthread_mutex_lock(&l->mu);
  /* Idle keys behind a busy one are found by a walk, not only at the tail. */
  for (lim_entry_t *e = l->oldest; e;) {
    lim_entry_t *newer = e->newer;
    if (e->idle_at <= now) {
      entry_remove(l, e);
      l->reclaimed++;
      n++;
    }
    e = newer;
  }
  pthread_mutex_unlock(&l->mu);
  lua_pushinteger(L, (lua_Integer)n);
  return 1;
}

static void set_num(lua_State *L, const char *k, double v) {
  lua_pushnumber(L, v);
  lua_setfield(L, -2, k);
}

/* lim:stats() -> { name, kind, keys, bytes, max_keys, allowed, rejected, reclaimed, evictions, ... } */
static int lim_stats(lua_State *L) {
  wxd_limiter_t *l = check_limiter(L);
  pthread_mutex_lock(&l->mu);
  wxd_limiter_t c = *l;
  pthread_mutex_unlock(&l->mu);
  lua_createtable(L, 0, 12);
  lua_pushstring(L, c.name);
  lua_setfield(L, -2, "name");
  lua_pushstring(L, c.kind == KIND_BUCKET ? "bucket" : "window");
  lua_setfield(L, -2, "kind");
  if (c.kind == KIND_BUCKET) {
    set_num(L, "rate", c.rate);
    set_num(L, "burst", c.burst);
  } else {
    set_num(L, "limit", c.limit);
    set_num(L, "window", c.window_ns / 1e9);
  }
  set_num(L, "keys", (double)c.count);
  set_num(L, "bytes", (double)(c.bytes + c.nbuckets * sizeof(lim_entry_t *)));
  set_num(L, "max_keys", (double)c.max_keys);
  set_num(L, "allowed", (double)c.allowed);
  set_num(L, "rejected", (double)c.rejected);
  set_num(L, "reclaimed", (double)c.reclaimed);
  set_num(L, "evictions", (double)c.evictions);
  return 1;
}

static int lim_tostring(lua_State *L) {
  wxd_limiter_t *l = check_limiter(L);
  lua_pushfstring(L, "wxd.limit(%s)", l->name);
  return 1;
}

static int lim_eq(lua_State *L) {
  lua_pushboolean(L, check_limiter(L) == *(wxd_limiter_t **)luaL_checkudata(L, 2, LIMIT_MT));
  return 1;
}

/* limit.names() -> every limiter's name, in no particular order. */
static int mod_names(lua_State *L) {
  lua_newtable(L);
  int i = 0;
  pthread_mutex_lock(&registry_mu);
  for (wxd_limiter_t *l = registry; l; l = l->next) {
    lua_pushstring(L, l->name);
    lua_rawseti(L, -2, ++i);
  }
  pthread_mutex_unlock(&registry_mu);
  return 1;
}

int wxd_open_limit(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"take", lim_take}, {"reset", lim_reset}, {"sweep", lim_sweep}, {"stats", lim_stats}, {NULL, NULL},
  };
  static const luaL_Reg fns[] = {{"new", mod_new}, {"names", mod_names}, {NULL, NULL}};
  luaL_newmetatable(L, LIMIT_MT);
  lua_createtable(L, 0, 4);
  luaL_openlib(L, NULL, methods, 0);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, lim_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushcfunction(L, lim_eq);
  lua_setfield(L, -2, "__eq");
  lua_pushliteral(L, LIMIT_MT);
  lua_setfield(L, -2, "__metatable");
  lua_pop(L, 1);
  lua_createtable(L, 0, 2);
  luaL_openlib(L, NULL, fns, 0);
  return 1;
}
