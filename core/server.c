/* server: see server.h. */
#include "server.h"

#include <errno.h>
#include <lauxlib.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#include "http.h"

/* ---- configuration ---- */

void wxd_config_defaults(wxd_config_t *cfg) {
  snprintf(cfg->host, sizeof cfg->host, "127.0.0.1");
  cfg->port = 8080;
  cfg->workers = 0; /* auto */
  cfg->access_log = 1;
  cfg->log_level = WXD_LOG_INFO;
  cfg->limits.max_header_bytes = 16384;
  cfg->limits.max_body_bytes = 1048576;
  cfg->limits.max_uri_bytes = 8192;
  cfg->limits.header_timeout_ms = 10000;
  cfg->limits.body_timeout_ms = 30000;
  cfg->limits.keepalive_timeout_ms = 75000;
  cfg->limits.shutdown_timeout_ms = 10000;
  cfg->limits.max_requests = 10000;
}

int wxd_config_set_listen(wxd_config_t *cfg, const char *listen, char *err, size_t errlen) {
  const char *colon = strrchr(listen, ':');
  const char *host = listen;
  size_t hl;
  if (!colon) goto bad;
  if (listen[0] == '[') {
    const char *close = strchr(listen, ']');
    if (!close || close + 1 != colon) goto bad;
    host = listen + 1;
    hl = (size_t)(close - host);
  } else {
    hl = (size_t)(colon - listen);
  }
  if (hl == 0 || hl >= sizeof cfg->host) goto bad;
  char *end;
  long port = strtol(colon + 1, &end, 10);
  if (*end || end == colon + 1 || port < 0 || port > 65535) goto bad;
  memcpy(cfg->host, host, hl);
  cfg->host[hl] = 0;
  cfg->port = (int)port;
  return 0;
bad:
  snprintf(err, errlen, "listen: expected HOST:PORT or [IPV6]:PORT, got \"%s\"", listen);
  return -1;
}

static lua_Integer field_int(lua_State *L, int idx, const char *name, lua_Integer dflt) {
  lua_getfield(L, idx, name);
  lua_Integer v = lua_isnumber(L, -1) ? lua_tointeger(L, -1) : dflt;
  lua_pop(L, 1);
  return v;
}

int wxd_config_load(wxd_config_t *cfg, char *err, size_t errlen) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  wxd_vm_options_t opts = {cfg->lua_dir[0] ? cfg->lua_dir : NULL, cfg->app_dir, -1};
  wxd_vm_t *vm = wxd_vm_new(&loop, &opts);
  int rc = -1;
  if (!vm) {
    snprintf(err, errlen, "out of memory");
    goto out;
  }
  lua_State *L = vm->L;
  lua_getglobal(L, "require");
  lua_pushliteral(L, "wxd.server");
  if (lua_pcall(L, 1, 1, 0) != 0) {
    snprintf(err, errlen, "%s", lua_tostring(L, -1));
    goto out;
  }
  lua_getfield(L, -1, "read_config");
  lua_pushstring(L, cfg->app_dir);
  if (lua_pcall(L, 1, 2, 0) != 0) {
    snprintf(err, errlen, "%s", lua_tostring(L, -1));
    goto out;
  }
  if (lua_isnil(L, -2)) {
    snprintf(err, errlen, "%s", lua_tostring(L, -1));
    goto out;
  }
  lua_pop(L, 1);
  int c = lua_gettop(L);
  lua_getfield(L, c, "listen");
  if (lua_isstring(L, -1) && wxd_config_set_listen(cfg, lua_tostring(L, -1), err, errlen) != 0) goto out;
  lua_pop(L, 1);
  lua_getfield(L, c, "workers");
  cfg->workers = lua_isnumber(L, -1) ? (int)lua_tointeger(L, -1) : 0;
  lua_pop(L, 1);
  lua_getfield(L, c, "limits");
  if (lua_istable(L, -1)) {
    int l = lua_gettop(L);
    wxd_limits_t *lim = &cfg->limits;
    lim->max_header_bytes = (size_t)field_int(L, l, "max_header_bytes", (lua_Integer)lim->max_header_bytes);
    lim->max_body_bytes = (size_t)field_int(L, l, "max_body_bytes", (lua_Integer)lim->max_body_bytes);
    lim->max_uri_bytes = (size_t)field_int(L, l, "max_uri_bytes", (lua_Integer)lim->max_uri_bytes);
    lim->header_timeout_ms = (uint64_t)field_int(L, l, "header_timeout_ms", (lua_Integer)lim->header_timeout_ms);
    lim->body_timeout_ms = (uint64_t)field_int(L, l, "body_timeout_ms", (lua_Integer)lim->body_timeout_ms);
    lim->keepalive_timeout_ms =
        (uint64_t)field_int(L, l, "keepalive_timeout_ms", (lua_Integer)lim->keepalive_timeout_ms);
    lim->shutdown_timeout_ms =
        (uint64_t)field_int(L, l, "shutdown_timeout_ms", (lua_Integer)lim->shutdown_timeout_ms);
    lim->max_requests =
        (unsigned)field_int(L, l, "max_requests_per_connection", (lua_Integer)lim->max_requests);
  }
  lua_pop(L, 1);
  lua_getfield(L, c, "log");
  if (lua_istable(L, -1)) {
    lua_getfield(L, -1, "level");
    if (lua_isstring(L, -1)) {
      int lv = wxd_log_parse_level(lua_tostring(L, -1));
      if (lv >= 0) cfg->log_level = lv;
    }
    lua_pop(L, 1);
    lua_getfield(L, -1, "access");
    if (lua_isboolean(L, -1)) cfg->access_log = lua_toboolean(L, -1);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  rc = 0;
out:
  wxd_vm_free(vm);
  uv_loop_close(&loop);
  return rc;
}

/* ---- workers ---- */

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
static uv_async_t *exited_async; /* set while the main loop runs */

static int load_app(wxd_worker_t *w) {
  lua_State *L = w->vm->L;
  lua_getglobal(L, "require");
  lua_pushliteral(L, "wxd.server");
  if (lua_pcall(L, 1, 1, 0) != 0) goto fail;
  lua_getfield(L, -1, "load_app");
  lua_pushstring(L, w->cfg->app_dir);
  lua_pushinteger(L, w->id);
  if (lua_pcall(L, 2, 2, 0) != 0) goto fail;
  if (lua_isnil(L, -2)) goto fail;
  lua_pop(L, 1);
  w->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pop(L, 1);
  return 0;
fail:
  snprintf(w->load_error, sizeof w->load_error, "%s",
           lua_tostring(L, -1) ? lua_tostring(L, -1) : "unknown error");
  lua_settop(L, 0);
  return -1;
}

static void on_handle_closed(uv_handle_t *h) { (void)h; }

static void close_worker_handles(wxd_worker_t *w) {
  if (w->stopping) return;
  w->stopping = 1;
  uv_close((uv_handle_t *)&w->tick, on_handle_closed);
  uv_close((uv_handle_t *)&w->deadline, on_handle_closed);
  uv_close((uv_handle_t *)&w->stop_async, on_handle_closed);
  if (!uv_is_closing((uv_handle_t *)&w->listener))
    uv_close((uv_handle_t *)&w->listener, on_handle_closed);
}

static void on_deadline(uv_timer_t *t) {
  wxd_worker_t *w = t->data;
  if (w->nconns > 0)
    wxd_logf(WXD_LOG_WARN, w->id, "shutdown deadline reached; closing %u connection(s)", w->nconns);
  wxd_http_close_all(w);
  /* Handlers still waiting (a long sleep, later a slow upstream) would keep
   * the loop alive: their waits are closed and they never resume. */
  wxd_vm_cancel_waits(w->vm);
  close_worker_handles(w);
}

/* The main thread's request to stop; also re-sent by the last closing
 * connection so that we notice when draining is complete. */
static void on_stop(uv_async_t *a) {
  wxd_worker_t *w = a->data;
  if (!w->draining) {
    w->draining = 1;
    if (!uv_is_closing((uv_handle_t *)&w->listener))
      uv_close((uv_handle_t *)&w->listener, on_handle_closed);
    wxd_http_drain(w);
    uv_timer_start(&w->deadline, on_deadline, w->cfg->limits.shutdown_timeout_ms, 0);
  }
  if (w->nconns == 0) close_worker_handles(w);
}

static void on_tick(uv_timer_t *t) {
  wxd_worker_t *w = t->data;
  wxd_http_sweep(w);
  wxd_logbuf_flush(&w->access);
}

static void walk_close(uv_handle_t *h, void *arg) {
  (void)arg;
  if (!uv_is_closing(h)) uv_close(h, NULL);
}

static void worker_main(void *arg) {
  wxd_worker_t *w = arg;
  wxd_vm_options_t opts = {w->cfg->lua_dir[0] ? w->cfg->lua_dir : NULL, w->cfg->app_dir, w->id};
  w->vm = wxd_vm_new(&w->loop, &opts);
  if (!w->vm) {
    snprintf(w->load_error, sizeof w->load_error, "out of memory");
    w->load_status = -1;
  } else {
    w->vm->owner = w;
    w->load_status = load_app(w);
  }

  pthread_mutex_lock(&startup.mu);
  startup.loaded++;
  pthread_cond_broadcast(&startup.cv);
  while (startup.verdict == 0) pthread_cond_wait(&startup.cv, &startup.mu);
  int go = startup.verdict > 0;
  pthread_mutex_unlock(&startup.mu);

  if (go) {
    int rc = uv_listen((uv_stream_t *)&w->listener, 511, wxd_http_on_connection);
    if (rc != 0) {
      wxd_logf(WXD_LOG_ERROR, w->id, "listen: %s", uv_strerror(rc));
    } else {
      w->listening = 1;
    }
    uv_run(&w->loop, UV_RUN_DEFAULT);
  } else {
    close_worker_handles(w);
  }
  /* Whatever is left (sleep timers of coroutines cut short by the deadline)
   * is closed before the VM goes. */
  uv_walk(&w->loop, walk_close, NULL);
  uv_run(&w->loop, UV_RUN_DEFAULT);
  wxd_logbuf_free(&w->access);
  wxd_vm_free(w->vm);
  w->vm = NULL;
  pthread_mutex_lock(&exited_mu);
  exited_count++;
  if (exited_async) uv_async_send(exited_async);
  pthread_mutex_unlock(&exited_mu);
}

static int make_listener(wxd_worker_t *w, const struct sockaddr *addr, char *err, size_t errlen) {
  int rc = uv_tcp_init_ex(&w->loop, &w->listener, addr->sa_family);
  if (rc != 0) goto fail;
  w->listener.data = w;
  uv_os_fd_t fd;
  uv_fileno((uv_handle_t *)&w->listener, &fd);
  int one = 1;
  if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0) {
    rc = uv_translate_sys_error(errno);
    goto fail;
  }
  rc = uv_tcp_bind(&w->listener, addr, 0);
  if (rc != 0) goto fail;
  return 0;
fail:
  snprintf(err, errlen, "cannot listen on %s:%d: %s", w->cfg->host, w->cfg->port, uv_strerror(rc));
  return -1;
}

/* Without SO_REUSEPORT, so that another process already serving the port is
 * an error instead of a silent co-tenant. */
static int probe_port(const struct sockaddr *addr, socklen_t alen, char *err, size_t errlen,
                      const wxd_config_t *cfg) {
  int fd = socket(addr->sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return 0;
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  int rc = bind(fd, addr, alen);
  int e = errno;
  close(fd);
  if (rc != 0) {
    snprintf(err, errlen, "cannot listen on %s:%d: %s", cfg->host, cfg->port, strerror(e));
    return -1;
  }
  return 0;
}

/* HOST may be an address or a name (e.g. localhost); a name is resolved once,
 * at start-up, to its first address. */
static int resolve_listen(const wxd_config_t *cfg, struct sockaddr_storage *ss, socklen_t *alen) {
  struct addrinfo hints, *res = NULL;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  char port[16];
  snprintf(port, sizeof port, "%d", cfg->port);
  int rc = getaddrinfo(cfg->host, port, &hints, &res);
  if (rc != 0 || !res) {
    wxd_logf(WXD_LOG_ERROR, -1, "listen: cannot resolve \"%s\": %s", cfg->host, gai_strerror(rc));
    if (res) freeaddrinfo(res);
    return -1;
  }
  memcpy(ss, res->ai_addr, res->ai_addrlen);
  *alen = res->ai_addrlen;
  freeaddrinfo(res);
  return 0;
}

typedef struct main_ctx {
  uv_signal_t sigint, sigterm, sighup;
  uv_async_t worker_exited; /* a worker's loop ended */
  wxd_worker_t *workers;
  int n;
  int signals;
} main_ctx_t;


static void on_signal(uv_signal_t *s, int signum) {
  main_ctx_t *m = s->data;
  if (signum == SIGHUP) {
    wxd_log(WXD_LOG_WARN, -1, "SIGHUP: hot reload is not implemented yet; ignoring", NULL);
    return;
  }
  m->signals++;
  if (m->signals == 1) {
    wxd_logf(WXD_LOG_INFO, -1, "%s: stopping (in-flight requests get up to %llu ms)",
             signum == SIGINT ? "SIGINT" : "SIGTERM",
             (unsigned long long)m->workers[0].cfg->limits.shutdown_timeout_ms);
    for (int i = 0; i < m->n; i++) uv_async_send(&m->workers[i].stop_async);
  } else if (signum == SIGINT) {
    /* A second Ctrl-C: the operator does not want to wait. */
    wxd_log(WXD_LOG_WARN, -1, "SIGINT again: exiting without waiting", NULL);
    _exit(1);
  } else {
    wxd_log(WXD_LOG_INFO, -1, "already stopping", NULL);
  }
}

static void on_worker_exited(uv_async_t *a) {
  main_ctx_t *m = a->data;
  pthread_mutex_lock(&exited_mu);
  int all = exited_count == m->n;
  pthread_mutex_unlock(&exited_mu);
  if (!all) return;
  uv_close((uv_handle_t *)&m->sigint, NULL);
  uv_close((uv_handle_t *)&m->sigterm, NULL);
  uv_close((uv_handle_t *)&m->sighup, NULL);
  uv_close((uv_handle_t *)&m->worker_exited, NULL);
}

int wxd_server_run(wxd_config_t *cfg) {
  char err[1024];
  if (wxd_http_selfcheck(err, sizeof err) != 0) {
    wxd_log(WXD_LOG_ERROR, -1, err, NULL);
    return 1;
  }
  if (cfg->workers <= 0) cfg->workers = (int)uv_available_parallelism();
  if (cfg->workers > 256) cfg->workers = 256;
  signal(SIGPIPE, SIG_IGN);

  struct sockaddr_storage ss;
  socklen_t alen;
  if (resolve_listen(cfg, &ss, &alen) != 0) return 1;
  if (cfg->port != 0 && probe_port((struct sockaddr *)&ss, alen, err, sizeof err, cfg) != 0) {
    wxd_log(WXD_LOG_ERROR, -1, err, NULL);
    return 1;
  }

  int n = cfg->workers;
  wxd_worker_t *workers = calloc((size_t)n, sizeof *workers);
  if (!workers) return 1;
  uint32_t rnd[256];
  if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd) memset(rnd, 0, sizeof rnd);
  int made = 0, rc = 1;
  for (; made < n; made++) {
    wxd_worker_t *w = &workers[made];
    w->id = made;
    w->cfg = cfg;
    w->id_prefix = rnd[made];
    w->readbuf_size = 65536;
    w->readbuf = malloc(w->readbuf_size);
    uv_loop_init(&w->loop);
    if (!w->readbuf || make_listener(w, (struct sockaddr *)&ss, err, sizeof err) != 0) {
      if (!w->readbuf) snprintf(err, sizeof err, "out of memory");
      wxd_log(WXD_LOG_ERROR, -1, err, NULL);
      uv_close((uv_handle_t *)&w->listener, NULL);
      uv_run(&w->loop, UV_RUN_DEFAULT);
      uv_loop_close(&w->loop);
      free(w->readbuf);
      goto cleanup;
    }
    if (made == 0 && cfg->port == 0) {
      /* Port 0: every worker must share the port the first one got. */
      int sl = sizeof ss;
      uv_tcp_getsockname(&w->listener, (struct sockaddr *)&ss, &sl);
      cfg->port = ntohs(ss.ss_family == AF_INET ? ((struct sockaddr_in *)&ss)->sin_port
                                                : ((struct sockaddr_in6 *)&ss)->sin6_port);
    }
    uv_async_init(&w->loop, &w->stop_async, on_stop);
    w->stop_async.data = w;
    uv_timer_init(&w->loop, &w->tick);
    w->tick.data = w;
    uv_timer_start(&w->tick, on_tick, 100, 100);
    uv_timer_init(&w->loop, &w->deadline);
    w->deadline.data = w;
  }

  for (int i = 0; i < n; i++) uv_thread_create(&workers[i].thread, worker_main, &workers[i]);

  pthread_mutex_lock(&startup.mu);
  while (startup.loaded < n) pthread_cond_wait(&startup.cv, &startup.mu);
  int failed = -1;
  for (int i = 0; i < n; i++)
    if (workers[i].load_status != 0) failed = i;
  startup.verdict = failed >= 0 ? -1 : 1;
  pthread_cond_broadcast(&startup.cv);
  pthread_mutex_unlock(&startup.mu);

  if (failed >= 0) {
    wxd_logf(WXD_LOG_ERROR, -1, "cannot load app %s: %s", cfg->app_dir, workers[failed].load_error);
  } else {
    char app[1024], extra[1600];
    size_t al = wxd_json_escape(app, sizeof app, cfg->app_dir, strlen(cfg->app_dir));
    snprintf(extra, sizeof extra, "\"listen\":\"%s:%d\",\"workers\":%d,\"app\":\"%.*s\",\"pid\":%d",
             cfg->host, cfg->port, n, (int)al, app, (int)getpid());
    wxd_log(WXD_LOG_INFO, -1, "listening", extra);
    /* The one line a human looks for; also what tests wait for. */
    main_ctx_t m = {.workers = workers, .n = n};
    uv_loop_t *loop = uv_default_loop();
    uv_signal_init(loop, &m.sigint);
    uv_signal_init(loop, &m.sigterm);
    uv_signal_init(loop, &m.sighup);
    m.sigint.data = m.sigterm.data = m.sighup.data = &m;
    uv_signal_start(&m.sigint, on_signal, SIGINT);
    uv_signal_start(&m.sigterm, on_signal, SIGTERM);
    uv_signal_start(&m.sighup, on_signal, SIGHUP);
    uv_async_init(loop, &m.worker_exited, on_worker_exited);
    m.worker_exited.data = &m;
    pthread_mutex_lock(&exited_mu);
    exited_async = &m.worker_exited;
    if (exited_count > 0) uv_async_send(exited_async);
    pthread_mutex_unlock(&exited_mu);
    uv_run(loop, UV_RUN_DEFAULT);
    pthread_mutex_lock(&exited_mu);
    exited_async = NULL;
    pthread_mutex_unlock(&exited_mu);
    uv_loop_close(loop);
    rc = 0;
  }
  for (int i = 0; i < n; i++) uv_thread_join(&workers[i].thread);
  if (rc == 0) wxd_log(WXD_LOG_INFO, -1, "stopped", NULL);

cleanup:
  for (int i = 0; i < made; i++) {
    wxd_worker_t *w = &workers[i];
    if (uv_loop_close(&w->loop) != 0) {
      uv_walk(&w->loop, walk_close, NULL);
      uv_run(&w->loop, UV_RUN_DEFAULT);
      uv_loop_close(&w->loop);
    }
    wxd_buf_free(&w->out);
    free(w->readbuf);
  }
  free(workers);
  return rc;
}
