/* watchdog: a worker whose loop stopped turning is noticed, contained and
 * replaced (docs/runaway.md has the reasoning).
 *
 * Detection: each worker's tick (every 100 ms, only when its loop turns)
 * stores the time in beat_ns, and every outermost coroutine resume that
 * returns counts in progress (vm.c; a plain store per resume). The main
 * thread looks every stall_timeout_ms / 4 (at most 250 ms); when neither has
 * moved for limits.stall_timeout_ms the loop is stuck in one callback: a
 * handler that does not yield (a loop, a blocking call), or native code. (A
 * long loop turn full of requests, a burst on a loaded machine, holds the
 * tick back but keeps resuming coroutines: not stuck.)
 *
 * Then, at once:
 *  - containment: new connections stop going to the worker (a reuseport
 *    program picks among the others: steer.c), and the connections already
 *    queued in its listeners' accept queues are accepted by the main thread
 *    and handed to the other workers; again on every look while it stays
 *    stuck (handshakes that completed since);
 *  - a signal to the stuck thread: its handler writes what runs there
 *    (request id, method, path) for the log and /status, and arms a count
 *    hook that stops the running coroutine at its next interpreted
 *    instruction (the request gets a 503). Code compiled by the JIT checks
 *    no hook; nothing can stop it safely from outside;
 *  - if the loop turns again within max(1 s, stall_timeout_ms) more, the
 *    worker is back (logged, steered to again); otherwise the process is replaced by a
 *    graceful restart (restart.c): a successor takes the ports, the healthy
 *    workers drain and the stuck thread ends with the old process.
 *
 * WXD_WATCHDOG=off turns it off (benchmarks compare; a debugger that stops
 * one thread would otherwise look stuck).
 */
#ifndef WXD_WATCHDOG_H
#define WXD_WATCHDOG_H

#include "buf.h"
#include "server.h"

typedef struct wxd_watchdog {
  uv_timer_t timer;
  int open;
  uint64_t stall_ns;    /* limits.stall_timeout_ms */
  uint64_t grace_ns;    /* after detection, before the restart */
  unsigned stalls;      /* workers found stuck, in total */
  unsigned recovered;   /* ... that turned again */
  unsigned interrupted; /* ... whose running coroutine a hook was armed for */
  unsigned moved;       /* queued connections handed to other workers */
  int restart_asked;
  unsigned next_target; /* round robin over the healthy workers */
  char last[700];       /* JSON object: the last stall, for /status */
} wxd_watchdog_t;

/* Process-wide, once, before the workers start: the poke signal's handler. */
void wxd_watchdog_install(void);
/* Worker thread, first thing: which worker this thread is (for the handler). */
void wxd_watchdog_worker_enter(wxd_worker_t *w);
/* Worker thread: the loop turned (from the tick). */
static inline void wxd_watchdog_beat(wxd_worker_t *w) {
  atomic_store_explicit(&w->beat_ns, uv_hrtime(), memory_order_relaxed);
}
/* Worker thread: hands fds queued for it by the watchdog to http.c
 * (adopt_async's callback). */
void wxd_watchdog_on_adopt(uv_async_t *a);
/* Worker thread: no more adoptions (before it closes adopt_async); closes
 * what was queued and not taken. */
void wxd_watchdog_worker_leave(wxd_worker_t *w);

/* Main thread: starts watching (nothing when WXD_WATCHDOG=off). */
void wxd_watchdog_start(wxd_server_t *s);
/* Main thread: stops watching (the timer closes); idempotent. */
void wxd_watchdog_stop(wxd_server_t *s);
/* Appends ,"watchdog":{...} for /status. */
void wxd_watchdog_status(wxd_server_t *s, wxd_buf_t *b);

#endif
