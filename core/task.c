/* task: see task.h. */
#include "task.h"

#include <lauxlib.h>
#include <math.h>
#include <stdlib.h>

#include "log.h"
#include "trace.h"
#include "vm.h"

#define TASK_MT "wxd.task"
/* A spawn runs its task on the C stack of the caller, so a task spawning a
 * task spawning a task ... before any of them waits nests C frames (a few
 * hundred bytes each). Past this depth spawn raises instead of crashing;
 * Lua 5.1's limit on nested C calls (LUAI_MAXCCALLS) is the same. */
#define TASK_MAX_NESTING 200
/* Deliveries nested inside one another (see deliver()). */
#define TASK_MAX_DELIVERY_NESTING 100

enum { TASK_RUNNING, TASK_DONE, TASK_FAILED, TASK_CANCELLED };
static const char *const state_names[] = {"running", "done", "failed", "cancelled"};

typedef struct wxd_task_waiter waiter_t;

/* The handle's memory: a userdata, owned by Lua's GC. */
typedef struct task {
  wxd_co_t *co;          /* the task's coroutine while it runs, else NULL */
  waiter_t *head, *tail; /* coroutines waiting for the end, oldest first */
  int state;             /* TASK_* */
  int nresults;          /* values kept in the handle's environment table */
  int error_logged;      /* task_on_error logged the error it raised */
  int has_trace;         /* spawned under a request's trace context: */
  wxd_trace_t trace;     /* a copy of it (log lines, outbound calls); with
                          * trace = false, of the spawner's colour alone */
} task_t;

struct wxd_task_waiter {
  wxd_co_t *co;          /* the waiting coroutine */
  task_t *task;          /* the task it waits for; NULL once on vm->task_ready */
  waiter_t *prev, *next; /* the task's waiters, then vm->task_ready */
  int nresults;          /* pushed on co->T, once on vm->task_ready */
  int timed;             /* wait() had a timeout: `timer` exists */
  uv_timer_t timer;      /* initialised only when timed */
};

/* ---- waiters ---- */

static void waiter_closed(uv_handle_t *h) { free(h->data); }

/* Frees a waiter that is on no list any more. */
static void waiter_free(waiter_t *w) {
  if (!w->timed) free(w);
  /* Closed by the worker's final uv_walk (a VM freed after its loop ran
   * out): that close has completed, and our callback will never run. */
  else if (uv_is_closing((uv_handle_t *)&w->timer)) free(w);
  else uv_close((uv_handle_t *)&w->timer, waiter_closed);
}

static void waiter_unlink(task_t *t, waiter_t *w) {
  if (w->prev) w->prev->next = w->next;
  else t->head = w->next;
  if (w->next) w->next->prev = w->prev;
  else t->tail = w->prev;
  w->prev = w->next = NULL;
  w->task = NULL;
}

static void ready_push(wxd_vm_t *vm, waiter_t *w) {
  w->next = NULL;
  w->prev = vm->task_ready_tail;
  if (vm->task_ready_tail) vm->task_ready_tail->next = w;
  else vm->task_ready = w;
  vm->task_ready_tail = w;
}

static void ready_unlink(wxd_vm_t *vm, waiter_t *w) {
  if (w->prev) w->prev->next = w->next;
  else vm->task_ready = w->next;
  if (w->next) w->next->prev = w->prev;
  else vm->task_ready_tail = w->prev;
  w->prev = w->next = NULL;
}

/* Resumes the ready waiters in order, before the call that ended their
 * task returns. A waiter resumed here may end another task in turn, which
 * delivers again one level deeper; past TASK_MAX_DELIVERY_NESTING levels
 * the waiters are only queued, and the loop at that level resumes them as
 * soon as the coroutine it is running yields or ends: a chain of 100,000
 * tasks ending one another does not nest 100,000 resumes on the C stack.
 * The VM outlives the loop: a coroutine of it is alive while this runs
 * (the task in whose `done` we are, or the caller of cancel()). */
static void deliver(wxd_vm_t *vm) {
  if (vm->task_delivering >= TASK_MAX_DELIVERY_NESTING) return;
  vm->task_delivering++;
  waiter_t *w;
  while ((w = vm->task_ready) != NULL) {
    ready_unlink(vm, w);
    wxd_co_t *co = w->co;
    int n = w->nresults;
    waiter_free(w);
    wxd_co_resume(co, n);
  }
  vm->task_delivering--;
}

/* Pushes onto W what wait() returns for the ended task t, the values taken
 * from T (first .. first+n-1; a failed task's message at `first`). T has a
 * free slot when t is done. Returns the count. */
static int push_outcome(lua_State *W, task_t *t, lua_State *T, int first, int n) {
  if (!lua_checkstack(W, n + 2)) {
    lua_pushnil(W);
    lua_pushliteral(W, "too many results");
    return 2;
  }
  switch (t->state) {
  case TASK_DONE:
    for (int i = 0; i < n; i++) {
      lua_pushvalue(T, first + i);
      lua_xmove(T, W, 1);
    }
    return n;
  case TASK_FAILED: {
    size_t len;
    const char *msg = lua_tolstring(T, first, &len);
    lua_pushnil(W);
    lua_pushlstring(W, msg, len); /* needs no slot on T, whose error may have filled it */
    return 2;
  }
  default:
    lua_pushnil(W);
    lua_pushliteral(W, "cancelled");
    return 2;
  }
}

/* The task ended (t->state says how): every waiter gets the outcome and is
 * resumed, oldest first. */
static void wake_all(wxd_vm_t *vm, task_t *t, lua_State *T, int first, int n) {
  if (!t->head) return;
  waiter_t *w;
  while ((w = t->head) != NULL) {
    waiter_unlink(t, w);
    if (w->timed) uv_timer_stop(&w->timer);
    w->nresults = push_outcome(w->co->T, t, T, first, n);
    ready_push(vm, w);
  }
  deliver(vm);
}

static void waiter_timed_out(uv_timer_t *h) {
  waiter_t *w = h->data;
  wxd_co_t *co = w->co;
  waiter_unlink(w->task, w); /* the task goes on; the other waiters wait */
  waiter_free(w);
  lua_pushnil(co->T);
  lua_pushliteral(co->T, "timeout");
  wxd_co_resume(co, 2);
}

/* The waiting coroutine stops waiting without being resumed (it is a
 * cancelled task, or a shutdown deadline came). */
static void waiter_cancel(void *p) {
  waiter_t *w = p;
  if (w->task) waiter_unlink(w->task, w);
  else ready_unlink(w->co->vm, w);
  waiter_free(w);
}

/* ---- the task's coroutine ---- */

/* The handle, found in the entry wrapper's frame (its first local) after
 * the coroutine ended without returning (a bare coroutine.yield): the
 * wrapper never handed it back. Pushes it and returns 1, or returns 0. */
static int push_handle_from_frames(lua_State *T, task_t *t) {
  lua_Debug ar;
  int lo = 0, hi = 1;
  if (!lua_getstack(T, 0, &ar)) return 0;
  while (lua_getstack(T, hi, &ar)) { /* the deepest level, in O(log depth) probes */
    lo = hi;
    hi *= 2;
  }
  while (hi - lo > 1) {
    int mid = lo + (hi - lo) / 2;
    if (lua_getstack(T, mid, &ar)) lo = mid;
    else hi = mid;
  }
  if (!lua_getstack(T, lo, &ar) || !lua_getlocal(T, &ar, 1)) return 0;
  if (lua_touserdata(T, -1) != t) {
    lua_pop(T, 1);
    return 0;
  }
  return 1;
}

/* Keeps values first .. first+n-1 of T in the environment table of the
 * handle at index h, for wait() calls after the end. */
static void store(lua_State *T, int h, int first, int n) {
  lua_createtable(T, n, 0);
  for (int i = 0; i < n; i++) {
    lua_pushvalue(T, first + i);
    lua_rawseti(T, -2, i + 1);
  }
  lua_setfenv(T, h);
}

/* The error value at the top of L as a string, in place. */
static void error_to_string(lua_State *L) {
  if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER) {
    lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, -1));
    lua_replace(L, -2);
  }
  lua_tostring(L, -1); /* a number becomes its string */
}

/* Called (through pcall) by the message handler of the xpcall around the
 * task's function, where the error was raised: the logged traceback starts
 * there (level 3: under this function, pcall and the handler). Returns the
 * error as a string. After a stack overflow there may be no room left to
 * call it; the handler then passes the error on as it is, and task_done
 * logs it without a traceback. */
static int task_on_error(lua_State *L) {
  lua_settop(L, 1);
  error_to_string(L);
  wxd_vm_log_error(wxd_vm_get(L), L, 3, "task error");
  wxd_co_t *co = wxd_co_lookup(L);
  if (co && co->kind == WXD_CO_TASK) ((task_t *)co->data)->error_logged = 1;
  return 1;
}

static void fail(wxd_co_t *co, task_t *t, int h, int msg) {
  t->state = TASK_FAILED;
  if (h) {
    store(co->T, h, msg, 1);
    t->nresults = 1;
  }
  wake_all(co->vm, t, co->T, msg, 1);
}

static void task_done(wxd_co_t *co, int status) {
  task_t *t = co->data;
  lua_State *T = co->T;
  t->co = NULL;
  if (status == 0 && lua_touserdata(T, 1) == t) {
    /* The wrapper returned the handle, then xpcall's results. */
    int top = lua_gettop(T);
    if (!lua_toboolean(T, 2)) { /* it raised; xpcall unwound its stack */
      lua_settop(T, 3);
      error_to_string(T);
      if (!t->error_logged) wxd_vm_log_error(co->vm, T, 0, "task error");
      fail(co, t, 1, 3);
      return;
    }
    /* Room for the results table and push_outcome's copies, above the
     * results (at most LUAI_MAXCSTACK slots in all). */
    if (!lua_checkstack(T, 4)) {
      lua_settop(T, 2);
      lua_pushliteral(T, "too many results");
      wxd_log(WXD_LOG_ERROR, co->vm->worker, "task error", "\"error\":\"too many results\"");
      fail(co, t, 1, 3);
      return;
    }
    int n = top - 2;
    t->state = TASK_DONE;
    t->nresults = n;
    if (n > 0) store(T, 1, 3, n);
    wake_all(co->vm, t, T, 3, n);
    return;
  }
  /* Ended without returning: a bare coroutine.yield, which nothing would
   * resume (vm.c turned it into this error), with the frames still there. */
  error_to_string(T);
  wxd_co_log_error(co, "task error");
  int msg = lua_gettop(T);
  int h = lua_checkstack(T, 4) && push_handle_from_frames(T, t) ? msg + 1 : 0;
  fail(co, t, h, msg);
}

/* The VM is freed while the task still waits: its waiters (coroutines of
 * the same VM, freed too) will never be resumed. */
static void task_abandoned(wxd_co_t *co) {
  task_t *t = co->data;
  if (t->co != co) return; /* cancelled already */
  t->co = NULL;
  waiter_t *w;
  while ((w = t->head) != NULL) {
    waiter_unlink(t, w);
    waiter_free(w);
  }
}

/* ---- Lua ---- */

/* spawn(fn, ...) -> handle. Upvalues: the handle metatable, the entry
 * wrapper. */
static int task_spawn(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  int nargs = lua_gettop(L) - 1;
  wxd_co_t *parent = wxd_co_lookup(L);
  if (!parent)
    return luaL_error(L, "wxd.task.spawn: only in a request handler, a timer run, a task or a script's "
                         "main chunk (not while app.lua loads, nor inside your own coroutine)");
  wxd_vm_t *vm = parent->vm;
  if (vm->task_nesting >= TASK_MAX_NESTING)
    return luaL_error(L, "wxd.task.spawn: more than %d tasks starting inside one another", TASK_MAX_NESTING);
  task_t *t = lua_newuserdata(L, sizeof *t);
  t->co = NULL;
  t->head = t->tail = NULL;
  t->state = TASK_RUNNING;
  t->nresults = 0;
  t->error_logged = 0;
  wxd_trace_t *pt = wxd_trace_of(parent);
  t->has_trace = pt != NULL;
  if (!pt) pt = wxd_trace_slot(parent); /* trace = false: the colour still goes along */
  if (pt) t->trace = *pt;
  else t->trace.gray[0] = 0;
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_setmetatable(L, -2);
  wxd_co_t *co = wxd_co_new(vm, WXD_CO_TASK, task_done, t);
  if (!co) return luaL_error(L, "wxd.task.spawn: out of memory");
  co->abandon = task_abandoned;
  t->co = co;
  lua_State *T = co->T;
  lua_pushvalue(L, lua_upvalueindex(2));
  lua_xmove(L, T, 1);
  lua_pushvalue(L, -1);
  lua_xmove(L, T, 1);
  lua_insert(L, 1); /* handle, fn, args */
  lua_xmove(L, T, nargs + 1);
  vm->task_nesting++;
  wxd_co_resume(co, nargs + 2);
  vm->task_nesting--;
  return 1;
}

wxd_trace_t *wxd_task_trace(wxd_co_t *co) {
  if (!co || co->kind != WXD_CO_TASK) return NULL;
  task_t *t = co->data;
  return t && t->has_trace ? &t->trace : NULL;
}

wxd_trace_t *wxd_task_slot(wxd_co_t *co) {
  if (!co || co->kind != WXD_CO_TASK) return NULL;
  task_t *t = co->data;
  return t ? &t->trace : NULL;
}

/* What wait() returns for a task that has ended (handle at index 1). */
static int push_stored(lua_State *L, task_t *t) {
  switch (t->state) {
  case TASK_DONE:
    if (t->nresults == 0) return 0;
    luaL_checkstack(L, t->nresults + 1, "task:wait: too many results");
    lua_getfenv(L, 1);
    for (int i = 1; i <= t->nresults; i++) lua_rawgeti(L, -i, i);
    return t->nresults;
  case TASK_FAILED:
    lua_pushnil(L);
    if (t->nresults == 0) {
      lua_pushliteral(L, "failed");
      return 2;
    }
    lua_getfenv(L, 1);
    lua_rawgeti(L, -1, 1);
    lua_remove(L, -2);
    return 2;
  default:
    lua_pushnil(L);
    lua_pushliteral(L, "cancelled");
    return 2;
  }
}

/* handle:wait([timeout_ms]) -> the function's results | nil, err */
static int task_wait(lua_State *L) {
  task_t *t = luaL_checkudata(L, 1, TASK_MT);
  lua_Number ms = -1;
  if (!lua_isnoneornil(L, 2)) {
    ms = luaL_checknumber(L, 2);
    luaL_argcheck(L, ms >= 0 && ms < 1e10, 2, "expected milliseconds in 0..1e10");
  }
  wxd_co_t *co = wxd_co_current(L, "task:wait");
  if (t->state != TASK_RUNNING) return push_stored(L, t);
  if (co == t->co) return luaL_error(L, "task:wait: a task cannot wait for itself");
  if (ms == 0) {
    lua_pushnil(L);
    lua_pushliteral(L, "timeout");
    return 2;
  }
  waiter_t *w = malloc(sizeof *w);
  if (!w) return luaL_error(L, "task:wait: out of memory");
  w->co = co;
  w->task = t;
  w->nresults = 0;
  w->timed = ms > 0;
  w->next = NULL;
  w->prev = t->tail;
  if (t->tail) t->tail->next = w;
  else t->head = w;
  t->tail = w;
  if (w->timed) {
    uv_loop_t *loop = co->vm->loop;
    uv_timer_init(loop, &w->timer);
    w->timer.data = w;
    uv_update_time(loop); /* as wxd.sleep: the loop's clock may be a turn old */
    uv_timer_start(&w->timer, waiter_timed_out, (uint64_t)ceil(ms), 0);
  }
  return wxd_co_yield_cancellable(co, L, waiter_cancel, w);
}

/* handle:cancel() -> true when this call cancelled it, false when it had
 * already ended. */
static int task_cancel(lua_State *L) {
  task_t *t = luaL_checkudata(L, 1, TASK_MT);
  if (t->state != TASK_RUNNING) {
    lua_pushboolean(L, 0);
    return 1;
  }
  wxd_co_t *co = t->co;
  t->state = TASK_CANCELLED;
  t->co = NULL;
  if (co) {
    wxd_vm_t *vm = co->vm;
    wxd_co_kill(co);
    wake_all(vm, t, NULL, 0, 0);
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* handle:done() -> true once it has ended (whichever way). */
static int task_is_done(lua_State *L) {
  task_t *t = luaL_checkudata(L, 1, TASK_MT);
  lua_pushboolean(L, t->state != TASK_RUNNING);
  return 1;
}

/* handle:status() -> "running" | "done" | "failed" | "cancelled" */
static int task_status(lua_State *L) {
  task_t *t = luaL_checkudata(L, 1, TASK_MT);
  lua_pushstring(L, state_names[t->state]);
  return 1;
}

static int task_tostring(lua_State *L) {
  task_t *t = luaL_checkudata(L, 1, TASK_MT);
  lua_pushfstring(L, "wxd.task (%s): %p", state_names[t->state], (void *)t);
  return 1;
}

/* The coroutine's entry, made once per VM. `h` is a local of its bottom
 * frame for as long as the task runs (anchoring the handle, and findable
 * from C), and the call is not a tail call, so that the frame stays. Errors
 * are caught inside the coroutine, so that the stack is unwound before
 * task_done works on it: growing the stack of a thread that overflowed
 * throws, with nothing to catch it outside the coroutine. The handler is
 * Lua and calls task_on_error through pcall: after a stack overflow a C
 * function may find no room to be called, a Lua one of a few slots does. */
static const char entry_wrapper[] =
    "local xpcall, pcall, on_error = ...\n"
    "local function handler(e)\n"
    "  local ok, s = pcall(on_error, e)\n"
    "  if ok then return s end\n"
    "  return e\n"
    "end\n"
    "return function(h, fn, ...) return h, xpcall(fn, handler, ...) end\n";

int wxd_open_task(lua_State *L) {
  static const luaL_Reg methods[] = {{"wait", task_wait},
                                     {"cancel", task_cancel},
                                     {"done", task_is_done},
                                     {"status", task_status},
                                     {NULL, NULL}};
  lua_createtable(L, 0, 1);
  luaL_newmetatable(L, TASK_MT);
  lua_createtable(L, 0, 4);
  luaL_register(L, NULL, methods);
  lua_setfield(L, -2, "__index");
  lua_pushcfunction(L, task_tostring);
  lua_setfield(L, -2, "__tostring");
  if (luaL_loadbuffer(L, entry_wrapper, sizeof entry_wrapper - 1, "=wxd.task") != 0) return lua_error(L);
  lua_getglobal(L, "xpcall");
  lua_getglobal(L, "pcall");
  lua_pushcfunction(L, task_on_error);
  lua_call(L, 3, 1);
  lua_pushcclosure(L, task_spawn, 2);
  lua_setfield(L, -2, "spawn");
  return 1;
}
