/* timer: see timer.h. */
#include "timer.h"

#include <lauxlib.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

#define TIMER_MT "wxd.timer"

typedef struct wxd_timer {
  uv_timer_t handle;
  wxd_vm_t *vm;           /* owner; not touched once closed */
  struct wxd_timer **box; /* the Lua handle pointing at us, or NULL */
  struct wxd_timer *next; /* vm->timers */
  int fn_ref;             /* the Lua function (registry of vm->L) */
  uint64_t delay_ms;
  uint64_t interval_ms;   /* 0: fires once */
  unsigned running : 1;   /* a run's coroutine has not ended */
  unsigned started : 1;
  unsigned closed : 1;    /* cancelled: fires no more */
  unsigned handle_closed : 1;
} wxd_timer_t;

static void timer_maybe_free(wxd_timer_t *t) {
  if (t->closed && t->handle_closed && !t->running) free(t);
}

static void timer_handle_closed(uv_handle_t *h) {
  wxd_timer_t *t = h->data;
  t->handle_closed = 1;
  timer_maybe_free(t);
}

/* Stops the timer for good and drops every link to Lua. Idempotent. */
static void timer_close(wxd_timer_t *t) {
  if (t->closed) return;
  t->closed = 1;
  wxd_vm_t *vm = t->vm;
  wxd_timer_t **p = (wxd_timer_t **)&vm->timers;
  while (*p && *p != t) p = &(*p)->next;
  if (*p) *p = t->next;
  luaL_unref(vm->L, LUA_REGISTRYINDEX, t->fn_ref);
  t->fn_ref = LUA_NOREF;
  if (t->box) *t->box = NULL;
  t->box = NULL;
  uv_close((uv_handle_t *)&t->handle, timer_handle_closed);
}

static void on_run_done(wxd_co_t *co, int status) {
  wxd_timer_t *t = co->data;
  if (status != 0) wxd_co_log_error(co, "timer error");
  t->running = 0;
  if (!t->closed && t->interval_ms == 0) timer_close(t); /* a one-shot is done */
  timer_maybe_free(t);
}

/* The VM went away while a run waited (shutdown deadline). */
static void on_run_abandoned(wxd_co_t *co) {
  wxd_timer_t *t = co->data;
  t->running = 0;
  timer_maybe_free(t);
}

static void on_fire(uv_timer_t *h) {
  wxd_timer_t *t = h->data;
  if (t->closed) return;
  if (t->running) {
    /* The previous run still waits: skip this tick rather than overlap. */
    wxd_logf(WXD_LOG_DEBUG, t->vm->worker, "timer tick skipped: the previous run has not ended");
    return;
  }
  wxd_co_t *co = wxd_co_new(t->vm, WXD_CO_TIMER, on_run_done, t);
  if (!co) {
    wxd_log(WXD_LOG_ERROR, t->vm->worker, "timer: out of memory", NULL);
    return;
  }
  co->abandon = on_run_abandoned;
  t->running = 1;
  lua_rawgeti(co->T, LUA_REGISTRYINDEX, t->fn_ref);
  wxd_co_resume(co, 0);
}

static void timer_start(wxd_timer_t *t) {
  if (t->started || t->closed) return;
  t->started = 1;
  uv_update_time(t->vm->loop);
  uv_timer_start(&t->handle, on_fire, t->delay_ms, t->interval_ms);
}

void wxd_timers_activate(wxd_vm_t *vm) {
  vm->active = 1;
  for (wxd_timer_t *t = vm->timers; t; t = t->next) timer_start(t);
}

void wxd_timers_close(wxd_vm_t *vm) {
  while (vm->timers) timer_close(vm->timers);
}

/* ---- Lua ---- */

static int create(lua_State *L, int repeat) {
  lua_Number ms = luaL_checknumber(L, 1);
  luaL_argcheck(L, ms >= 0 && ms < 1e10, 1, "expected milliseconds in 0..1e10");
  if (repeat) luaL_argcheck(L, ms >= 1, 1, "a repeating timer needs at least 1 ms");
  luaL_checktype(L, 2, LUA_TFUNCTION);
  int worker_only = -1;
  if (!lua_isnoneornil(L, 3)) {
    luaL_checktype(L, 3, LUA_TTABLE);
    lua_getfield(L, 3, "worker");
    if (!lua_isnil(L, -1)) worker_only = (int)luaL_checkinteger(L, -1);
    lua_pop(L, 1);
  }
  wxd_vm_t *vm = wxd_vm_get(L);
  wxd_timer_t **box = lua_newuserdata(L, sizeof *box);
  *box = NULL;
  luaL_getmetatable(L, TIMER_MT);
  lua_setmetatable(L, -2);
  /* { worker = 0 }: background jobs that must run once per process, not
   * once per worker. Outside a server (wxd script) the job runs. */
  if (worker_only >= 0 && vm->worker >= 0 && vm->worker != worker_only) return 1;
  wxd_timer_t *t = calloc(1, sizeof *t);
  if (!t) return luaL_error(L, "wxd.timer: out of memory");
  t->vm = vm;
  t->delay_ms = (uint64_t)ms;
  t->interval_ms = repeat ? (uint64_t)ms : 0;
  lua_pushvalue(L, 2);
  t->fn_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  uv_timer_init(vm->loop, &t->handle);
  t->handle.data = t;
  t->box = box;
  *box = t;
  t->next = vm->timers;
  vm->timers = t;
  if (vm->active) timer_start(t);
  return 1;
}

/* timer.after(ms, fn [, {worker = N}]) -> handle */
static int timer_after(lua_State *L) { return create(L, 0); }
/* timer.every(ms, fn [, {worker = N}]) -> handle */
static int timer_every(lua_State *L) { return create(L, 1); }

/* handle:cancel(): stops it; a run in progress finishes. Idempotent. */
static int timer_cancel(lua_State *L) {
  wxd_timer_t **box = luaL_checkudata(L, 1, TIMER_MT);
  if (*box) timer_close(*box);
  return 0;
}

/* handle:active(): true while it may still fire. */
static int timer_active(lua_State *L) {
  wxd_timer_t **box = luaL_checkudata(L, 1, TIMER_MT);
  lua_pushboolean(L, *box != NULL);
  return 1;
}

/* Dropping the handle does not stop the timer (like setInterval). */
static int timer_gc(lua_State *L) {
  wxd_timer_t **box = luaL_checkudata(L, 1, TIMER_MT);
  if (*box) (*box)->box = NULL;
  *box = NULL;
  return 0;
}

int wxd_open_timer(lua_State *L) {
  static const luaL_Reg methods[] = {{"cancel", timer_cancel}, {"active", timer_active}, {NULL, NULL}};
  static const luaL_Reg fns[] = {{"after", timer_after}, {"every", timer_every}, {NULL, NULL}};
  luaL_newmetatable(L, TIMER_MT);
  lua_createtable(L, 0, 2);
  luaL_register(L, NULL, methods);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, timer_gc);
  lua_setfield(L, -2, "__gc");
  lua_pop(L, 1);
  /* A replaced generation runs no more jobs; a freed one leaves no handle. */
  wxd_vm_on_close(wxd_vm_get(L), WXD_VM_ON_RETIRE | WXD_VM_ON_FREE, wxd_timers_close);
  lua_createtable(L, 0, 2);
  luaL_register(L, NULL, fns);
  return 1;
}
