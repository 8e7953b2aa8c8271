/* watchdog: see watchdog.h. */
#include "watchdog.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "http.h"
#include "reload.h"
#include "restart.h"

#define POKE_SIGNAL (SIGRTMIN + 4)
#define GRACE_MS 1000 /* at least, after detection: a hook may still stop an interpreted loop */

static __thread wxd_worker_t *this_worker;

/* On the stuck worker's thread, interrupting whatever it runs: only
 * async-signal-safe work (plain stores, no stdio, no allocation). */
static void on_poke(int sig) {
  (void)sig;
  int saved = errno;
  wxd_worker_t *w = this_worker;
  if (w) {
    wxd_co_t *co = wxd_co_running();
    if (co) {
      wxd_http_describe_co(co, w->stall_desc, sizeof w->stall_desc);
      w->stall_interrupted = wxd_co_interrupt();
    } else {
      static const char native[] = "\"kind\":\"native\"";
      memcpy(w->stall_desc, native, sizeof native);
      w->stall_interrupted = 0;
    }
    atomic_store_explicit(&w->described, atomic_load(&w->pokes), memory_order_release);
  }
  errno = saved;
}

void wxd_watchdog_install(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_poke;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  sigaction(POKE_SIGNAL, &sa, NULL);
}

void wxd_watchdog_worker_enter(wxd_worker_t *w) {
  this_worker = w;
  wxd_co_count_progress(&w->progress);
}

/* ---- connections handed between workers ---- */

static int adopt_push(wxd_worker_t *w, int fd, int tls) {
  pthread_mutex_lock(&w->adopt_mu);
  int ok = w->adopt_cap >= 0; /* -1: the worker left */
  if (ok && w->nadopt == w->adopt_cap) {
    int cap = w->adopt_cap ? w->adopt_cap * 2 : 64;
    int *p = realloc(w->adopt, (size_t)cap * sizeof *p);
    if (p) {
      w->adopt = p;
      w->adopt_cap = cap;
    } else {
      ok = 0;
    }
  }
  if (ok) {
    w->adopt[w->nadopt++] = fd * 2 + (tls ? 1 : 0);
    uv_async_send(&w->adopt_async);
  }
  pthread_mutex_unlock(&w->adopt_mu);
  return ok ? 0 : -1;
}

void wxd_watchdog_on_adopt(uv_async_t *a) {
  wxd_worker_t *w = a->data;
  pthread_mutex_lock(&w->adopt_mu);
  int *fds = w->adopt;
  int n = w->nadopt;
  w->adopt = NULL;
  w->nadopt = 0;
  w->adopt_cap = 0;
  pthread_mutex_unlock(&w->adopt_mu);
  for (int i = 0; i < n; i++) wxd_http_adopt(w, fds[i] / 2, fds[i] & 1);
  free(fds);
}

void wxd_watchdog_worker_leave(wxd_worker_t *w) {
  pthread_mutex_lock(&w->adopt_mu);
  for (int i = 0; i < w->nadopt; i++) close(w->adopt[i] / 2);
  free(w->adopt);
  w->adopt = NULL;
  w->nadopt = 0;
  w->adopt_cap = -1;
  pthread_mutex_unlock(&w->adopt_mu);
}

/* A healthy worker to hand a connection to, round robin; NULL: none. */
static wxd_worker_t *next_target(wxd_server_t *s) {
  wxd_watchdog_t *wd = s->watchdog;
  for (int k = 0; k < s->n; k++) {
    wxd_worker_t *w = &s->workers[wd->next_target++ % (unsigned)s->n];
    if (!w->stalled && !w->abandoned) return w;
  }
  return NULL;
}

/* Accepts what waits in the stuck worker's queues and hands it on. The
 * listener's descriptor is the worker's: listen_mu keeps it from being
 * closed meanwhile (the worker closes its listeners under it). */
static unsigned move_backlog(wxd_server_t *s, wxd_worker_t *w) {
  unsigned moved = 0;
  if (s->stopping) return 0;
  pthread_mutex_lock(&w->listen_mu);
  for (int tls = 0; tls < 2 && !w->listeners_closed; tls++) {
    uv_tcp_t *l = tls ? &w->https_listener : &w->listener;
    if (tls ? !s->cfg->https.enabled : !s->cfg->plain) continue;
    uv_os_fd_t fd;
    if (uv_fileno((uv_handle_t *)l, &fd) != 0) continue;
    for (;;) {
      wxd_worker_t *to = next_target(s);
      if (!to) break;
      int c = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (c < 0) {
        if (errno == EINTR || errno == ECONNABORTED) continue;
        break; /* EAGAIN: empty */
      }
      if (adopt_push(to, c, tls) != 0) close(c);
      else moved++;
    }
  }
  pthread_mutex_unlock(&w->listen_mu);
  return moved;
}

/* ---- detection ---- */

static double ms_since(uint64_t now, uint64_t then) { return now > then ? (double)(now - then) / 1e6 : 0; }

static void log_stall(wxd_server_t *s, wxd_worker_t *w, uint64_t now, unsigned moved, int excluded) {
  wxd_watchdog_t *wd = s->watchdog;
  int described = atomic_load_explicit(&w->described, memory_order_acquire) == atomic_load(&w->pokes);
  char extra[1200];
  snprintf(extra, sizeof extra,
           "\"stalled_ms\":%.0f,%s,\"hook_armed\":%s,\"steered_away\":%s,\"moved_connections\":%u,\"stalls\":%u",
           ms_since(now, w->stall_began_ns), described ? w->stall_desc : "\"kind\":\"unknown\"",
           described && w->stall_interrupted ? "true" : "false", excluded ? "true" : "false", moved, wd->stalls);
  wxd_log(WXD_LOG_ERROR, w->id, "worker stuck", extra);
  snprintf(wd->last, sizeof wd->last, "{\"worker\":%d,%s,\"stalled_ms\":%.0f}", w->id,
           described ? w->stall_desc : "\"kind\":\"unknown\"", ms_since(now, w->stall_began_ns));
  if (described && w->stall_interrupted) wd->interrupted++;
}

static void poke(wxd_worker_t *w) {
  atomic_fetch_add(&w->pokes, 1);
  pthread_kill(w->thread, POKE_SIGNAL);
}

static void stall(wxd_server_t *s, wxd_worker_t *w, uint64_t beat, uint64_t now) {
  wxd_watchdog_t *wd = s->watchdog;
  w->stalled = 1;
  w->stall_began_ns = beat;
  w->stalls++;
  wd->stalls++;
  int excluded = 0;
  if (s->n >= 2 && !s->stopping) {
    int rc = wxd_steer_exclude(&s->steer, w->id, 1);
    excluded = rc == 0 && s->steer.fds[0] + s->steer.fds[1] > -2;
    if (rc != 0 && rc != -EINVAL)
      wxd_logf(WXD_LOG_WARN, w->id, "watchdog: cannot steer new connections away: %s", strerror(-rc));
  }
  unsigned moved = move_backlog(s, w);
  wd->moved += moved;
  wxd_reload_worker_stalled(s, w);
  poke(w);
  /* The handler runs on the worker's thread as soon as that thread gets
   * the CPU (it is running, not blocked): a moment for its description,
   * up to half a second on a loaded machine. Only a stall waits here. */
  for (int i = 0; i < 500 && atomic_load_explicit(&w->described, memory_order_acquire) != atomic_load(&w->pokes);
       i++) {
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, NULL);
  }
  log_stall(s, w, now, moved, excluded);
}

static void recovered(wxd_server_t *s, wxd_worker_t *w, uint64_t now) {
  wxd_watchdog_t *wd = s->watchdog;
  w->stalled = 0;
  wd->recovered++;
  wxd_logf(WXD_LOG_WARN, w->id, "worker recovered after %.0f ms%s", ms_since(now, w->stall_began_ns),
           w->abandoned ? "; it no longer serves (the server went on without it)" : "");
  if (w->abandoned) {
    if (!s->stopping) uv_async_send(&w->stop_async);
    return;
  }
  if (s->n >= 2 && !s->stopping) wxd_steer_exclude(&s->steer, w->id, 0);
}

/* CPU time the worker's thread has used, in ns; 0 when unknown. */
static uint64_t thread_cpu_ns(wxd_worker_t *w) {
  clockid_t cid;
  struct timespec ts;
  if (pthread_getcpuclockid(w->thread, &cid) != 0 || clock_gettime(cid, &ts) != 0) return 0;
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec + 1;
}

/* Stuck: no turn for the stall time while the thread kept the CPU busy (a
 * loop), or no turn for three stall times whatever it did (blocked in a
 * call). A worker that did not get the CPU at all (an overloaded machine,
 * a paused VM) is late, not stuck: replacing it would not help. */
static int looks_stuck(const wxd_watchdog_t *wd, const wxd_worker_t *w, uint64_t beat, uint64_t now, uint64_t cpu) {
  if (beat == 0 || now <= beat || now - beat < wd->stall_ns) return 0;
  if (now - beat >= 3 * wd->stall_ns || cpu == 0 || w->cpu_at_alive == 0) return 1;
  return cpu > w->cpu_at_alive && (cpu - w->cpu_at_alive) * 2 >= wd->stall_ns;
}

static void on_watch(uv_timer_t *t) {
  wxd_server_t *s = t->data;
  wxd_watchdog_t *wd = s->watchdog;
  uint64_t now = uv_hrtime();
  int stuck = 0;
  for (int i = 0; i < s->n; i++) {
    wxd_worker_t *w = &s->workers[i];
    uint64_t beat = atomic_load_explicit(&w->beat_ns, memory_order_relaxed);
    /* A loop turn with many requests in it (a burst on a loaded machine)
     * holds the tick back too, but its coroutines come back one after
     * another: that is not a stuck worker. */
    uint64_t progress = atomic_load_explicit(&w->progress, memory_order_relaxed);
    int moved_on = progress != w->seen_progress;
    w->seen_progress = progress;
    if (moved_on) w->alive_ns = now;
    uint64_t cpu = thread_cpu_ns(w);
    if (moved_on || beat != w->seen_beat) {
      w->seen_beat = beat;
      w->cpu_at_alive = cpu;
    }
    if (beat != 0 && w->alive_ns > beat) beat = w->alive_ns;
    if (w->stalled) {
      if (beat != w->stall_began_ns) {
        recovered(s, w, now);
        continue;
      }
      stuck++;
      wd->moved += move_backlog(s, w);
      continue;
    }
    if (looks_stuck(wd, w, beat, now, cpu)) {
      stall(s, w, beat, now);
      stuck++;
    }
  }
  /* Stopping: the server may be waiting only for stuck workers now. */
  if (stuck && s->stopping) uv_async_send(&s->worker_exited);
  /* Still stuck a grace period after detection: a compiled loop or native
   * code that no hook reaches. Only a new process gets the worker back. */
  if (!stuck || wd->restart_asked || s->stopping) return;
  for (int i = 0; i < s->n; i++) {
    wxd_worker_t *w = &s->workers[i];
    if (!w->stalled || ms_since(now, w->stall_began_ns) < (double)(wd->stall_ns + wd->grace_ns) / 1e6) continue;
    char why[96];
    snprintf(why, sizeof why, "worker %d is stuck", w->id);
    wd->restart_asked = 1;
    wxd_restart_start(s, why);
    break;
  }
}

void wxd_watchdog_start(wxd_server_t *s) {
  const char *env = getenv("WXD_WATCHDOG");
  if (env && strcmp(env, "off") == 0) {
    wxd_log(WXD_LOG_WARN, -1, "watchdog off (WXD_WATCHDOG=off): a stuck worker is not noticed", NULL);
    return;
  }
  wxd_watchdog_t *wd = calloc(1, sizeof *wd);
  if (!wd) return;
  s->watchdog = wd;
  wd->stall_ns = s->cfg->limits.stall_timeout_ms * 1000000ull;
  /* At least the stall time again: a native call that takes a few seconds
   * on a loaded machine gets the chance to return before a restart. */
  wd->grace_ns = (s->cfg->limits.stall_timeout_ms > GRACE_MS ? s->cfg->limits.stall_timeout_ms : GRACE_MS) * 1000000ull;
  uint64_t every = s->cfg->limits.stall_timeout_ms / 4;
  if (every > 250) every = 250;
  if (every < 20) every = 20;
  uv_timer_init(s->loop, &wd->timer);
  wd->timer.data = s;
  wd->open = 1;
  uv_timer_start(&wd->timer, on_watch, every, every);
}

static void on_timer_closed(uv_handle_t *h) { free(h->data); }

void wxd_watchdog_stop(wxd_server_t *s) {
  wxd_watchdog_t *wd = s->watchdog;
  if (!wd || !wd->open) return;
  wd->open = 0;
  /* Freed with the timer; s->watchdog stays readable until then. */
  wd->timer.data = wd;
  uv_close((uv_handle_t *)&wd->timer, on_timer_closed);
  s->watchdog = NULL;
}

void wxd_watchdog_status(wxd_server_t *s, wxd_buf_t *b) {
  wxd_watchdog_t *wd = s->watchdog;
  char tmp[1200];
  if (!wd) {
    wxd_buf_append(b, ",\"watchdog\":null", 16);
    return;
  }
  int n = snprintf(tmp, sizeof tmp,
                   ",\"watchdog\":{\"stall_timeout_ms\":%llu,\"stalls\":%u,\"recovered\":%u,\"interrupted\":%u,"
                   "\"moved_connections\":%u,\"restart_asked\":%s,\"stuck_now\":[",
                   (unsigned long long)(wd->stall_ns / 1000000), wd->stalls, wd->recovered, wd->interrupted,
                   wd->moved, wd->restart_asked ? "true" : "false");
  wxd_buf_append(b, tmp, (size_t)n);
  for (int i = 0, k = 0; i < s->n; i++) {
    if (!s->workers[i].stalled) continue;
    n = snprintf(tmp, sizeof tmp, "%s%d", k++ ? "," : "", i);
    wxd_buf_append(b, tmp, (size_t)n);
  }
  n = snprintf(tmp, sizeof tmp, "],\"last\":%s}", wd->last[0] ? wd->last : "null");
  wxd_buf_append(b, tmp, (size_t)n);
}
