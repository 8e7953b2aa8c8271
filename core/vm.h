/* vm: one LuaJIT state with the wxd runtime, and the coroutine scheduler.
 *
 * Every piece of Lua that may wait (a request handler, a `wxd script` file)
 * runs in a wxd coroutine (wxd_co_t). Every native primitive that waits —
 * sleep, fetch, redis, locks, a task, a streamed response — follows one
 * pattern:
 *
 *     wxd_co_t *co = wxd_co_current(L, "what");  // raises if not yieldable
 *     ... start the libuv operation, keep `co` in its request struct ...
 *     return wxd_co_yield(co, L, 0);
 *
 * and its libuv callback pushes the results on co->T and calls
 * wxd_co_resume(co, nresults). When the coroutine finishes (returns or
 * raises), the owner's `done` callback runs with the results on co->T, and
 * the wxd_co_t is freed right after it returns.
 *
 * A coroutine can also be ended from outside without being resumed
 * (wxd_co_kill: a cancelled task, core/task.c): its pending wait is
 * cancelled like at a shutdown deadline, `done` does not run, and its
 * thread is dropped with whatever frames it had.
 */
#ifndef WXD_VM_H
#define WXD_VM_H

#include <lua.h>
#include <stdatomic.h>
#include <uv.h>

typedef struct wxd_co wxd_co_t;
typedef struct wxd_vm wxd_vm_t;

/* status is 0 on success (results are co->T's whole stack) or a Lua error
 * code (the message is at the top of co->T's stack, and co->T is still
 * inspectable for a traceback). */
typedef void (*wxd_co_done_cb)(wxd_co_t *co, int status);

struct wxd_co {
  lua_State *T;          /* the coroutine's thread */
  wxd_vm_t *vm;          /* owning VM */
  wxd_co_done_cb done;   /* called once when the coroutine ends */
  void *data;            /* owner's pointer (request, script, ...) */
  int kind;              /* WXD_CO_* */
  int ref;               /* registry reference anchoring T */
  int waiting;           /* a native primitive will resume it */
  void (*cancel)(void *wait); /* closes the pending wait without resuming */
  void *wait;            /* argument of cancel */
  void (*abandon)(wxd_co_t *co); /* the VM goes while the coroutine waits */
  int killed;            /* wxd_co_kill while it could not end at once */
  int runaway;           /* ended by an interrupt: WXD_RUNAWAY_TIME or _MEMORY */
  wxd_co_t *prev, *next; /* vm's list of live coroutines */
};

enum { WXD_CO_SCRIPT = 1, WXD_CO_REQUEST = 2, WXD_CO_TIMER = 3, WXD_CO_REDIS = 4, WXD_CO_TASK = 5, WXD_CO_WS = 6 };

/* Cleanup a module registers with the VM (wxd_vm_on_close), so that the VM
 * names none of the modules that keep state in it. */
typedef void (*wxd_vm_hook_fn)(wxd_vm_t *vm);
enum { WXD_VM_ON_RETIRE = 1, WXD_VM_ON_FREE = 2 };
#define WXD_VM_HOOKS_MAX 8

typedef struct wxd_vm_options {
  const char *lua_dir; /* framework modules (lua/), or NULL for package.path */
  const char *app_dir; /* app modules, or NULL */
  int worker;          /* worker index, -1 outside workers */
  size_t mem_limit;    /* bytes the state may hold while running a coroutine; 0: no limit */
} wxd_vm_options_t;

struct wxd_vm {
  lua_State *L;
  uv_loop_t *loop;
  int worker;
  wxd_co_t *cos;   /* live coroutines, freed with the VM */
  wxd_co_t *pool;  /* finished coroutines kept for reuse */
  int npool;
  void *owner;     /* the worker or script that owns this VM */
  int entry_ref;   /* the app's request handler (registry), LUA_NOREF if none */
  int http_strings_ref; /* strings every request uses, made once (http.c) */
  unsigned generation; /* app generation this VM holds (hot reload) */
  int retired;     /* replaced by a newer generation: serves no new request */
  /* Called once a retired VM has no coroutine left; the owner frees it. */
  void (*on_idle)(wxd_vm_t *vm);
  wxd_vm_t *next_retired; /* owner's list of retired VMs still draining */
  int active;      /* committed: its timers run (timer.c) */
  struct wxd_timer *timers; /* timers this generation created (timer.c) */
  /* The server's shared dictionaries (shdict.c), set by the worker on each
   * new VM; NULL outside a server. Not owned: it outlives every VM. */
  struct wxd_shdict_registry *shdicts;
  /* The worker's outbound connection pool (fetch.c), set like shdicts so
   * that keep-alive connections outlive generations. Not owned; NULL
   * outside a server (the VM then makes its own). */
  struct wxd_fetch_pool *fetch;
  /* The worker's Redis connections (redis.c), set like fetch; NULL outside
   * a server. Not owned. */
  struct wxd_redis_pool *redis;
  /* The WebSocket topic registry (ws.h), set like shdicts; NULL outside a
   * server. Not owned. */
  struct wxd_ws_topics *ws_topics;
  /* Its loop's bell (bell.h): other threads hand it finished waits. Set by
   * the worker or the script runner; NULL: such waits block. Not owned. */
  struct wxd_bell *bell;
  /* Pub/sub subscriptions this generation made (redis.c): dropped when it
   * retires or is freed. */
  struct wxd_redis_sub *redis_subs;
  /* Waiters of ended tasks with their results pushed, about to be resumed
   * (task.c); empty between callbacks. */
  struct wxd_task_waiter *task_ready, *task_ready_tail;
  int task_delivering; /* deliveries of task_ready nested on the C stack */
  int task_nesting; /* spawns running inside one another on the C stack */
  struct {
    wxd_vm_hook_fn fn;
    unsigned when; /* WXD_VM_ON_* */
  } hooks[WXD_VM_HOOKS_MAX]; /* wxd_vm_on_close, in registration order */
  int nhooks;
  /* Memory accounting (opts.mem_limit). No allocation is ever refused:
   * LuaJIT 2.1 (this build) crashes when an allocation fails inside
   * compiled code. Past the limit, while a coroutine runs, that coroutine
   * is interrupted (its next interpreted instruction raises
   * WXD_RUNAWAY_MEMORY_ERROR); past the hard limit (twice the limit) a
   * compiled loop still allocating is frozen where it is, so that the
   * watchdog replaces the process with the memory bounded (docs/runaway.md). */
  size_t mem_used, mem_limit;
  int mem_over; /* went over the limit since the last full collection */
  lua_Alloc base_alloc; /* LuaJIT's own allocator, which limited_alloc wraps */
  void *base_ud;
};

/* Creates a VM on `loop`. Returns NULL on allocation failure. */
wxd_vm_t *wxd_vm_new(uv_loop_t *loop, const wxd_vm_options_t *opts);
/* Runs the hooks registered for WXD_VM_ON_FREE, then closes the Lua state
 * and frees every coroutine still alive. All libuv handles referring to
 * coroutines must be closed before. */
void wxd_vm_free(wxd_vm_t *vm);
/* Registers `fn` to run when the VM retires (WXD_VM_ON_RETIRE: a replaced
 * generation stops its background work) and/or when it is freed
 * (WXD_VM_ON_FREE: before its coroutines and Lua state go), as `when` says.
 * A module registers when it is opened into the VM. Hooks run in reverse
 * order of registration. Registering a registered `fn` again adds `when`
 * to its entry (a module opened twice). More than WXD_VM_HOOKS_MAX hooks is
 * a programmer error: it aborts. */
void wxd_vm_on_close(wxd_vm_t *vm, unsigned when, wxd_vm_hook_fn fn);
/* The VM of a Lua state (any of its threads). */
wxd_vm_t *wxd_vm_get(lua_State *L);

/* Creates a coroutine. Push the function and its arguments on co->T, then
 * call wxd_co_resume(co, nargs). Returns NULL on allocation failure. */
wxd_co_t *wxd_co_new(wxd_vm_t *vm, int kind, wxd_co_done_cb done, void *data);
/* Runs the coroutine until it waits or ends. When it ends, `done` runs and
 * the coroutine is freed: the caller must not touch `co` afterwards.
 * Returns 1 when the coroutine ended, 0 when it is waiting. */
int wxd_co_resume(wxd_co_t *co, int nargs);
/* The wxd coroutine running `L`, or raises a Lua error naming `what` when L
 * is not one (main state, or a user's own coroutine.create thread). */
wxd_co_t *wxd_co_current(lua_State *L, const char *what);
/* Same without raising: NULL when L is not a wxd coroutine. */
wxd_co_t *wxd_co_lookup(lua_State *L);
/* Marks the coroutine as waiting on a native primitive and yields.
 * `cancel(wait)` must close the primitive's handles without resuming the
 * coroutine (used at a shutdown deadline); NULL if there is nothing to close. */
int wxd_co_yield(wxd_co_t *co, lua_State *L, int nresults);
int wxd_co_yield_cancellable(wxd_co_t *co, lua_State *L, void (*cancel)(void *), void *wait);
/* Ends the coroutine without resuming it: at once when it waits on a
 * cancellable primitive (the wait is cancelled and the coroutine freed);
 * otherwise — it is running right now (it killed itself, or it is on the C
 * stack below the caller), or its wait cannot be cancelled — it is marked
 * and ends at its next yield, return, or resume by its primitive. `done`
 * never runs for it. Does not run on_idle: the caller is running code of
 * this VM. */
void wxd_co_kill(wxd_co_t *co);
/* Marks the VM as replaced: the hooks registered for WXD_VM_ON_RETIRE run,
 * it finishes the coroutines it has and then on_idle runs (at once when it
 * has none). */
void wxd_vm_retire(wxd_vm_t *vm);
/* Cancels every pending wait of the VM: no coroutine will be resumed after
 * this; their owners learn it through `abandon` when the VM is freed. */
void wxd_vm_cancel_waits(wxd_vm_t *vm);
/* Why a coroutine was interrupted, and the errors it ends with. */
enum { WXD_RUNAWAY_TIME = 1, WXD_RUNAWAY_MEMORY = 2 };
#define WXD_RUNAWAY_ERROR "runaway: the handler ran too long without yielding"
#define WXD_RUNAWAY_MEMORY_ERROR "runaway: the handler took the Lua state over limits.lua_memory_bytes"
/* The coroutine this thread is running (innermost), or NULL. */
wxd_co_t *wxd_co_running(void);
/* This thread counts every resume that returns in *counter (the watchdog
 * tells a long busy loop turn from a stuck one by it). */
void wxd_co_count_progress(atomic_uint_fast64_t *counter);
/* Async-signal-safe, on the thread that runs the coroutine (watchdog.c's
 * signal handler): makes the coroutine running now raise
 * WXD_RUNAWAY_ERROR at its next interpreted instruction, and at every one
 * after, until it ends; it ends with co->runaway set. Code compiled by the
 * JIT checks no hook: a compiled loop is not stopped (docs/runaway.md).
 * Returns 0 when no coroutine is running. */
int wxd_co_interrupt(void);
/* Pushes onto co->vm->L a traceback of the ended coroutine for message `msg`. */
void wxd_co_traceback(wxd_co_t *co, const char *msg);
/* Logs `what` at error level with the traceback of a coroutine that ended
 * with an error (its error value at the top of co->T). */
void wxd_co_log_error(wxd_co_t *co, const char *what);
/* The same for a thread of the VM that is still at the error (an xpcall
 * message handler: T's traceback from `level`). */
void wxd_vm_log_error(wxd_vm_t *vm, lua_State *T, int level, const char *what);

/* Registers a native module under `name` in package.preload. */
void wxd_vm_preload(lua_State *L, const char *name, lua_CFunction open);
/* Lua module wxd.core: sleep, clocks, log, worker id, kill. */
int wxd_open_core(lua_State *L);
/* Preloads every native module (wxd.core.*, cjson): core/modules.c. */
void wxd_vm_preload_modules(lua_State *L);

#endif
