/* restart: see restart.h. */
#include "restart.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"
#include "reload.h"

#define READY_TIMEOUT_MS 60000

extern char **environ;

static int takeover = -1; /* -1: not read yet */
static int ready_fd = -1;

int wxd_restart_is_takeover(void) {
  if (takeover < 0) {
    const char *t = getenv("WXD_TAKEOVER");
    const char *r = getenv("WXD_READY_FD");
    takeover = t && *t;
    ready_fd = r && *r ? atoi(r) : -1;
    /* A successor's own successor gets fresh values. */
    unsetenv("WXD_TAKEOVER");
    unsetenv("WXD_READY_FD");
  }
  return takeover;
}

void wxd_restart_signal_ready(void) {
  wxd_restart_is_takeover();
  if (ready_fd < 0) return;
  ssize_t n;
  do n = write(ready_fd, "ready\n", 6);
  while (n < 0 && errno == EINTR);
  close(ready_fd);
  ready_fd = -1;
}

/* ---- old process ---- */

static void on_closed(uv_handle_t *h) {
  wxd_restart_t *r = h->data;
  if (--r->handles == 0) free(r);
}

static void finish(wxd_restart_t *r) {
  if (r->done) return;
  r->done = 1;
  wxd_server_t *s = r->srv;
  if (s && s->restart == r) s->restart = NULL;
  uv_close((uv_handle_t *)&r->timeout, on_closed);
  uv_close((uv_handle_t *)&r->ready, on_closed);
  /* The process handle closes too: the successor outlives us. */
  uv_close((uv_handle_t *)&r->proc, on_closed);
}

static void failed(wxd_restart_t *r, const char *what) {
  if (r->done) return;
  wxd_logf(WXD_LOG_ERROR, -1, "restart (%s) failed: %s; this process keeps serving", r->why, what);
  finish(r);
}

/* The successor serves: let go of the ports and stop. */
static void hand_over(wxd_restart_t *r) {
  wxd_server_t *s = r->srv;
  int pid = r->proc.pid;
  wxd_logf(WXD_LOG_INFO, -1, "restart (%s): successor pid %d serves; this process drains and exits", r->why, pid);
  finish(r);
  if (!s || s->stopping) return;
  for (int i = 0; i < s->n; i++) {
    wxd_worker_t *w = &s->workers[i];
    if (!w->stalled) continue;
    /* The stuck thread never closes its listeners: they leave the groups
     * here (the descriptors stay the worker's). */
    w->abandoned = 1;
    pthread_mutex_lock(&w->listen_mu);
    uv_os_fd_t fd;
    if (!w->listeners_closed && s->cfg->plain && uv_fileno((uv_handle_t *)&w->listener, &fd) == 0)
      shutdown(fd, SHUT_RD);
    if (!w->listeners_closed && s->cfg->https.enabled && uv_fileno((uv_handle_t *)&w->https_listener, &fd) == 0)
      shutdown(fd, SHUT_RD);
    pthread_mutex_unlock(&w->listen_mu);
  }
  wxd_steer_release(&s->steer);
  wxd_reload_close_admin(s);
  s->handed_over = pid;
  wxd_server_stop(s, "restart: handed over to the successor");
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
  (void)hint;
  wxd_restart_t *r = h->data;
  *buf = uv_buf_init(r->buf + r->len, (unsigned)(sizeof r->buf - r->len - 1));
}

static void on_ready_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf) {
  (void)buf;
  wxd_restart_t *r = st->data;
  if (r->done) return;
  if (nread < 0) {
    failed(r, "the successor closed its pipe before it was ready (see its log lines above)");
    return;
  }
  r->len += (size_t)nread;
  r->buf[r->len] = 0;
  if (strstr(r->buf, "ready\n")) hand_over(r);
  else if (r->len >= sizeof r->buf - 1) failed(r, "the successor said something else than ready");
}

static void on_exit_cb(uv_process_t *p, int64_t status, int sig) {
  wxd_restart_t *r = p->data;
  char what[128];
  snprintf(what, sizeof what, "the successor exited (status %lld, signal %d) before it was ready", (long long)status,
           sig);
  failed(r, what);
}

static void on_timeout(uv_timer_t *t) {
  wxd_restart_t *r = t->data;
  uv_process_kill(&r->proc, SIGKILL);
  failed(r, "the successor was not ready within 60 s (killed)");
}

int wxd_restart_start(wxd_server_t *s, const char *why) {
  if (s->stopping) return -1;
  if (s->restart) {
    wxd_logf(WXD_LOG_INFO, -1, "restart (%s): a successor is starting already", why);
    return 0;
  }
  if (!s->argv || !s->argv[0]) {
    wxd_logf(WXD_LOG_ERROR, -1, "restart (%s): no command line to start a successor with", why);
    return -1;
  }
  wxd_restart_t *r = calloc(1, sizeof *r);
  if (!r) return -1;
  r->srv = s;
  snprintf(r->why, sizeof r->why, "%s", why);
  size_t nenv = 0;
  while (environ[nenv]) nenv++;
  char **env = calloc(nenv + 3, sizeof *env);
  char tk[64], rf[32];
  snprintf(tk, sizeof tk, "WXD_TAKEOVER=%d", (int)getpid());
  snprintf(rf, sizeof rf, "WXD_READY_FD=3");
  if (!env) {
    free(r);
    return -1;
  }
  size_t k = 0;
  for (size_t i = 0; i < nenv; i++)
    if (strncmp(environ[i], "WXD_TAKEOVER=", 13) != 0 && strncmp(environ[i], "WXD_READY_FD=", 13) != 0)
      env[k++] = environ[i];
  env[k++] = tk;
  env[k++] = rf;
  env[k] = NULL;

  uv_pipe_init(s->loop, &r->ready, 0);
  r->ready.data = r;
  uv_timer_init(s->loop, &r->timeout);
  r->timeout.data = r;
  r->handles = 3; /* the process handle is closed too, even when spawning fails */
  uv_stdio_container_t stdio[4];
  for (int i = 0; i < 3; i++) {
    stdio[i].flags = UV_INHERIT_FD;
    stdio[i].data.fd = i;
  }
  stdio[3].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
  stdio[3].data.stream = (uv_stream_t *)&r->ready;
  uv_process_options_t opts;
  memset(&opts, 0, sizeof opts);
  opts.file = s->argv[0];
  opts.args = s->argv;
  opts.env = env;
  opts.exit_cb = on_exit_cb;
  opts.stdio = stdio;
  opts.stdio_count = 4;
  r->proc.data = r;
  int rc = uv_spawn(s->loop, &r->proc, &opts);
  free(env);
  if (rc != 0) {
    wxd_logf(WXD_LOG_ERROR, -1, "restart (%s): cannot start %s: %s", why, s->argv[0], uv_strerror(rc));
    r->done = 1;
    uv_close((uv_handle_t *)&r->timeout, on_closed);
    uv_close((uv_handle_t *)&r->ready, on_closed);
    uv_close((uv_handle_t *)&r->proc, on_closed);
    return -1;
  }
  s->restart = r;
  wxd_logf(WXD_LOG_WARN, -1, "restart (%s): starting a successor, pid %d", why, r->proc.pid);
  uv_read_start((uv_stream_t *)&r->ready, on_alloc, on_ready_read);
  uv_timer_start(&r->timeout, on_timeout, READY_TIMEOUT_MS, 0);
  return 0;
}

void wxd_restart_close(wxd_server_t *s) {
  wxd_restart_t *r = s->restart;
  if (!r) return;
  failed(r, "the server is stopping");
}
