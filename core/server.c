/* server: see server.h. */
#include "server.h"

#include <errno.h>
#include <lauxlib.h>
#include <netdb.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fetch.h"
#include "http.h"
#include "metrics.h"
#include "redis.h"
#include "reload.h"
#include "restart.h"
#include "shdict.h"
#include "timer.h"
#include "tls.h"
#include "ws.h"
#include "watchdog.h"

/* Start-up barrier: every worker loads the app, then all start listening
 * together, or none does. */
typedef struct startup {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int loaded;  /* workers that finished loading (ok or not) */
  int verdict; /* 0 undecided, 1 go, -1 abort */
} startup_t;

static startup_t startup = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};

/* Workers tell the main thread when their loop has ended. */
static pthread_mutex_t exited_mu = PTHREAD_MUTEX_INITIALIZER;
static int exited_count;

/* ---- generations ---- */

/* A retired generation finished its last request. */
static void on_vm_idle(wxd_vm_t *vm) {
  wxd_worker_t *w = vm->owner;
  wxd_vm_t **p = &w->retired;
  while (*p && *p != vm) p = &(*p)->next_retired;
  if (*p) *p = vm->next_retired;
  wxd_vm_free(vm);
  atomic_fetch_sub(&w->stats.retired, 1);
}

wxd_vm_t *wxd_worker_load(wxd_worker_t *w, unsigned gen, char *err, size_t errlen) {
  wxd_vm_options_t opts = {w->cfg->lua_dir[0] ? w->cfg->lua_dir : NULL, w->cfg->app_dir, w->id,
                           w->cfg->limits.lua_memory_bytes};
  wxd_vm_t *vm = wxd_vm_new(&w->loop, &opts);
  if (!vm) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  vm->owner = w;
  vm->shdicts = w->srv->shdicts; /* before app.lua runs: it may use them */
  vm->fetch = w->fetch;
  vm->redis = w->redis;
  vm->ws_topics = w->srv->ws_topics;
  vm->bell = w->bell_ok ? &w->bell : NULL;
  vm->generation = gen;
  vm->on_idle = on_vm_idle;
  lua_State *L = vm->L;
  lua_getglobal(L, "require");
  lua_pushliteral(L, "wxd.server");
  if (lua_pcall(L, 1, 1, 0) != 0) goto fail;
  lua_getfield(L, -1, "load_app");
  lua_pushstring(L, w->cfg->app_dir);
  lua_pushinteger(L, w->id);
  lua_pushinteger(L, (lua_Integer)gen);
  if (lua_pcall(L, 3, 2, 0) != 0) goto fail;
  if (lua_isnil(L, -2)) goto fail;
  lua_pop(L, 1);
  vm->entry_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_settop(L, 0);
  return vm;
fail:
  snprintf(err, errlen, "%s", lua_tostring(L, -1) ? lua_tostring(L, -1) : "unknown error");
  wxd_vm_free(vm);
  return NULL;
}

SSL_CTX *wxd_https_ctx(wxd_https_conf_t *h, char *err, size_t errlen) {
  wxd_tls_server_conf_t tc = {
      .cert_file = h->cert,
      .key_file = h->key,
      .passphrase = h->has_passphrase ? h->passphrase : NULL,
      .client_ca = h->client_ca[0] ? h->client_ca : NULL,
      .client_verify = h->client_verify,
      .min_version = h->min_version == 13 ? TLS1_3_VERSION : TLS1_2_VERSION,
  };
  char e[900];
  SSL_CTX *ctx = wxd_tls_server_ctx(&tc, e, sizeof e);
  OPENSSL_cleanse(h->passphrase, sizeof h->passphrase);
  if (!ctx) {
    snprintf(err, errlen, "https: %s", e);
    return NULL;
  }
  /* Served anyway (clients decide), but an operator should hear of it. */
  X509 *leaf = SSL_CTX_get0_certificate(ctx);
  int days = 0, secs = 0;
  if (leaf && ASN1_TIME_diff(&days, &secs, NULL, X509_get0_notAfter(leaf)) && (days < 0 || secs < 0))
    wxd_logf(WXD_LOG_WARN, -1, "https: the certificate in %s has expired", h->cert);
  else if (leaf && days < 14)
    wxd_logf(WXD_LOG_WARN, -1, "https: the certificate in %s expires in %d day%s", h->cert, days, days == 1 ? "" : "s");
  return ctx;
}

/* The main thread's reload command (reload.c decides; this applies). */
static void on_ctl(uv_async_t *a) {
  wxd_worker_t *w = a->data;
  wxd_reload_state_t *rs = &w->srv->reload;
  pthread_mutex_lock(&rs->mu);
  int cmd = w->ctl_cmd;
  unsigned gen = rs->generation + 1;
  w->ctl_cmd = WXD_CTL_NONE;
  pthread_mutex_unlock(&rs->mu);
  if (cmd == WXD_CTL_NONE) return;
  char err[2048] = "";
  if (cmd == WXD_CTL_PREPARE) {
    if (w->next_vm) wxd_vm_free(w->next_vm);
    w->next_vm = w->draining ? NULL : wxd_worker_load(w, gen, err, sizeof err);
    if (w->draining) snprintf(err, sizeof err, "the server is stopping");
  } else if (cmd == WXD_CTL_COMMIT && w->next_vm && w->draining) {
    /* Stopping: the prepared generation will serve nothing. */
    wxd_vm_free(w->next_vm);
    w->next_vm = NULL;
  } else if (cmd == WXD_CTL_COMMIT && w->next_vm) {
    /* Between two requests: the ones running keep their generation. */
    wxd_vm_t *old = w->vm;
    w->vm = w->next_vm;
    w->next_vm = NULL;
    atomic_store(&w->stats.generation, w->vm->generation);
    wxd_timers_activate(w->vm);
    /* New HTTPS connections get the context read by this reload; open ones
     * keep theirs (each SSL holds a reference). */
    pthread_mutex_lock(&rs->mu);
    SSL_CTX *tls = w->srv->tls_next;
    if (tls) SSL_CTX_up_ref(tls);
    pthread_mutex_unlock(&rs->mu);
    if (tls) {
      SSL_CTX_free(w->tls_ctx);
      w->tls_ctx = tls;
    }
    old->next_retired = w->retired;
    w->retired = old;
    atomic_fetch_add(&w->stats.retired, 1);
    wxd_vm_retire(old); /* freed now, or when its last request ends */
  } else if (cmd == WXD_CTL_ABORT && w->next_vm) {
    wxd_vm_free(w->next_vm);
    w->next_vm = NULL;
  }
  wxd_reload_worker_reply(w, cmd == WXD_CTL_PREPARE && err[0] ? err : NULL);
}

/* ---- workers ---- */

static void on_handle_closed(uv_handle_t *h) { (void)h; }

static void close_listeners(wxd_worker_t *w) {
  /* The watchdog may be accepting from them (watchdog.c): not meanwhile. */
  pthread_mutex_lock(&w->listen_mu);
  w->listeners_closed = 1;
  if (!uv_is_closing((uv_handle_t *)&w->listener)) uv_close((uv_handle_t *)&w->listener, on_handle_closed);
  if (w->cfg->https.enabled && !uv_is_closing((uv_handle_t *)&w->https_listener))
    uv_close((uv_handle_t *)&w->https_listener, on_handle_closed);
  pthread_mutex_unlock(&w->listen_mu);
}

/* Before the listeners close: what the kernel queued for us is served
 * rather than reset (a successor process has the port by now). */
static void accept_queued(wxd_worker_t *w) {
  for (int tls = 0; tls < 2; tls++) {
    uv_tcp_t *l = tls ? &w->https_listener : &w->listener;
    if (tls ? !w->cfg->https.enabled : !w->cfg->plain) continue;
    uv_os_fd_t fd;
    if (uv_is_closing((uv_handle_t *)l) || uv_fileno((uv_handle_t *)l, &fd) != 0) continue;
    for (int i = 0; i < 4096; i++) {
      int c = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (c < 0 && (errno == EINTR || errno == ECONNABORTED)) continue;
      if (c < 0) break;
      wxd_http_adopt(w, c, tls);
    }
  }
}

static void close_worker_handles(wxd_worker_t *w) {
  if (w->stopping) return;
  w->stopping = 1;
  atomic_store(&w->beat_ns, 0); /* no loop turns to watch from here */
  uv_close((uv_handle_t *)&w->tick, on_handle_closed);
  wxd_watchdog_worker_leave(w);
  uv_close((uv_handle_t *)&w->adopt_async, on_handle_closed);
  /* The deadline stays armed but no longer keeps the loop alive: if timer
   * runs or handlers still wait, it ends them on time. */
  uv_unref((uv_handle_t *)&w->deadline);
  uv_close((uv_handle_t *)&w->stop_async, on_handle_closed);
  uv_close((uv_handle_t *)&w->ctl_async, on_handle_closed);
  wxd_ws_worker_close(w->srv->ws_topics, w->id);
  close_listeners(w);
}

static void on_deadline(uv_timer_t *t) {
  wxd_worker_t *w = t->data;
  if (w->nconns > 0)
    wxd_logf(WXD_LOG_WARN, w->id, "shutdown deadline reached; closing %u connection(s)", w->nconns);
  wxd_http_close_all(w);
  /* Handlers still waiting (a long sleep, later a slow upstream) would keep
   * the loop alive: their waits are closed and they never resume. */
  wxd_vm_cancel_waits(w->vm);
  for (wxd_vm_t *vm = w->retired; vm; vm = vm->next_retired) wxd_vm_cancel_waits(vm);
  close_worker_handles(w);
}

/* The main thread's request to stop; also re-sent by the last closing
 * connection so that we notice when draining is complete. */
static void on_stop(uv_async_t *a) {
  wxd_worker_t *w = a->data;
  if (!w->draining) {
    accept_queued(w);
    w->draining = 1;
    /* No new background work while draining: timers stop, and timers
     * created from now on (by a handler still running) never start. */
    w->vm->active = 0;
    wxd_timers_close(w->vm);
    for (wxd_vm_t *vm = w->retired; vm; vm = vm->next_retired) {
      vm->active = 0;
      wxd_timers_close(vm);
    }
    close_listeners(w);
    wxd_http_drain(w);
    uv_timer_start(&w->deadline, on_deadline, w->cfg->limits.shutdown_timeout_ms, 0);
  }
  if (w->nconns == 0) close_worker_handles(w);
}

static void on_tick(uv_timer_t *t) {
  wxd_worker_t *w = t->data;
  wxd_watchdog_beat(w);
  if (++w->ticks % 10 == 0)
    atomic_store(&w->stats.busy_permille, wxd_steer_busy_permille(&w->loop, &w->meter));
  wxd_http_sweep(w);
  wxd_fetch_pool_sweep(w->fetch);
  wxd_logbuf_flush(&w->access);
}

static void walk_close(uv_handle_t *h, void *arg) {
  (void)arg;
  if (!uv_is_closing(h)) uv_close(h, NULL);
}

static void worker_main(void *arg) {
  wxd_worker_t *w = arg;
  wxd_watchdog_worker_enter(w);
  w->fetch = wxd_fetch_pool_new(&w->loop); /* NULL: each VM makes its own */
  w->redis = wxd_redis_pool_new(&w->loop, w->id); /* NULL: each VM makes its own */
  w->vm = wxd_worker_load(w, 1, w->load_error, sizeof w->load_error);
  w->load_status = w->vm ? 0 : -1;
  if (w->vm) atomic_store(&w->stats.generation, 1);

  pthread_mutex_lock(&startup.mu);
  startup.loaded++;
  pthread_cond_broadcast(&startup.cv);
  while (startup.verdict == 0) pthread_cond_wait(&startup.cv, &startup.mu);
  int go = startup.verdict > 0;
  pthread_mutex_unlock(&startup.mu);

  if (go) {
    wxd_watchdog_beat(w);
    wxd_timers_activate(w->vm);
    int rc = w->cfg->plain ? uv_listen((uv_stream_t *)&w->listener, 511, wxd_http_on_connection) : 0;
    if (rc != 0) wxd_logf(WXD_LOG_ERROR, w->id, "listen: %s", uv_strerror(rc));
    rc = w->cfg->https.enabled ? uv_listen((uv_stream_t *)&w->https_listener, 511, wxd_http_on_tls_connection) : 0;
    if (rc != 0) wxd_logf(WXD_LOG_ERROR, w->id, "https listen: %s", uv_strerror(rc));
    uv_run(&w->loop, UV_RUN_DEFAULT);
  } else {
    close_worker_handles(w);
  }
  /* Whatever is left (sleep timers of coroutines cut short by the deadline,
   * app timers) is closed before the VMs go. */
  if (w->vm) wxd_timers_close(w->vm);
  if (w->next_vm) wxd_timers_close(w->next_vm);
  for (wxd_vm_t *vm = w->retired; vm; vm = vm->next_retired) wxd_timers_close(vm);
  /* Redis connections close with callbacks that free them (before the walk
   * below would close their handles without). Subscriptions are released
   * while their VMs still exist. */
  wxd_redis_pool_close(w->redis);
  w->redis = NULL;
  if (w->vm) w->vm->redis = NULL;
  if (w->next_vm) w->next_vm->redis = NULL;
  for (wxd_vm_t *vm = w->retired; vm; vm = vm->next_retired) vm->redis = NULL;
  wxd_ws_worker_close(w->srv->ws_topics, w->id);
  if (w->bell_ok) wxd_bell_close(&w->bell);
  uv_walk(&w->loop, walk_close, NULL);
  uv_run(&w->loop, UV_RUN_DEFAULT);
  wxd_logbuf_free(&w->access);
  while (w->retired) {
    wxd_vm_t *next = w->retired->next_retired;
    wxd_vm_free(w->retired);
    w->retired = next;
  }
  if (w->next_vm) wxd_vm_free(w->next_vm);
  w->next_vm = NULL;
  wxd_vm_free(w->vm);
  w->vm = NULL;
  /* The loop has run out: no outbound request is in flight, and every
   * connection (so every SSL) is gone. */
  wxd_fetch_pool_free(w->fetch);
  w->fetch = NULL;
  SSL_CTX_free(w->tls_ctx);
  w->tls_ctx = NULL;
  pthread_mutex_lock(&exited_mu);
  exited_count++;
  w->exited = 1;
  pthread_mutex_unlock(&exited_mu);
  if (go) uv_async_send(&w->srv->worker_exited);
}

static int make_listener(wxd_worker_t *w, uv_tcp_t *l, const struct sockaddr *addr, const char *host, int port,
                         char *err, size_t errlen) {
  int rc;
  l->data = w;
  uv_os_fd_t fd;
  uv_fileno((uv_handle_t *)l, &fd);
  int one = 1;
  if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0) {
    rc = uv_translate_sys_error(errno);
    goto fail;
  }
  rc = uv_tcp_bind(l, addr, 0);
  if (rc != 0) goto fail;
  return 0;
fail:
  snprintf(err, errlen, "cannot listen on %s:%d: %s", host, port, uv_strerror(rc));
  return -1;
}

static int bound_port(uv_tcp_t *l, struct sockaddr_storage *ss) {
  int sl = sizeof *ss;
  uv_tcp_getsockname(l, (struct sockaddr *)ss, &sl);
  return ntohs(ss->ss_family == AF_INET ? ((struct sockaddr_in *)ss)->sin_port
                                        : ((struct sockaddr_in6 *)ss)->sin6_port);
}

/* Without SO_REUSEPORT, so that another process already serving the port is
 * an error instead of a silent co-tenant. */
static int probe_port(const struct sockaddr *addr, socklen_t alen, char *err, size_t errlen,
                      const char *host, int port) {
  int fd = socket(addr->sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return 0;
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  int rc = bind(fd, addr, alen);
  int e = errno;
  close(fd);
  if (rc != 0) {
    snprintf(err, errlen, "cannot listen on %s:%d: %s", host, port, strerror(e));
    return -1;
  }
  return 0;
}

/* HOST may be an address or a name (e.g. localhost); a name is resolved once,
 * at start-up, to its first address. */
int wxd_resolve(const char *host, int port, struct sockaddr_storage *ss, socklen_t *alen) {
  struct addrinfo hints, *res = NULL;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  char ps[16];
  snprintf(ps, sizeof ps, "%d", port);
  int rc = getaddrinfo(host, ps, &hints, &res);
  if (rc != 0 || !res) {
    wxd_logf(WXD_LOG_ERROR, -1, "listen: cannot resolve \"%s\": %s", host, gai_strerror(rc));
    if (res) freeaddrinfo(res);
    return -1;
  }
  memcpy(ss, res->ai_addr, res->ai_addrlen);
  *alen = res->ai_addrlen;
  freeaddrinfo(res);
  return 0;
}

/* ---- main thread ---- */

/* The steering monitor's view of a worker (steer.h). */
static unsigned worker_busy(void *arg, int worker) {
  wxd_server_t *s = arg;
  return atomic_load(&s->workers[worker].stats.busy_permille);
}

static void close_main_handles(wxd_server_t *s) {
  if (uv_is_closing((uv_handle_t *)&s->worker_exited)) return;
  uv_close((uv_handle_t *)&s->sigint, NULL);
  uv_close((uv_handle_t *)&s->sigterm, NULL);
  uv_close((uv_handle_t *)&s->sighup, NULL);
  uv_close((uv_handle_t *)&s->sigusr2, NULL);
  uv_close((uv_handle_t *)&s->worker_exited, NULL);
  uv_close((uv_handle_t *)&s->abandon_timer, NULL);
  wxd_steer_stop(&s->steer);
  wxd_watchdog_stop(s);
  wxd_restart_close(s);
  wxd_reload_close(s);
}

/* The pid file names us (a successor of a restart has overwritten it). */
static int pid_file_is_ours(const wxd_config_t *cfg) {
  FILE *f = fopen(cfg->pid_file, "r");
  if (!f) return 0;
  int pid = 0;
  int ok = fscanf(f, "%d", &pid) == 1 && pid == (int)getpid();
  fclose(f);
  return ok;
}

/* Only stuck workers are left (or the deadline passed): their threads may
 * never return, so the process ends without them. */
static void abandon(wxd_server_t *s) {
  int left = 0;
  pthread_mutex_lock(&exited_mu);
  for (int i = 0; i < s->n; i++) left += !s->workers[i].exited;
  pthread_mutex_unlock(&exited_mu);
  if (left == 0) return;
  wxd_logf(WXD_LOG_WARN, -1, "stopped, abandoning %d stuck worker%s", left, left == 1 ? "" : "s");
  const char *pf = s->cfg->pid_file;
  if (pf[0] && pid_file_is_ours(s->cfg)) unlink(pf);
  _exit(0);
}

static void on_abandon_timer(uv_timer_t *t) { abandon(t->data); }

void wxd_server_stop(wxd_server_t *s, const char *why) {
  if (s->stopping) return;
  s->stopping = 1;
  /* Before the workers close their listeners: the monitor must not
   * touch a descriptor that is gone (or already reused). */
  wxd_steer_stop(&s->steer);
  wxd_restart_close(s);
  wxd_logf(WXD_LOG_INFO, -1, "%s: stopping (in-flight requests get up to %llu ms)", why,
           (unsigned long long)s->cfg->limits.shutdown_timeout_ms);
  for (int i = 0; i < s->n; i++) {
    if (s->workers[i].stalled) s->workers[i].abandoned = 1;
    uv_async_send(&s->workers[i].stop_async);
  }
  /* Healthy workers end by the deadline (theirs); a stuck one never does. */
  uv_timer_start(&s->abandon_timer, on_abandon_timer, s->cfg->limits.shutdown_timeout_ms + 500, 0);
  uv_unref((uv_handle_t *)&s->abandon_timer);
}

static void on_signal(uv_signal_t *sig, int signum) {
  wxd_server_t *s = sig->data;
  if (signum == SIGHUP) {
    wxd_reload_start(s, "SIGHUP");
    return;
  }
  if (signum == SIGUSR2) {
    if (!s->stopping) wxd_restart_start(s, "SIGUSR2");
    return;
  }
  s->signals++;
  if (s->signals == 1) {
    wxd_server_stop(s, signum == SIGINT ? "SIGINT" : "SIGTERM");
  } else if (signum == SIGINT) {
    /* A second Ctrl-C: the operator does not want to wait. */
    wxd_log(WXD_LOG_WARN, -1, "SIGINT again: exiting without waiting", NULL);
    _exit(1);
  } else {
    wxd_log(WXD_LOG_INFO, -1, "already stopping", NULL);
  }
}

static void on_worker_exited(uv_async_t *a) {
  wxd_server_t *s = a->data;
  pthread_mutex_lock(&exited_mu);
  int all = exited_count == s->n, stuck = 0;
  for (int i = 0; i < s->n; i++) stuck += !s->workers[i].exited && s->workers[i].stalled;
  int only_stuck = exited_count + stuck == s->n;
  pthread_mutex_unlock(&exited_mu);
  if (all) close_main_handles(s);
  else if (only_stuck && s->stopping) abandon(s);
}

static void write_pid_file(const wxd_config_t *cfg) {
  if (!cfg->pid_file[0]) return;
  FILE *f = fopen(cfg->pid_file, "w");
  if (!f) {
    wxd_logf(WXD_LOG_WARN, -1, "cannot write pid file %s: %s", cfg->pid_file, strerror(errno));
    return;
  }
  fprintf(f, "%d\n", (int)getpid());
  fclose(f);
}

int wxd_server_run(wxd_config_t *cfg, char **argv) {
  char err[1024];
  if (wxd_http_selfcheck(err, sizeof err) != 0) {
    wxd_log(WXD_LOG_ERROR, -1, err, NULL);
    return 1;
  }
  if (cfg->workers <= 0) cfg->workers = (int)uv_available_parallelism();
  if (cfg->workers > 256) cfg->workers = 256;
  signal(SIGPIPE, SIG_IGN);
  /* `wxd dev` runs the server again after a start-up that failed. */
  startup.loaded = 0;
  startup.verdict = 0;
  exited_count = 0;
  /* Every connection is a descriptor, and idle WebSocket connections are
   * cheap enough to hold tens of thousands: take all the hard limit
   * allows (a soft limit of 1024 is a common default). */
  struct rlimit nofile;
  if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
    nofile.rlim_cur = nofile.rlim_max;
    setrlimit(RLIMIT_NOFILE, &nofile);
  }
  /* A successor of a graceful restart shares the ports with the process it
   * replaces: no probe may refuse them. */
  int takeover = wxd_restart_is_takeover();

  struct sockaddr_storage ss, hss;
  socklen_t alen, halen;
  wxd_https_conf_t *https = &cfg->https;
  if (cfg->plain) {
    if (wxd_resolve(cfg->host, cfg->port, &ss, &alen) != 0) return 1;
    if (cfg->port != 0 && !takeover &&
        probe_port((struct sockaddr *)&ss, alen, err, sizeof err, cfg->host, cfg->port) != 0) {
      wxd_log(WXD_LOG_ERROR, -1, err, NULL);
      return 1;
    }
  }
  /* Certificate and key are read before anything listens: a bad pair
   * stops the start with the file named. */
  SSL_CTX *tls_ctx = NULL;
  if (https->enabled) {
    if (wxd_resolve(https->host, https->port, &hss, &halen) != 0) return 1;
    if (https->port != 0 && !takeover &&
        probe_port((struct sockaddr *)&hss, halen, err, sizeof err, https->host, https->port) != 0) {
      wxd_log(WXD_LOG_ERROR, -1, err, NULL);
      return 1;
    }
    tls_ctx = wxd_https_ctx(https, err, sizeof err);
    if (!tls_ctx) {
      wxd_log(WXD_LOG_ERROR, -1, err, NULL);
      return 1;
    }
  }

  int n = cfg->workers;
  wxd_server_t srv;
  memset(&srv, 0, sizeof srv);
  srv.cfg = cfg;
  srv.argv = argv;
  srv.n = n;
  srv.loop = uv_default_loop();
  pthread_mutex_init(&srv.reload.mu, NULL);
  srv.reload.generation = 1;
  wxd_log_timestamp(srv.reload.loaded_at, sizeof srv.reload.loaded_at);
  /* The shared dictionaries exist before any thread that could use them,
   * and the registry is read-only from here on. */
  srv.shdicts = wxd_shdict_registry_new();
  for (int i = 0; srv.shdicts && i < cfg->nshdicts; i++) {
    if (wxd_shdict_registry_add(srv.shdicts, cfg->shdicts[i].name, cfg->shdicts[i].bytes, err, sizeof err) != 0) {
      wxd_log(WXD_LOG_ERROR, -1, err, NULL);
      wxd_shdict_registry_free(srv.shdicts);
      SSL_CTX_free(tls_ctx);
      return 1;
    }
  }
  srv.ws_topics = srv.shdicts ? wxd_ws_topics_new(n) : NULL;
  srv.workers = srv.ws_topics ? calloc((size_t)n, sizeof *srv.workers) : NULL;
  if (!srv.workers) {
    wxd_ws_topics_free(srv.ws_topics);
    wxd_shdict_registry_free(srv.shdicts);
    SSL_CTX_free(tls_ctx);
    return 1;
  }
  wxd_worker_t *workers = srv.workers;
  wxd_metrics_init(n, cfg->metrics); /* before any worker could count */
  /* Asyncs the workers signal must exist before the workers run. */
  uv_async_init(srv.loop, &srv.worker_exited, on_worker_exited);
  srv.worker_exited.data = &srv;
  uv_signal_init(srv.loop, &srv.sigint);
  uv_signal_init(srv.loop, &srv.sigterm);
  uv_signal_init(srv.loop, &srv.sighup);
  uv_signal_init(srv.loop, &srv.sigusr2);
  srv.sigint.data = srv.sigterm.data = srv.sighup.data = srv.sigusr2.data = &srv;
  uv_timer_init(srv.loop, &srv.abandon_timer);
  srv.abandon_timer.data = &srv;
  wxd_watchdog_install();
  wxd_reload_init(&srv);

  uint32_t rnd[256];
  if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd) memset(rnd, 0, sizeof rnd);
  int made = 0, rc = 1;
  for (; made < n; made++) {
    wxd_worker_t *w = &workers[made];
    w->id = made;
    w->cfg = cfg;
    w->srv = &srv;
    w->id_prefix = rnd[made];
    pthread_mutex_init(&w->listen_mu, NULL);
    pthread_mutex_init(&w->adopt_mu, NULL);
    w->readbuf_size = 65536;
    w->readbuf = malloc(w->readbuf_size);
    /* Response heads are assembled here; sized once so that building one
     * never has to allocate (and so never fails half-way). */
    if (w->readbuf && wxd_buf_reserve(&w->out, 4096) != 0) {
      free(w->readbuf);
      w->readbuf = NULL;
    }
    uv_loop_init(&w->loop);
    wxd_steer_loop_init(&w->loop);
    /* The listeners are initialised first so that they can always be
     * closed (an unused plain one is never bound). */
    int lrc = cfg->plain ? uv_tcp_init_ex(&w->loop, &w->listener, ss.ss_family) : uv_tcp_init(&w->loop, &w->listener);
    int hrc = https->enabled ? uv_tcp_init_ex(&w->loop, &w->https_listener, hss.ss_family) : 0;
    if (lrc != 0 || hrc != 0 || !w->readbuf ||
        (cfg->plain && make_listener(w, &w->listener, (struct sockaddr *)&ss, cfg->host, cfg->port, err,
                                     sizeof err) != 0) ||
        (https->enabled && make_listener(w, &w->https_listener, (struct sockaddr *)&hss, https->host,
                                         https->port, err, sizeof err) != 0)) {
      if (lrc != 0 || hrc != 0) snprintf(err, sizeof err, "cannot create a socket: %s", uv_strerror(lrc ? lrc : hrc));
      else if (!w->readbuf) snprintf(err, sizeof err, "out of memory");
      wxd_log(WXD_LOG_ERROR, -1, err, NULL);
      if (lrc == 0) uv_close((uv_handle_t *)&w->listener, NULL);
      if (https->enabled && hrc == 0) uv_close((uv_handle_t *)&w->https_listener, NULL);
      uv_run(&w->loop, UV_RUN_DEFAULT);
      uv_loop_close(&w->loop);
      free(w->readbuf);
      goto cleanup;
    }
    /* Port 0: every worker must share the port the first one got. */
    if (made == 0 && cfg->plain && cfg->port == 0) cfg->port = bound_port(&w->listener, &ss);
    if (made == 0 && https->enabled && https->port == 0) https->port = bound_port(&w->https_listener, &hss);
    if (tls_ctx) {
      SSL_CTX_up_ref(tls_ctx);
      w->tls_ctx = tls_ctx;
    }
    uv_async_init(&w->loop, &w->stop_async, on_stop);
    w->stop_async.data = w;
    uv_async_init(&w->loop, &w->ctl_async, on_ctl);
    w->ctl_async.data = w;
    wxd_ws_worker_open(srv.ws_topics, w->id, &w->loop, w);
    w->bell_ok = wxd_bell_open(&w->bell, &w->loop) == 0;
    uv_async_init(&w->loop, &w->adopt_async, wxd_watchdog_on_adopt);
    w->adopt_async.data = w;
    uv_timer_init(&w->loop, &w->tick);
    w->tick.data = w;
    uv_timer_start(&w->tick, on_tick, 100, 100);
    uv_timer_init(&w->loop, &w->deadline);
    w->deadline.data = w;
  }

  /* Signals are caught from here on; they are handled once the main loop
   * runs (after start-up), so a SIGHUP or SIGTERM during a slow start is
   * acted on then instead of killing the process. */
  uv_signal_start(&srv.sigint, on_signal, SIGINT);
  uv_signal_start(&srv.sigterm, on_signal, SIGTERM);
  uv_signal_start(&srv.sighup, on_signal, SIGHUP);
  uv_signal_start(&srv.sigusr2, on_signal, SIGUSR2);
  for (int i = 0; i < n; i++) uv_thread_create(&workers[i].thread, worker_main, &workers[i]);

  pthread_mutex_lock(&startup.mu);
  /* A worker stuck in app.lua never answers: not waited for forever. */
  struct timespec until;
  clock_gettime(CLOCK_REALTIME, &until);
  until.tv_sec += (time_t)(cfg->limits.stall_timeout_ms * 15 / 1000) + 1;
  while (startup.loaded < n)
    if (pthread_cond_timedwait(&startup.cv, &startup.mu, &until) == ETIMEDOUT) {
      wxd_logf(WXD_LOG_ERROR, -1, "cannot load app %s: a worker did not finish loading within %llu s (app.lua "
               "does not return?)", cfg->app_dir, (unsigned long long)(cfg->limits.stall_timeout_ms * 15 / 1000) + 1);
      _exit(1);
    }
  int failed = -1;
  for (int i = 0; i < n; i++)
    if (workers[i].load_status != 0) failed = i;
  if (failed < 0) {
    /* Steering: the by-CPU program picks a socket by its index in the
     * SO_REUSEPORT group, which is the order the sockets started listening,
     * and it can only go on a listening socket. So the main thread makes
     * them listen here, worker by worker (index = worker id), before the
     * workers' own uv_listen (which only repeats the listen() call): once
     * every worker has loaded the app and before any is told to go, so that
     * nothing is accepted into a backlog while the app loads (or fails to). */
    /* Always in worker order: the watchdog steers around a stuck worker by
     * the same index. Not in a successor of a restart: its sockets join
     * groups that hold the old process's first, so the indexes are not
     * ours (it spreads by hash). */
    uv_os_fd_t plain_fd = -1, https_fd = -1;
    for (int i = 0; i < n; i++) {
      uv_os_fd_t fd;
      if (cfg->plain && uv_fileno((uv_handle_t *)&workers[i].listener, &fd) == 0) listen(fd, 511);
      if (https->enabled && uv_fileno((uv_handle_t *)&workers[i].https_listener, &fd) == 0) listen(fd, 511);
    }
    if (cfg->plain && !takeover) uv_fileno((uv_handle_t *)&workers[0].listener, &plain_fd);
    if (https->enabled && !takeover) uv_fileno((uv_handle_t *)&workers[0].https_listener, &https_fd);
    if (takeover && wxd_steer_wanted(cfg->steering, n))
      wxd_log(WXD_LOG_INFO, -1, "steering: by hash in a successor of a restart (the groups hold the old "
              "process's sockets first)", NULL);
    wxd_steer_start(&srv.steer, srv.loop, takeover ? WXD_STEER_HASH : cfg->steering, n, plain_fd, https_fd,
                    worker_busy, &srv);
  }
  startup.verdict = failed >= 0 ? -1 : 1;
  pthread_cond_broadcast(&startup.cv);
  pthread_mutex_unlock(&startup.mu);

  if (failed >= 0) {
    wxd_logf(WXD_LOG_ERROR, -1, "cannot load app %s: %s", cfg->app_dir, workers[failed].load_error);
    rc = WXD_SERVER_APP_FAILED;
    for (int i = 0; i < n; i++) uv_thread_join(&workers[i].thread);
    close_main_handles(&srv);
    uv_run(srv.loop, UV_RUN_DEFAULT);
  } else {
    if (takeover) {
      /* The old process lets go of the ports, then of the status endpoint,
       * once it hears we serve. */
      wxd_restart_signal_ready();
      if (cfg->admin_host[0]) {
        struct sockaddr_storage as;
        socklen_t aslen;
        char e[300];
        if (wxd_resolve(cfg->admin_host, cfg->admin_port, &as, &aslen) == 0)
          for (int i = 0; i < 100 && probe_port((struct sockaddr *)&as, aslen, e, sizeof e, cfg->admin_host,
                                                cfg->admin_port) != 0; i++) {
            struct timespec ts = {0, 50000000};
            nanosleep(&ts, NULL);
          }
      }
    }
    if (wxd_reload_start_admin(&srv) != 0) {
      wxd_server_stop(&srv, "status endpoint");
    }
    wxd_watchdog_start(&srv);
    write_pid_file(cfg);
    char app[1024], extra[1600], plain[300] = "", tls[300] = "";
    size_t al = wxd_json_escape(app, sizeof app, cfg->app_dir, strlen(cfg->app_dir));
    if (cfg->plain) snprintf(plain, sizeof plain, "\"listen\":\"%s:%d\",", cfg->host, cfg->port);
    if (https->enabled) snprintf(tls, sizeof tls, "\"https\":\"%s:%d\",", https->host, https->port);
    snprintf(extra, sizeof extra, "%s%s\"workers\":%d,\"app\":\"%.*s\",\"pid\":%d", plain, tls, n, (int)al,
             app, (int)getpid());
    /* The one line a human looks for; also what tests wait for. */
    wxd_log(WXD_LOG_INFO, -1, "listening", extra);
    wxd_reload_write_status(&srv);
    if (cfg->dev) wxd_reload_watch(&srv);
    uv_run(srv.loop, UV_RUN_DEFAULT);
    for (int i = 0; i < n; i++) uv_thread_join(&workers[i].thread);
    rc = 0;
    wxd_log(WXD_LOG_INFO, -1, "stopped", NULL);
    if (cfg->pid_file[0] && pid_file_is_ours(cfg)) unlink(cfg->pid_file);
  }

cleanup:
  if (made < n) {
    /* Start-up failed before the workers ran: close what was opened. */
    close_main_handles(&srv);
    uv_run(srv.loop, UV_RUN_DEFAULT);
  }
  /* The workers hold their own references (released when they end). */
  SSL_CTX_free(tls_ctx);
  SSL_CTX_free(srv.tls_next);
  for (int i = 0; i < made; i++) {
    wxd_worker_t *w = &workers[i];
    SSL_CTX_free(w->tls_ctx); /* a worker that never ran */
    w->tls_ctx = NULL;
    free(w->tls_scratch);
    if (uv_loop_close(&w->loop) != 0) {
      uv_walk(&w->loop, walk_close, NULL);
      uv_run(&w->loop, UV_RUN_DEFAULT);
      uv_loop_close(&w->loop);
    }
    if (w->bell_ok) wxd_bell_destroy(&w->bell); /* its handle closed with the loop */
    wxd_buf_free(&w->out);
    free(w->readbuf);
  }
  uv_loop_close(srv.loop);
  pthread_mutex_destroy(&srv.reload.mu);
  free(workers);
  /* Every worker thread has been joined (or never ran): nobody uses them. */
  wxd_shdict_registry_free(srv.shdicts);
  wxd_ws_topics_free(srv.ws_topics);
  return rc;
}
