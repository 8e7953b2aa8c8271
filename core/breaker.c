/* breaker: see breaker.h. */
#include "breaker.h"

#include <lauxlib.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "log.h"
#include "vm.h"

#define BREAKER_MT "wxd.breaker"
#define NSLOTS 10

enum { CLOSED = 0, OPEN, HALF_OPEN };
static const char *const state_names[] = {"closed", "open", "half_open"};

typedef struct {
  uint32_t failures;    /* consecutive failures that open it; 0: not used */
  double failure_rate;  /* in (0, 1]; 0: not used */
  uint32_t min_calls;   /* calls in the window before the rate counts */
  double window_ns;
  double cooldown_ns;
  uint32_t probes;      /* half-open: calls at a time, successes to close */
  double retry_ratio;   /* tokens per first attempt */
  double retry_max;     /* tokens kept at most */
} breaker_conf_t;

typedef struct wxd_breaker {
  pthread_mutex_t mu;
  char name[64];
  breaker_conf_t conf;
  int state;
  uint32_t consecutive;           /* failures in a row (closed) */
  double opened_at;               /* ns */
  uint32_t inflight;              /* half-open probes not yet reported */
  uint32_t probe_ok;              /* half-open probes that succeeded */
  struct {
    int64_t epoch;                /* which slot-long span of time it counts */
    uint32_t calls, fails;
  } slots[NSLOTS];
  double retry_tokens;
  /* counters since the breaker was made */
  uint64_t calls, successes, failures, rejected, retries, retries_denied;
  uint64_t opened, half_opened, closed;
  struct wxd_breaker *next;
} wxd_breaker_t;

/* Breakers are named after upstreams; a name per request or per user would
 * grow the registry, and the metrics labelled by name, without end. */
#define MAX_BREAKERS 1024

static pthread_mutex_t registry_mu = PTHREAD_MUTEX_INITIALIZER;
static wxd_breaker_t *registry;
static int nbreakers;

/* A state change, reported after the mutex is released. */
typedef struct {
  int from, to;
  uint32_t consecutive, calls, fails;
} change_t;

/* ---- state (b->mu held) ---- */

static int64_t epoch_of(const wxd_breaker_t *b, double now) {
  return (int64_t)floor(now / (b->conf.window_ns / NSLOTS));
}

static void window_sums(const wxd_breaker_t *b, double now, uint32_t *calls, uint32_t *fails) {
  int64_t cur = epoch_of(b, now);
  *calls = *fails = 0;
  for (int i = 0; i < NSLOTS; i++)
    if (b->slots[i].epoch > cur - NSLOTS && b->slots[i].epoch <= cur) {
      *calls += b->slots[i].calls;
      *fails += b->slots[i].fails;
    }
}

static void window_clear(wxd_breaker_t *b) { memset(b->slots, 0, sizeof b->slots); }

static void go(wxd_breaker_t *b, int to, double now, change_t *ch) {
  ch->from = b->state;
  ch->to = to;
  ch->consecutive = b->consecutive;
  window_sums(b, now, &ch->calls, &ch->fails);
  b->state = to;
  if (to == OPEN) {
    b->opened_at = now;
    b->opened++;
  } else if (to == HALF_OPEN) {
    b->inflight = b->probe_ok = 0;
    b->consecutive = 0; /* the probes decide now */
    window_clear(b);
    b->half_opened++;
  } else {
    b->consecutive = 0;
    window_clear(b);
    b->closed++;
  }
}

/* Returns 1 when the call may go, 0 when it fails fast (-1: a retry
 * refused by the budget). *probe is 0, or for a half-open probe the number
 * of that half-open spell (b->half_opened), so that a probe reporting after
 * its spell ended is not taken for one of the next spell. */
static int breaker_allow(wxd_breaker_t *b, int retry, double now, uint64_t *probe, change_t *ch) {
  *probe = 0;
  if (b->state == OPEN && now - b->opened_at >= b->conf.cooldown_ns) go(b, HALF_OPEN, now, ch);
  if (b->state == OPEN) {
    b->rejected++;
    return 0;
  }
  if (b->state == HALF_OPEN) {
    if (b->inflight >= b->conf.probes) {
      b->rejected++;
      return 0;
    }
  }
  if (retry) {
    if (b->retry_tokens < 1) {
      b->retries_denied++;
      return -1;
    }
    b->retry_tokens -= 1;
    b->retries++;
  } else {
    b->retry_tokens += b->conf.retry_ratio;
    if (b->retry_tokens > b->conf.retry_max) b->retry_tokens = b->conf.retry_max;
  }
  if (b->state == HALF_OPEN) {
    b->inflight++;
    *probe = b->half_opened;
  }
  b->calls++;
  return 1;
}

static void breaker_report(wxd_breaker_t *b, int ok, uint64_t probe, double now, change_t *ch) {
  if (ok) b->successes++;
  else b->failures++;
  /* A probe of an earlier spell, or a call admitted before it opened,
   * says nothing about the upstream now. */
  if (probe && probe != b->half_opened) return;
  if (probe && b->state == HALF_OPEN && b->inflight > 0) b->inflight--;
  if (b->state == HALF_OPEN) {
    if (!probe) return;
    if (!ok) go(b, OPEN, now, ch);
    else if (++b->probe_ok >= b->conf.probes) go(b, CLOSED, now, ch);
    return;
  }
  if (b->state == OPEN) return;
  int64_t e = epoch_of(b, now);
  int i = (int)(((e % NSLOTS) + NSLOTS) % NSLOTS);
  if (b->slots[i].epoch != e) {
    b->slots[i].epoch = e;
    b->slots[i].calls = b->slots[i].fails = 0;
  }
  b->slots[i].calls++;
  if (ok) {
    b->consecutive = 0;
    return;
  }
  b->slots[i].fails++;
  b->consecutive++;
  if (b->conf.failures && b->consecutive >= b->conf.failures) {
    go(b, OPEN, now, ch);
    return;
  }
  if (b->conf.failure_rate > 0) {
    uint32_t calls, fails;
    window_sums(b, now, &calls, &fails);
    if (calls >= b->conf.min_calls && calls > 0 && (double)fails / calls >= b->conf.failure_rate) go(b, OPEN, now, ch);
  }
}

/* ---- Lua ---- */

static wxd_breaker_t *check_breaker(lua_State *L) {
  return *(wxd_breaker_t **)luaL_checkudata(L, 1, BREAKER_MT);
}

static double now_arg(lua_State *L, int idx) {
  if (lua_isnoneornil(L, idx)) return (double)uv_hrtime();
  return luaL_checknumber(L, idx) * 1e9;
}

static void log_change(lua_State *L, const wxd_breaker_t *b, const change_t *ch) {
  if (ch->from == ch->to) return;
  wxd_vm_t *vm = wxd_vm_get(L);
  char esc[6 * sizeof b->name], extra[512];
  /* wxd_json_escape writes no NUL: the length it returns ends the string. */
  esc[wxd_json_escape(esc, sizeof esc - 1, b->name, strlen(b->name))] = '\0';
  int n = snprintf(extra, sizeof extra, "\"breaker\":\"%s\",\"from\":\"%s\",\"to\":\"%s\"", esc,
                   state_names[ch->from], state_names[ch->to]);
  /* Why it opened; the counts mean nothing for the other changes. */
  if (ch->from == CLOSED && ch->to == OPEN && n > 0 && (size_t)n < sizeof extra)
    snprintf(extra + n, sizeof extra - (size_t)n, ",\"consecutive_failures\":%u,\"window_calls\":%u,\"window_failures\":%u",
             ch->consecutive, ch->calls, ch->fails);
  wxd_log(ch->to == OPEN ? WXD_LOG_WARN : WXD_LOG_INFO, vm ? vm->worker : -1, "circuit breaker state change", extra);
}

static double num_field(lua_State *L, int t, const char *k, double def, double lo, double hi) {
  lua_getfield(L, t, k);
  double v = def;
  if (!lua_isnil(L, -1)) {
    if (!lua_isnumber(L, -1)) luaL_error(L, "wxd.breaker: %s must be a number", k);
    v = lua_tonumber(L, -1);
  }
  lua_pop(L, 1);
  if (!(v >= lo && v <= hi)) luaL_error(L, "wxd.breaker: %s must be in %f..%f", k, lo, hi);
  return v;
}

/* breaker.new(name, { failures, failure_rate, min_calls, window, cooldown,
 * probes, retry_ratio, retry_max }) -> breaker. Defaults in breaker.lua. */
static int mod_new(lua_State *L) {
  size_t nlen;
  const char *name = luaL_checklstring(L, 1, &nlen);
  luaL_checktype(L, 2, LUA_TTABLE);
  if (nlen == 0 || nlen >= sizeof((wxd_breaker_t *)0)->name) return luaL_error(L, "wxd.breaker: name must be 1..63 bytes");
  breaker_conf_t c;
  c.failures = (uint32_t)num_field(L, 2, "failures", 5, 0, 1e6);
  c.failure_rate = num_field(L, 2, "failure_rate", 0.5, 0, 1);
  c.min_calls = (uint32_t)num_field(L, 2, "min_calls", 20, 1, 1e9);
  c.window_ns = num_field(L, 2, "window", 10, 0.01, 86400) * 1e9;
  c.cooldown_ns = num_field(L, 2, "cooldown", 5, 0, 86400) * 1e9;
  c.probes = (uint32_t)num_field(L, 2, "probes", 1, 1, 1e6);
  c.retry_ratio = num_field(L, 2, "retry_ratio", 0.2, 0, 1e6);
  c.retry_max = num_field(L, 2, "retry_max", 10, 0, 1e9);
  pthread_mutex_lock(&registry_mu);
  wxd_breaker_t *b = registry;
  while (b && strcmp(b->name, name) != 0) b = b->next;
  if (!b && nbreakers >= MAX_BREAKERS) {
    pthread_mutex_unlock(&registry_mu);
    return luaL_error(L, "wxd.breaker: too many breakers (%d): name them after upstreams, not after requests "
                      "or users", MAX_BREAKERS);
  }
  if (b) {
    pthread_mutex_lock(&b->mu);
    b->conf = c;
    pthread_mutex_unlock(&b->mu);
  } else {
    b = calloc(1, sizeof *b);
    if (b) {
      pthread_mutex_init(&b->mu, NULL);
      snprintf(b->name, sizeof b->name, "%s", name);
      b->conf = c;
      b->next = registry;
      registry = b;
      nbreakers++;
    }
  }
  pthread_mutex_unlock(&registry_mu);
  if (!b) {
    lua_pushnil(L);
    lua_pushliteral(L, "no memory");
    return 2;
  }
  wxd_breaker_t **ud = lua_newuserdata(L, sizeof *ud);
  *ud = b;
  luaL_getmetatable(L, BREAKER_MT);
  lua_setmetatable(L, -2);
  return 1;
}

/* b:allow([retry [, at]]) -> true, probe (false, or the spell's number to
 * hand back to report) | nil, "open" | nil, "retry budget" */
static int br_allow(lua_State *L) {
  wxd_breaker_t *b = check_breaker(L);
  int retry = lua_toboolean(L, 2);
  double now = now_arg(L, 3);
  change_t ch = {0, 0, 0, 0, 0};
  uint64_t probe;
  pthread_mutex_lock(&b->mu);
  int r = breaker_allow(b, retry, now, &probe, &ch);
  pthread_mutex_unlock(&b->mu);
  log_change(L, b, &ch);
  if (r > 0) {
    lua_pushboolean(L, 1);
    if (probe) lua_pushnumber(L, (lua_Number)probe);
    else lua_pushboolean(L, 0);
    return 2;
  }
  lua_pushnil(L);
  if (r == 0) lua_pushliteral(L, "open");
  else lua_pushliteral(L, "retry budget");
  return 2;
}

/* b:report(ok, probe [, at]) -> the state after it (probe: what allow gave),
 * and the state before when this report changed it: exactly one reporter
 * sees each change, whichever the worker (wxd.alert's breaker alerts,
 * wxd.degrade's switches). */
static int br_report(lua_State *L) {
  wxd_breaker_t *b = check_breaker(L);
  int ok = lua_toboolean(L, 2);
  uint64_t probe = lua_type(L, 3) == LUA_TNUMBER ? (uint64_t)lua_tonumber(L, 3) : 0;
  double now = now_arg(L, 4);
  change_t ch = {0, 0, 0, 0, 0};
  pthread_mutex_lock(&b->mu);
  breaker_report(b, ok, probe, now, &ch);
  int state = b->state;
  pthread_mutex_unlock(&b->mu);
  log_change(L, b, &ch);
  lua_pushstring(L, state_names[state]);
  if (ch.from == ch.to) return 1;
  lua_pushstring(L, state_names[ch.from]);
  return 2;
}

/* b:state([at]) -> "closed" | "open" | "half_open", seconds of cooldown left */
static int br_state(lua_State *L) {
  wxd_breaker_t *b = check_breaker(L);
  double now = now_arg(L, 2);
  pthread_mutex_lock(&b->mu);
  int state = b->state;
  double left = state == OPEN ? b->conf.cooldown_ns - (now - b->opened_at) : 0;
  pthread_mutex_unlock(&b->mu);
  /* An open breaker past its cooldown lets the next call probe. */
  if (state == OPEN && left <= 0) state = HALF_OPEN;
  lua_pushstring(L, state_names[state]);
  lua_pushnumber(L, left > 0 ? left / 1e9 : 0);
  return 2;
}

/* b:reset() -> closes it and forgets the counts (not the counters). */
static int br_reset(lua_State *L) {
  wxd_breaker_t *b = check_breaker(L);
  change_t ch = {0, 0, 0, 0, 0};
  pthread_mutex_lock(&b->mu);
  if (b->state != CLOSED) go(b, CLOSED, (double)uv_hrtime(), &ch);
  b->consecutive = 0;
  b->inflight = b->probe_ok = 0;
  b->retry_tokens = 0;
  window_clear(b);
  pthread_mutex_unlock(&b->mu);
  log_change(L, b, &ch);
  lua_pushboolean(L, 1);
  return 1;
}

static void set_num(lua_State *L, const char *k, double v) {
  lua_pushnumber(L, v);
  lua_setfield(L, -2, k);
}

static int br_stats(lua_State *L) {
  wxd_breaker_t *b = check_breaker(L);
  double now = (double)uv_hrtime();
  pthread_mutex_lock(&b->mu);
  wxd_breaker_t c = *b;
  uint32_t calls, fails;
  window_sums(b, now, &calls, &fails);
  pthread_mutex_unlock(&b->mu);
  lua_createtable(L, 0, 16);
  lua_pushstring(L, c.name);
  lua_setfield(L, -2, "name");
  lua_pushstring(L, state_names[c.state]);
  lua_setfield(L, -2, "state");
  set_num(L, "consecutive_failures", c.consecutive);
  set_num(L, "window_calls", calls);
  set_num(L, "window_failures", fails);
  set_num(L, "calls", (double)c.calls);
  set_num(L, "successes", (double)c.successes);
  set_num(L, "failures", (double)c.failures);
  set_num(L, "rejected", (double)c.rejected);
  set_num(L, "retries", (double)c.retries);
  set_num(L, "retries_denied", (double)c.retries_denied);
  set_num(L, "retry_tokens", c.retry_tokens);
  set_num(L, "opened", (double)c.opened);
  set_num(L, "half_opened", (double)c.half_opened);
  set_num(L, "closed", (double)c.closed);
  return 1;
}

static int br_tostring(lua_State *L) {
  lua_pushfstring(L, "wxd.breaker(%s)", check_breaker(L)->name);
  return 1;
}

static int br_eq(lua_State *L) {
  lua_pushboolean(L, check_breaker(L) == *(wxd_breaker_t **)luaL_checkudata(L, 2, BREAKER_MT));
  return 1;
}

void wxd_breaker_each(void (*fn)(void *arg, const wxd_breaker_usage_t *u), void *arg) {
  double now = (double)uv_hrtime();
  pthread_mutex_lock(&registry_mu);
  for (wxd_breaker_t *b = registry; b; b = b->next) {
    pthread_mutex_lock(&b->mu);
    int state = b->state;
    /* As b:state() says: an open breaker past its cooldown lets the next call probe. */
    if (state == OPEN && now - b->opened_at >= b->conf.cooldown_ns) state = HALF_OPEN;
    wxd_breaker_usage_t u = {b->name, state_names[state], (double)b->calls, (double)b->successes,
                             (double)b->failures, (double)b->rejected, (double)b->retries,
                             (double)b->retries_denied, (double)b->opened, (double)b->half_opened,
                             (double)b->closed};
    pthread_mutex_unlock(&b->mu);
    fn(arg, &u);
  }
  pthread_mutex_unlock(&registry_mu);
}

int wxd_open_breaker(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"allow", br_allow}, {"report", br_report}, {"state", br_state},
      {"reset", br_reset}, {"stats", br_stats},   {NULL, NULL},
  };
  static const luaL_Reg fns[] = {{"new", mod_new}, {NULL, NULL}};
  luaL_newmetatable(L, BREAKER_MT);
  lua_createtable(L, 0, 5);
  luaL_openlib(L, NULL, methods, 0);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, br_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushcfunction(L, br_eq);
  lua_setfield(L, -2, "__eq");
  lua_pushliteral(L, BREAKER_MT);
  lua_setfield(L, -2, "__metatable");
  lua_pop(L, 1);
  lua_createtable(L, 0, 1);
  luaL_openlib(L, NULL, fns, 0);
  return 1;
}
