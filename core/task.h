/* task: wxd.task.spawn — one coroutine waits natively for another.
 *
 *     local h = wxd.task.spawn(fn, ...)  -- runs fn(...) now, until it waits
 *     local a, b = h:wait(4500)          -- fn's results | nil, "timeout" |
 *                                        -- nil, err (it raised) | nil, "cancelled"
 *     h:cancel()  h:done()  h:status()
 *
 * Starting. spawn runs the task's coroutine (a pooled wxd_co_t of kind
 * WXD_CO_TASK) inside the call, until it first waits or ends: no timer
 * tick, and a task that never waits is done when spawn returns. Its entry
 * is a small Lua wrapper, `function(h, fn, ...) return h, xpcall(fn,
 * handler, ...) end`: the wrapper's first local keeps the handle alive
 * while the task runs (so dropping the handle never loses a task) and
 * comes back first with the results; xpcall catches an error inside the
 * coroutine, where the handler logs it with its traceback, and unwinds the
 * stack before task_done works on it. A start runs on the spawner's C
 * stack, so spawn raises past 200 starts inside one another.
 *
 * Ending. When the coroutine ends, each waiter gets the outcome pushed onto
 * its thread and is resumed from C, oldest first, before the call that
 * ended the task (a libuv callback, cancel()) returns. A waiter may end
 * another task in turn, which nests a delivery; past 100 nested deliveries
 * the waiters are queued on vm->task_ready and resumed by the delivery loop
 * below as soon as the coroutine it runs yields, so that a chain of 100,000
 * tasks does not nest 100,000 resumes on the C stack. The results also go
 * into the handle's environment table, for wait() calls after the end,
 * which return at once without yielding. A raising task is logged once
 * ("task error", with the traceback); wait() gives nil and the error as a
 * string.
 *
 * Memory. The handle is a userdata holding the task struct; Lua's GC is its
 * only owner. C points into it only while the task runs (the coroutine's
 * data, each waiter's task), and the wrapper frame anchors it for exactly
 * that long: no reference count, no registry slot per task. A waiter is
 * malloc'ed by wait() and freed when it is resumed, times out or is
 * cancelled; when wait() had a timeout, it embeds a uv_timer_t and is freed
 * in the timer's close callback.
 *
 * Cancelling. cancel() ends a task that waits on a native primitive at once
 * through the primitive's co->cancel (its sleep timer closed, its fetch
 * failed, its Redis reply left as a tombstone, its own wait for a task
 * left) without resuming it (wxd_co_kill). A task running right now (it
 * cancelled itself, or it is on the C stack below the caller) stops at its
 * next wait, or when it returns. Either way its waiters get nil,
 * "cancelled" at once.
 *
 * Generations. Tasks are coroutines of the VM that spawned them, counted in
 * vm->cos: a retired generation stays alive until its last task ends, on
 * its old code. At a shutdown deadline wxd_vm_cancel_waits closes every
 * task's and waiter's wait; a task still there when its VM is freed is
 * abandoned and frees the waiters it still had.
 */
#ifndef WXD_TASK_H
#define WXD_TASK_H

#include <lua.h>

/* Lua module wxd.core.task: spawn(fn, ...). */
int wxd_open_task(lua_State *L);

#endif
