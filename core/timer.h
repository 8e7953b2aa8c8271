/* timer: wxd.timer.after / wxd.timer.every, owned by a VM (a generation).
 *
 * Each firing runs its Lua function in a new wxd coroutine, so it may wait
 * (sleep, fetch, redis, locks, tasks) like a handler. A repeating timer whose
 * previous run has not finished skips that tick instead of piling up runs.
 *
 * Timers belong to the generation that created them. Timers created while
 * an app generation loads start only when it is committed (a generation
 * that fails to load, or loses the all-or-nothing vote, never runs one),
 * and all of a generation's timers stop when it is replaced, so N reloads
 * never leave N copies of a background job.
 */
#ifndef WXD_TIMER_H
#define WXD_TIMER_H

#include <lua.h>

#include "vm.h"

/* Lua module wxd.core.timer. */
int wxd_open_timer(lua_State *L);
/* Starts the timers the VM created before it was activated. */
void wxd_timers_activate(wxd_vm_t *vm);
/* Stops and releases every timer of the VM (retire, shutdown, free). Runs
 * already started finish; nothing fires again. */
void wxd_timers_close(wxd_vm_t *vm);

#endif
