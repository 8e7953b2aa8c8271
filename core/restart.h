/* restart: graceful restart in place (SIGUSR2, `wxd restart`, or the
 * watchdog when a worker is stuck for good).
 *
 * The old process starts a successor with the same command line and
 * environment plus WXD_TAKEOVER (its pid) and WXD_READY_FD (a pipe). The
 * successor binds the same ports (SO_REUSEPORT: it joins the old listeners'
 * groups; no probe refuses the port), loads the app, starts listening and
 * writes "ready" to the pipe. Only then does the old process let go:
 *   1. a stuck worker's listeners leave their groups (shutdown(SHUT_RD) on
 *      the descriptor; its queue was already handed on by the watchdog);
 *   2. its reuseport programs are detached, so the kernel spreads new
 *      connections over every socket left, the successor's included;
 *   3. its status endpoint closes (the successor binds it, retrying), and
 *      it stops writing the pid and status files (the successor's now);
 *   4. it stops as on SIGTERM: healthy workers accept what is queued for
 *      them, close their listeners and finish their requests; a stuck
 *      worker is abandoned and the process exits at the shutdown deadline.
 * A successor that exits or says nothing within 60 s is a failed restart:
 * logged, and the old process keeps serving.
 */
#ifndef WXD_RESTART_H
#define WXD_RESTART_H

#include "server.h"

typedef struct wxd_restart {
  uv_process_t proc;
  uv_pipe_t ready;
  uv_timer_t timeout;
  int handles;        /* open handles; freed at 0 */
  int done;           /* ready, failed or timed out */
  char buf[32];
  size_t len;
  wxd_server_t *srv;
  char why[96];
} wxd_restart_t;

/* Main thread: starts a successor unless one is starting. Returns 0 when
 * one starts (or is starting), -1 (logged) otherwise. */
int wxd_restart_start(wxd_server_t *s, const char *why);
/* Main thread: forgets a successor still starting (the server stops). */
void wxd_restart_close(wxd_server_t *s);

/* Successor side: WXD_TAKEOVER was set (the old process serves the ports
 * still). Read once at start and removed from the environment. */
int wxd_restart_is_takeover(void);
/* Successor side: tells the old process it serves now (no-op otherwise). */
void wxd_restart_signal_ready(void);

#endif
