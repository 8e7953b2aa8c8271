/* vm: see vm.h. */
#include "vm.h"

#include <lauxlib.h>
#include <luajit.h>
#include <lualib.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bell.h"
#include "log.h"
#include "version.h"

/* Registry keys: addresses of these statics are unique light userdata. */
static const char vm_key = 0;
static const char co_map_key = 0;

wxd_vm_t *wxd_vm_get(lua_State *L) {
  lua_pushlightuserdata(L, (void *)&vm_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  wxd_vm_t *vm = lua_touserdata(L, -1);
  lua_pop(L, 1);
  return vm;
}

void wxd_vm_preload(lua_State *L, const char *name, lua_CFunction open) {
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "preload");
  lua_pushcfunction(L, open);
  lua_setfield(L, -2, name);
  lua_pop(L, 2);
}

/* ---- wxd.core: the primitives every other module stands on ---- */

typedef struct sleep_req {
  uv_timer_t timer;
  wxd_co_t *co;
} sleep_req_t;

static void sleep_closed(uv_handle_t *h) { free(h->data); }

static void sleep_fired(uv_timer_t *t) {
  sleep_req_t *s = t->data;
  wxd_co_t *co = s->co;
  uv_close((uv_handle_t *)t, sleep_closed);
  wxd_co_resume(co, 0);
}

static void sleep_cancel(void *wait) {
  sleep_req_t *s = wait;
  uv_close((uv_handle_t *)&s->timer, sleep_closed);
}

/* wxd.sleep(ms): suspends the calling coroutine, never the loop. */
static int core_sleep(lua_State *L) {
  lua_Number ms = luaL_checknumber(L, 1);
  luaL_argcheck(L, ms >= 0 && ms < 1e10, 1, "expected milliseconds in 0..1e10");
  wxd_co_t *co = wxd_co_current(L, "wxd.sleep");
  sleep_req_t *s = malloc(sizeof *s);
  if (!s) return luaL_error(L, "wxd.sleep: out of memory");
  uv_timer_init(co->vm->loop, &s->timer);
  s->timer.data = s;
  /* The loop's clock is only refreshed once per turn; a long-running chunk
   * (a script's start-up, a busy handler) would otherwise shorten the sleep. */
  uv_update_time(co->vm->loop);
  s->co = co;
  uv_timer_start(&s->timer, sleep_fired, (uint64_t)ms, 0);
  return wxd_co_yield_cancellable(co, L, sleep_cancel, s);
}

/* wxd.now(): seconds since the epoch, with milliseconds (cached per loop turn). */
static int core_now(lua_State *L) {
  uv_timeval64_t tv;
  uv_gettimeofday(&tv);
  lua_pushnumber(L, (lua_Number)tv.tv_sec + (lua_Number)tv.tv_usec / 1e6);
  return 1;
}

/* wxd.monotonic_ms(): the loop's monotonic clock, for measuring durations. */
static int core_monotonic_ms(lua_State *L) {
  lua_pushnumber(L, (lua_Number)uv_hrtime() / 1e6);
  return 1;
}

/* core.log(level, msg [, extra_json]): extra_json is the inside of a JSON
 * object, already encoded by lua/wxd/log.lua. */
static int core_log(lua_State *L) {
  const char *level = luaL_checkstring(L, 1);
  size_t msg_len;
  const char *msg = luaL_checklstring(L, 2, &msg_len);
  const char *extra = luaL_optstring(L, 3, NULL);
  int lv = wxd_log_parse_level(level);
  if (lv < 0) return luaL_argerror(L, 1, "expected debug, info, warn or error");
  wxd_log_n(lv, wxd_vm_get(L)->worker, msg, msg_len, extra);
  return 0;
}

static int core_log_enabled(lua_State *L) {
  int lv = wxd_log_parse_level(luaL_checkstring(L, 1));
  lua_pushboolean(L, lv >= 0 && lv >= wxd_log_level());
  return 1;
}

static int core_worker_id(lua_State *L) {
  lua_pushinteger(L, wxd_vm_get(L)->worker);
  return 1;
}

/* core.in_coroutine(): true when wxd primitives may yield here. */
static int core_in_coroutine(lua_State *L) {
  lua_pushboolean(L, wxd_co_lookup(L) != NULL);
  return 1;
}

/* core.kill(pid, "HUP"|"TERM"|"INT"|"KILL"|"USR2"|0): signals a process
 * (wxd reload, wxd restart).
 * Returns true, or nil, err. */
static int core_kill(lua_State *L) {
  lua_Integer pid = luaL_checkinteger(L, 1);
  const char *name = luaL_optstring(L, 2, "TERM");
  int sig;
  if (strcmp(name, "HUP") == 0) sig = SIGHUP;
  else if (strcmp(name, "TERM") == 0) sig = SIGTERM;
  else if (strcmp(name, "INT") == 0) sig = SIGINT;
  else if (strcmp(name, "KILL") == 0) sig = SIGKILL;
  else if (strcmp(name, "USR2") == 0) sig = SIGUSR2;
  else if (strcmp(name, "0") == 0) sig = 0;
  else return luaL_argerror(L, 2, "expected HUP, TERM, INT, KILL, USR2 or 0");
  luaL_argcheck(L, pid > 0, 1, "expected a process id");
  int rc = uv_kill((int)pid, sig);
  if (rc != 0) {
    lua_pushnil(L);
    lua_pushstring(L, uv_strerror(rc));
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* core.bell_stats(): { posted, runs } of this VM's loop bell (bell.h): items
 * other threads handed to the loop, and the wake-ups that ran them; nil
 * where the VM has none. */
static int core_bell_stats(lua_State *L) {
  wxd_bell_t *b = wxd_vm_get(L)->bell;
  if (!b) return 0;
  pthread_mutex_lock(&b->mu);
  uint64_t posted = b->posted, runs = b->runs;
  pthread_mutex_unlock(&b->mu);
  lua_createtable(L, 0, 2);
  lua_pushnumber(L, (lua_Number)posted);
  lua_setfield(L, -2, "posted");
  lua_pushnumber(L, (lua_Number)runs);
  lua_setfield(L, -2, "runs");
  return 1;
}

int wxd_open_core(lua_State *L) {
  static const luaL_Reg fns[] = {
      {"sleep", core_sleep},
      {"now", core_now},
      {"monotonic_ms", core_monotonic_ms},
      {"log", core_log},
      {"log_enabled", core_log_enabled},
      {"worker_id", core_worker_id},
      {"in_coroutine", core_in_coroutine},
      {"kill", core_kill},
      {"bell_stats", core_bell_stats},
      {NULL, NULL},
  };
  lua_createtable(L, 0, 10);
  luaL_register(L, NULL, fns);
  lua_pushstring(L, WXD_VERSION);
  lua_setfield(L, -2, "version");
  return 1;
}

/* ---- VM ---- */

static void prepend_path(lua_State *L, const char *dir) {
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "path");
  const char *old = lua_tostring(L, -1);
  lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;%s", dir, dir, old ? old : "");
  lua_setfield(L, -3, "path");
  lua_pop(L, 2);
}

static __thread wxd_co_t *volatile running_co;

static int interrupt_running(int why);

/* A coroutine past the hard limit that the interrupt did not stop: code
 * compiled by the JIT, which no hook reaches. Failing the allocation would
 * crash the process (see wxd_vm_t); freezing the thread bounds the memory,
 * and the watchdog notices the stuck loop and replaces the process. */
static void freeze(wxd_vm_t *vm) {
  wxd_logf(WXD_LOG_ERROR, vm->worker,
           "a handler took its Lua state over twice limits.lua_memory_bytes in compiled code: frozen until the "
           "process is replaced");
  for (;;) pause();
}

/* The allocator of a state with a memory limit (see wxd_vm_t): counts,
 * and leaves the allocating to LuaJIT's own allocator, which is much
 * faster than malloc for its many small objects. */
static void *limited_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  wxd_vm_t *vm = ud;
  size_t old = ptr ? osize : 0;
  if (nsize == 0) {
    vm->base_alloc(vm->base_ud, ptr, osize, 0);
    vm->mem_used -= old;
    return NULL;
  }
  if (nsize > old && vm->mem_used + (nsize - old) > vm->mem_limit && running_co && running_co->vm == vm) {
    if (!vm->mem_over) {
      vm->mem_over = 1;
      interrupt_running(WXD_RUNAWAY_MEMORY);
      /* A trace leaves its machine code when the collector reaches its
       * atomic phase: a collector in a hurry gets there sooner, and the
       * hook then fires. (Only a field is set: no collection runs here.) */
      lua_gc(vm->L, LUA_GCSETSTEPMUL, 4000);
    } else if (vm->mem_used + (nsize - old) > 2 * vm->mem_limit) {
      freeze(vm);
    }
  }
  void *p = vm->base_alloc(vm->base_ud, ptr, osize, nsize);
  if (p) vm->mem_used = vm->mem_used - old + nsize;
  return p;
}

wxd_vm_t *wxd_vm_new(uv_loop_t *loop, const wxd_vm_options_t *opts) {
  wxd_vm_t *vm = calloc(1, sizeof *vm);
  if (!vm) return NULL;
  vm->mem_limit = opts->mem_limit;
  lua_State *L = luaL_newstate();
  if (!L) {
    free(vm);
    return NULL;
  }
  if (opts->mem_limit) {
    /* Counted from here on: what the new state already holds first. */
    vm->base_alloc = lua_getallocf(L, &vm->base_ud);
    vm->mem_used = (size_t)lua_gc(L, LUA_GCCOUNT, 0) * 1024 + (size_t)lua_gc(L, LUA_GCCOUNTB, 0);
    lua_setallocf(L, limited_alloc, vm);
  }
  vm->L = L;
  vm->loop = loop;
  vm->worker = opts->worker;
  vm->entry_ref = LUA_NOREF;
  vm->http_strings_ref = LUA_NOREF;
  luaL_openlibs(L);

  lua_pushlightuserdata(L, (void *)&vm_key);
  lua_pushlightuserdata(L, vm);
  lua_rawset(L, LUA_REGISTRYINDEX);
  lua_pushlightuserdata(L, (void *)&co_map_key);
  lua_newtable(L);
  lua_rawset(L, LUA_REGISTRYINDEX);

  /* The framework's directory is searched first (it is prepended last), so
   * that an app's module cannot shadow a wxd module by accident. */
  if (opts->app_dir) prepend_path(L, opts->app_dir);
  if (opts->lua_dir) prepend_path(L, opts->lua_dir);

  wxd_vm_preload_modules(L);
  return vm;
}

static void co_unlink(wxd_co_t *co) {
  wxd_vm_t *vm = co->vm;
  if (co->prev) co->prev->next = co->next;
  else vm->cos = co->next;
  if (co->next) co->next->prev = co->prev;
}

void wxd_vm_on_close(wxd_vm_t *vm, unsigned when, wxd_vm_hook_fn fn) {
  for (int i = 0; i < vm->nhooks; i++)
    if (vm->hooks[i].fn == fn) {
      vm->hooks[i].when |= when;
      return;
    }
  if (vm->nhooks == WXD_VM_HOOKS_MAX) {
    fprintf(stderr, "wxd: more than %d close hooks on one VM (raise WXD_VM_HOOKS_MAX)\n",
            WXD_VM_HOOKS_MAX);
    abort();
  }
  vm->hooks[vm->nhooks].fn = fn;
  vm->hooks[vm->nhooks].when = when;
  vm->nhooks++;
}

/* Later modules may stand on earlier ones: they let go first. */
static void run_hooks(wxd_vm_t *vm, unsigned when) {
  for (int i = vm->nhooks - 1; i >= 0; i--)
    if (vm->hooks[i].when & when) vm->hooks[i].fn(vm);
}

void wxd_vm_retire(wxd_vm_t *vm) {
  vm->retired = 1;
  vm->active = 0; /* a request still running on it cannot start timers */
  /* A replaced generation runs no more jobs, nor receives pub/sub messages. */
  run_hooks(vm, WXD_VM_ON_RETIRE);
  if (vm->cos == NULL && vm->on_idle) vm->on_idle(vm);
}

void wxd_vm_cancel_waits(wxd_vm_t *vm) {
  for (wxd_co_t *co = vm->cos; co; co = co->next) {
    if (co->cancel) co->cancel(co->wait);
    co->cancel = NULL;
    co->wait = NULL;
  }
}

void wxd_vm_free(wxd_vm_t *vm) {
  if (!vm) return;
  run_hooks(vm, WXD_VM_ON_FREE);
  while (vm->pool) {
    wxd_co_t *next = vm->pool->next;
    free(vm->pool);
    vm->pool = next;
  }
  wxd_co_t *co = vm->cos;
  while (co) {
    wxd_co_t *next = co->next;
    if (co->abandon) co->abandon(co);
    free(co);
    co = next;
  }
  /* LuaJIT frees its allocator's arena at close only when the state's
   * allocator is its own: give it back, or every generation leaks it. */
  if (vm->base_alloc) lua_setallocf(vm->L, vm->base_alloc, vm->base_ud);
  lua_close(vm->L);
  free(vm);
}

/* Threads that ended normally are reused: creating a thread, anchoring it
 * and mapping it cost more than a request's own Lua work on a fast path. */
#define CO_POOL_MAX 256

static void co_link(wxd_vm_t *vm, wxd_co_t *co) {
  co->prev = NULL;
  co->next = vm->cos;
  if (vm->cos) vm->cos->prev = co;
  vm->cos = co;
}

wxd_co_t *wxd_co_new(wxd_vm_t *vm, int kind, wxd_co_done_cb done, void *data) {
  if (vm->pool) {
    wxd_co_t *co = vm->pool;
    vm->pool = co->next;
    vm->npool--;
    co->done = done;
    co->data = data;
    co->kind = kind;
    co_link(vm, co);
    return co;
  }
  wxd_co_t *co = calloc(1, sizeof *co);
  if (!co) return NULL;
  lua_State *L = vm->L;
  lua_pushlightuserdata(L, (void *)&co_map_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  co->T = lua_newthread(L);
  lua_pushvalue(L, -1);
  co->ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushlightuserdata(L, co);
  lua_rawset(L, -3); /* map[T] = co */
  lua_pop(L, 1);
  co->vm = vm;
  co->done = done;
  co->data = data;
  co->kind = kind;
  co_link(vm, co);
  return co;
}

static void co_free(wxd_co_t *co) {
  lua_State *L = co->vm->L;
  lua_pushlightuserdata(L, (void *)&co_map_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  lua_pushthread(co->T);
  lua_xmove(co->T, L, 1);
  lua_pushnil(L);
  lua_rawset(L, -3);
  lua_pop(L, 1);
  luaL_unref(L, LUA_REGISTRYINDEX, co->ref);
  co_unlink(co);
  free(co);
}

wxd_co_t *wxd_co_lookup(lua_State *L) {
  lua_pushlightuserdata(L, (void *)&co_map_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  lua_pushthread(L);
  lua_rawget(L, -2);
  wxd_co_t *co = lua_touserdata(L, -1);
  lua_pop(L, 2);
  return co;
}

wxd_co_t *wxd_co_current(lua_State *L, const char *what) {
  /* Checked before the caller starts anything: a yield that fails after a
   * timer or write was set up would leave it to resume a coroutine that has
   * moved on (or been reused by another request). */
  /* The main thread runs only what comes before any request: app.lua and
   * the modules it requires, loaded by the server, `wxd check` or a reload. */
  int main_thread = lua_pushthread(L);
  lua_pop(L, 1);
  if (main_thread)
    luaL_error(L,
               "%s: cannot wait while the app is still loading (the top level of app.lua and of the "
               "modules it requires runs before any request): wait inside a handler, or in a timer "
               "started from app.lua with wxd.timer.after(0, fn)",
               what);
  if (!lua_isyieldable(L))
    luaL_error(L,
               "%s: cannot wait here: not from inside require, a metamethod, or a "
               "callback of a C function such as string.gsub or table.sort",
               what);
  wxd_co_t *co = wxd_co_lookup(L);
  if (!co)
    luaL_error(L,
               "%s: cannot wait here: only in a request handler, a timer run, a task or a "
               "script's main chunk (not inside your own coroutine)",
               what);
  return co;
}

int wxd_co_yield(wxd_co_t *co, lua_State *L, int nresults) {
  co->waiting = 1;
  return lua_yield(L, nresults);
}

int wxd_co_yield_cancellable(wxd_co_t *co, lua_State *L, void (*cancel)(void *), void *wait) {
  co->cancel = cancel;
  co->wait = wait;
  co->waiting = 1;
  return lua_yield(L, 0);
}

/* A killed coroutine's turn came: it is dropped instead of run on. */
static int co_end_killed(wxd_co_t *co) {
  wxd_vm_t *vm = co->vm;
  co_free(co);
  if (vm->retired && vm->cos == NULL && vm->on_idle) vm->on_idle(vm);
  return 1;
}

void wxd_co_kill(wxd_co_t *co) {
  if (co->waiting && co->cancel) {
    co->cancel(co->wait);
    co_free(co);
    return;
  }
  co->killed = 1;
}

/* ---- runaway coroutines (watchdog.c) ----
 *
 * The coroutine this thread is running, for the watchdog's signal handler
 * (which runs on this thread): two stores per resume. A coroutine
 * interrupted by wxd_co_interrupt is ended by a count hook that raises at
 * every instruction it runs, so that no pcall inside it can swallow the
 * error and go on. Hooks are global to a LuaJIT state: the hook checks it
 * is still in the interrupted coroutine and removes itself otherwise. */
static __thread wxd_co_t *volatile interrupted_co;
static __thread volatile int interrupt_why;

static __thread atomic_uint_fast64_t *progress;

wxd_co_t *wxd_co_running(void) { return running_co; }

void wxd_co_count_progress(atomic_uint_fast64_t *counter) { progress = counter; }

static void interrupt_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  wxd_co_t *co = interrupted_co;
  if (!co || co != running_co) {
    lua_sethook(L, NULL, 0, 0);
    return;
  }
  if (interrupt_why == WXD_RUNAWAY_MEMORY) lua_pushliteral(L, WXD_RUNAWAY_MEMORY_ERROR);
  else lua_pushliteral(L, WXD_RUNAWAY_ERROR);
  lua_error(L);
}

static int interrupt_running(int why) {
  wxd_co_t *co = running_co;
  if (!co) return 0;
  if (interrupted_co != co) interrupt_why = why;
  interrupted_co = co;
  lua_sethook(co->T, interrupt_hook, LUA_MASKCOUNT, 1);
  return 1;
}

int wxd_co_interrupt(void) { return interrupt_running(WXD_RUNAWAY_TIME); }

static int resume_watched(wxd_co_t *co, int nargs) {
  wxd_co_t *outer = running_co;
  running_co = co;
  int status = lua_resume(co->T, nargs);
  running_co = outer;
  /* Only outermost resumes count: a stuck handler that keeps running
   * coroutines nested inside itself (tasks spawned synchronously) is still
   * stuck. One writer (this thread): a plain increment. */
  if (progress && !outer)
    atomic_store_explicit(progress, atomic_load_explicit(progress, memory_order_relaxed) + 1, memory_order_relaxed);
  if (interrupted_co == co) {
    interrupted_co = NULL;
    lua_sethook(co->T, NULL, 0, 0);
    /* Interrupted after it had already finished: nothing was cut. */
    if (status != 0 && status != LUA_YIELD) co->runaway = interrupt_why;
  }
  return status;
}

int wxd_co_resume(wxd_co_t *co, int nargs) {
  if (co->killed) return co_end_killed(co); /* its primitive just let go of it */
  co->waiting = 0;
  co->cancel = NULL;
  co->wait = NULL;
  int status = resume_watched(co, nargs);
  if (co->killed) {
    if (status == LUA_YIELD && co->waiting) {
      if (!co->cancel) return 0; /* its primitive resumes it, and then it ends */
      co->cancel(co->wait);
    }
    return co_end_killed(co);
  }
  if (status == LUA_YIELD) {
    if (co->waiting) return 0;
    /* A bare coroutine.yield() at the top of a wxd coroutine: nothing would
     * ever resume it, so end it with an error instead of hanging. */
    lua_settop(co->T, 0);
    lua_pushliteral(co->T,
                    "coroutine.yield() called outside a coroutine of your own; "
                    "nothing would resume it");
    status = LUA_ERRRUN;
  }
  wxd_vm_t *vm = co->vm;
  co->done(co, status);
  if (status == 0 && vm->npool < CO_POOL_MAX) {
    lua_settop(co->T, 0);
    co_unlink(co);
    co->data = NULL;
    co->abandon = NULL;
    co->next = vm->pool;
    vm->pool = co;
    vm->npool++;
  } else {
    co_free(co);
  }
  /* Its garbage is unreachable now: the state is back under its limit
   * before the next coroutine runs. */
  if (vm->mem_over) {
    lua_gc(vm->L, LUA_GCSETSTEPMUL, 200); /* LuaJIT's default */
    lua_gc(vm->L, LUA_GCCOLLECT, 0);
    vm->mem_over = vm->mem_used > vm->mem_limit;
  }
  /* The last request of a replaced generation just ended. */
  if (vm->retired && vm->cos == NULL && vm->on_idle) vm->on_idle(vm);
  return 1;
}

void wxd_co_traceback(wxd_co_t *co, const char *msg) {
  luaL_traceback(co->vm->L, co->T, msg, 0);
}

void wxd_vm_log_error(wxd_vm_t *vm, lua_State *T, int level, const char *what) {
  const char *msg = lua_tostring(T, -1);
  luaL_traceback(vm->L, T, msg ? msg : "(error object is not a string)", level);
  char extra[4200];
  const char *tb = lua_tostring(vm->L, -1);
  size_t n = wxd_json_escape(extra + 9, sizeof extra - 12, tb, strlen(tb));
  memcpy(extra, "\"error\":\"", 9);
  extra[9 + n] = '"';
  extra[10 + n] = 0;
  wxd_log(WXD_LOG_ERROR, vm->worker, what, extra);
  lua_pop(vm->L, 1);
}

void wxd_co_log_error(wxd_co_t *co, const char *what) { wxd_vm_log_error(co->vm, co->T, 0, what); }
