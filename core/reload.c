/* reload: see reload.h. */
#include "reload.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "metrics.h"
#include "tls.h"
#include "watchdog.h"

int wxd_resolve(const char *host, int port, struct sockaddr_storage *ss, socklen_t *alen);

static void on_reload_async(uv_async_t *a);
static void on_debounce(uv_timer_t *t);

void wxd_reload_init(wxd_server_t *s) {
  uv_async_init(s->loop, &s->reload_async, on_reload_async);
  s->reload_async.data = s;
  uv_timer_init(s->loop, &s->watch_debounce);
  s->watch_debounce.data = s;
}

/* ---- coordinator (main thread) ---- */

/* A stuck worker takes no part (it could not answer): it is abandoned and
 * serves no new connection again in this process (watchdog.c). */
static void send_all(wxd_server_t *s, int cmd) {
  pthread_mutex_lock(&s->reload.mu);
  s->reload.expected = 0;
  for (int i = 0; i < s->n; i++) {
    wxd_worker_t *w = &s->workers[i];
    if (w->stalled || w->abandoned) {
      w->abandoned = 1;
      w->reload_waiting = 0;
      continue;
    }
    w->ctl_cmd = cmd;
    w->reload_waiting = 1;
    s->reload.expected++;
  }
  pthread_mutex_unlock(&s->reload.mu);
  for (int i = 0; i < s->n; i++)
    if (s->workers[i].reload_waiting) uv_async_send(&s->workers[i].ctl_async);
}

void wxd_reload_worker_stalled(wxd_server_t *s, wxd_worker_t *w) {
  wxd_reload_state_t *rs = &s->reload;
  pthread_mutex_lock(&rs->mu);
  int counted = rs->phase != 0 && w->reload_waiting;
  if (counted) {
    w->reload_waiting = 0;
    w->abandoned = 1;
    rs->replies++;
    if (rs->phase == 1 && rs->verdict_ok) {
      rs->verdict_ok = 0;
      snprintf(w->prep_error, sizeof w->prep_error, "worker %d got stuck while loading the new code", w->id);
    }
  }
  pthread_mutex_unlock(&rs->mu);
  if (counted) uv_async_send(&s->reload_async);
}

/* Config keys the running server cannot change: they need a restart. */
static void restart_needed(const wxd_config_t *old, const wxd_config_t *nw, char *out, size_t cap) {
  out[0] = 0;
  size_t n = 0;
#define CHANGED(name)                                                         \
  n += (size_t)snprintf(out + n, n < cap ? cap - n : 0, "%s\"%s\"", n ? "," : "", name)
  if (strcmp(old->file_listen, nw->file_listen) != 0) CHANGED("listen");
  if (old->file_workers != nw->file_workers) CHANGED("workers");
  if (old->file_steering != nw->file_steering) CHANGED("steering");
  if (strcmp(old->file_admin, nw->file_admin) != 0) CHANGED("admin_listen");
  /* The HTTPS listener's socket stays; its certificate and key do not. */
  if (old->https.enabled != nw->https.enabled) CHANGED("https");
  else if (strcmp(old->https.file_listen, nw->https.file_listen) != 0) CHANGED("https.listen");
  if (memcmp(&old->limits, &nw->limits, sizeof old->limits) != 0) CHANGED("limits");
  if (old->log_level != nw->log_level || old->access_log != nw->access_log) CHANGED("log");
  if (old->metrics != nw->metrics) CHANGED("metrics");
  if (old->trace != nw->trace) CHANGED("trace");
  /* Dictionaries are created once, before the workers: their data survives
   * reloads, and so do their names and sizes. */
  int shd = old->nshdicts != nw->nshdicts;
  for (int i = 0; !shd && i < old->nshdicts; i++)
    shd = strcmp(old->shdicts[i].name, nw->shdicts[i].name) != 0 || old->shdicts[i].bytes != nw->shdicts[i].bytes;
  if (shd) CHANGED("shdict");
#undef CHANGED
  if (n >= cap) out[cap - 1] = 0;
}

static void finish(wxd_server_t *s, int ok, const char *error) {
  wxd_reload_state_t *rs = &s->reload;
  char extra[3072];
  pthread_mutex_lock(&rs->mu);
  rs->last_ms = (double)(uv_hrtime() - rs->started_ns) / 1e6;
  rs->last_ok = ok;
  if (ok) {
    rs->generation++;
    rs->succeeded++;
    wxd_log_timestamp(rs->loaded_at, sizeof rs->loaded_at);
    snprintf(extra, sizeof extra, "\"generation\":%u,\"ms\":%.1f,\"trigger\":\"%s\",\"restart_needed\":[%s]",
             rs->generation, rs->last_ms, rs->why, rs->restart_needed);
  } else {
    rs->failed++;
    snprintf(rs->last_error, sizeof rs->last_error, "%s", error ? error : "unknown error");
    wxd_log_timestamp(rs->last_error_at, sizeof rs->last_error_at);
    char esc[2400];
    size_t el = wxd_json_escape(esc, sizeof esc, rs->last_error, strlen(rs->last_error));
    snprintf(extra, sizeof extra, "\"generation\":%u,\"ms\":%.1f,\"trigger\":\"%s\",\"error\":\"%.*s\"",
             rs->generation, rs->last_ms, rs->why, (int)el, esc);
  }
  rs->phase = 0;
  int again = rs->pending;
  rs->pending = 0;
  char restart[256];
  snprintf(restart, sizeof restart, "%s", rs->restart_needed);
  pthread_mutex_unlock(&rs->mu);
  if (ok) {
    wxd_log(WXD_LOG_INFO, -1, "reloaded", extra);
    if (restart[0])
      wxd_logf(WXD_LOG_WARN, -1, "config changes to %s apply only after a restart", restart);
  } else {
    wxd_log(WXD_LOG_ERROR, -1, "reload refused; the previous generation keeps serving", extra);
  }
  wxd_reload_write_status(s);
  if (again) wxd_reload_start(s, "queued request");
}

void wxd_reload_start(wxd_server_t *s, const char *why) {
  wxd_reload_state_t *rs = &s->reload;
  if (s->stopping) return;
  pthread_mutex_lock(&rs->mu);
  if (rs->phase != 0) {
    rs->pending = 1;
    pthread_mutex_unlock(&rs->mu);
    return;
  }
  rs->phase = 1;
  rs->replies = 0;
  rs->verdict_ok = 1;
  rs->attempts++;
  rs->started_ns = uv_hrtime();
  snprintf(rs->why, sizeof rs->why, "%s", why);
  pthread_mutex_unlock(&rs->mu);
  wxd_logf(WXD_LOG_INFO, -1, "reload requested (%s)", why);

  /* Read the config once here to tell what a reload cannot apply. Errors
   * in it are also found by every worker's load; stop at the first. */
  wxd_config_t *nc = malloc(sizeof *nc);
  char err[2048];
  if (!nc) {
    finish(s, 0, "out of memory");
    return;
  }
  memcpy(nc, s->cfg, sizeof *nc);
  wxd_config_defaults(nc);
  nc->file_listen[0] = nc->file_admin[0] = 0;
  int rc = wxd_config_load(nc, err, sizeof err);
  if (rc == 0) {
    wxd_config_apply_env(nc);
    pthread_mutex_lock(&rs->mu);
    restart_needed(s->cfg, nc, rs->restart_needed, sizeof rs->restart_needed);
    pthread_mutex_unlock(&rs->mu);
  }
  /* Certificates are read again (renewed files take effect): here, once,
   * so that a bad pair refuses the reload before any worker switches. */
  SSL_CTX *tls = NULL;
  if (rc == 0 && s->cfg->https.enabled && nc->https.enabled) {
    tls = wxd_https_ctx(&nc->https, err, sizeof err);
    if (!tls) rc = -1;
  }
  OPENSSL_cleanse(nc->https.passphrase, sizeof nc->https.passphrase);
  free(nc);
  if (tls) {
    pthread_mutex_lock(&rs->mu);
    SSL_CTX_free(s->tls_next);
    s->tls_next = tls; /* workers take it at COMMIT; released when the reload ends */
    pthread_mutex_unlock(&rs->mu);
  }
  if (rc != 0) {
    finish(s, 0, err);
    return;
  }
  send_all(s, WXD_CTL_PREPARE);
}

void wxd_reload_worker_reply(wxd_worker_t *w, const char *err) {
  wxd_reload_state_t *rs = &w->srv->reload;
  pthread_mutex_lock(&rs->mu);
  if (!w->reload_waiting) { /* too late: the watchdog counted it as stuck */
    pthread_mutex_unlock(&rs->mu);
    return;
  }
  w->reload_waiting = 0;
  rs->replies++;
  if (err && rs->verdict_ok) {
    rs->verdict_ok = 0;
    snprintf(w->prep_error, sizeof w->prep_error, "%s", err);
  }
  pthread_mutex_unlock(&rs->mu);
  uv_async_send(&w->srv->reload_async);
}

static void on_reload_async(uv_async_t *a) {
  wxd_server_t *s = a->data;
  wxd_reload_state_t *rs = &s->reload;
  pthread_mutex_lock(&rs->mu);
  if (rs->phase == 0 || rs->replies < rs->expected) {
    pthread_mutex_unlock(&rs->mu);
    return;
  }
  if (rs->phase == 1) {
    rs->phase = 2;
    rs->replies = 0;
    int ok = rs->verdict_ok && !s->stopping;
    if (s->stopping) rs->verdict_ok = 0;
    pthread_mutex_unlock(&rs->mu);
    send_all(s, ok ? WXD_CTL_COMMIT : WXD_CTL_ABORT);
    return;
  }
  int ok = rs->verdict_ok;
  /* Every worker has committed (and referenced the new context) or aborted. */
  SSL_CTX_free(s->tls_next);
  s->tls_next = NULL;
  char err[2048] = "";
  for (int i = 0; i < s->n && !ok; i++)
    if (s->workers[i].prep_error[0]) {
      snprintf(err, sizeof err, "%s", s->workers[i].prep_error);
      s->workers[i].prep_error[0] = 0;
    }
  pthread_mutex_unlock(&rs->mu);
  if (!ok && !err[0]) snprintf(err, sizeof err, "the server is stopping");
  finish(s, ok, err);
}

/* ---- status ---- */

static void append_str(wxd_buf_t *b, const char *s) { wxd_buf_append(b, s, strlen(s)); }

static void append_json_string(wxd_buf_t *b, const char *s) {
  if (!s || !s[0]) {
    append_str(b, "null");
    return;
  }
  size_t len = strlen(s);
  if (wxd_buf_reserve(b, len * 6 + 2) != 0) return;
  b->data[b->len++] = '"';
  b->len += wxd_json_escape(b->data + b->len, len * 6, s, len);
  b->data[b->len++] = '"';
}

static void status_json(wxd_server_t *s, wxd_buf_t *b) {
  wxd_reload_state_t *rs = &s->reload;
  char tmp[512];
  pthread_mutex_lock(&rs->mu);
  if (s->cfg->plain)
    snprintf(tmp, sizeof tmp, "{\"pid\":%d,\"listen\":\"%s:%d\",", (int)getpid(), s->cfg->host, s->cfg->port);
  else
    snprintf(tmp, sizeof tmp, "{\"pid\":%d,\"listen\":null,", (int)getpid());
  append_str(b, tmp);
  if (s->cfg->https.enabled) {
    snprintf(tmp, sizeof tmp, "\"https\":\"%s:%d\",", s->cfg->https.host, s->cfg->https.port);
    append_str(b, tmp);
  }
  append_str(b, "\"app\":");
  append_json_string(b, s->cfg->app_dir);
  snprintf(tmp, sizeof tmp,
           ",\"generation\":%u,\"loaded_at\":\"%s\",\"reloads\":{\"attempts\":%u,\"succeeded\":%u,"
           "\"failed\":%u,\"in_progress\":%s},\"last_reload\":{\"ok\":%s,\"ms\":%.1f,\"trigger\":",
           rs->generation, rs->loaded_at, rs->attempts, rs->succeeded, rs->failed,
           rs->phase ? "true" : "false", rs->last_ok || rs->attempts == 0 ? "true" : "false", rs->last_ms);
  append_str(b, tmp);
  append_json_string(b, rs->attempts ? rs->why : NULL);
  append_str(b, ",\"error\":");
  append_json_string(b, rs->last_ok ? NULL : rs->last_error);
  append_str(b, "},\"last_error\":");
  append_json_string(b, rs->last_error);
  append_str(b, ",\"last_error_at\":");
  append_json_string(b, rs->last_error_at);
  snprintf(tmp, sizeof tmp, ",\"restart_needed\":[%s],\"steering\":{\"mode\":\"%s\",\"now\":\"%s\",\"changes\":%u}",
           rs->restart_needed, wxd_steer_name(s->steer.mode), wxd_steer_current(&s->steer), s->steer.switches);
  append_str(b, tmp);
  pthread_mutex_unlock(&rs->mu);
  wxd_watchdog_status(s, b);
  append_str(b, ",\"workers\":[");
  for (int i = 0; i < s->n; i++) {
    wxd_worker_stats_t *st = &s->workers[i].stats;
    snprintf(tmp, sizeof tmp,
             "%s{\"id\":%d,\"generation\":%u,\"requests\":%llu,\"connections\":%u,"
             "\"paused_for_output\":%u,\"retired_generations\":%u,\"busy\":%.2f,\"stuck\":%s,\"stalls\":%u}",
             i ? "," : "", i, atomic_load(&st->generation),
             (unsigned long long)atomic_load(&st->requests), atomic_load(&st->connections),
             atomic_load(&st->paused_for_output), atomic_load(&st->retired),
             atomic_load(&st->busy_permille) / 1000.0, s->workers[i].stalled ? "true" : "false",
             s->workers[i].stalls);
    append_str(b, tmp);
  }
  append_str(b, "]}\n");
}

void wxd_reload_write_status(wxd_server_t *s) {
  /* After a restart the file is the successor's. */
  if (!s->cfg->pid_file[0] || s->handed_over) return;
  char path[PATH_MAX + 16], tmp[PATH_MAX + 32];
  snprintf(path, sizeof path, "%s.status", s->cfg->pid_file);
  snprintf(tmp, sizeof tmp, "%s.status.%d", s->cfg->pid_file, (int)getpid());
  wxd_buf_t b = {0};
  status_json(s, &b);
  FILE *f = fopen(tmp, "w");
  if (f) {
    fwrite(b.data, 1, b.len, f);
    /* rename() makes the new status appear whole to `wxd reload`. */
    if (fclose(f) == 0 && rename(tmp, path) == 0) {
      wxd_buf_free(&b);
      return;
    }
  }
  wxd_logf(WXD_LOG_WARN, -1, "cannot write %s: %s", path, strerror(errno));
  unlink(tmp);
  wxd_buf_free(&b);
}

/* ---- admin endpoint: GET /status ---- */

/* A status connection: answered once, then closed; one that says nothing
 * is closed after ADMIN_TIMEOUT_MS, and every one is closed at shutdown. */
#define ADMIN_TIMEOUT_MS 5000

typedef struct admin_conn {
  uv_tcp_t tcp;
  uv_timer_t timer;
  wxd_server_t *srv;
  struct admin_conn *prev, *next;
  int handles;  /* open handles; freed at 0 */
  int closing;
  char buf[4096];
  size_t len;
  int answered;
} admin_conn_t;

typedef struct admin_write {
  uv_write_t req;
  admin_conn_t *conn;
  wxd_buf_t out;
} admin_write_t;

static void admin_closed(uv_handle_t *h) {
  admin_conn_t *c = h->data;
  if (--c->handles == 0) free(c);
}

static void admin_close(admin_conn_t *c) {
  if (c->closing) return;
  c->closing = 1;
  wxd_server_t *s = c->srv;
  if (c->prev) c->prev->next = c->next;
  else s->admin_conns = c->next;
  if (c->next) c->next->prev = c->prev;
  uv_close((uv_handle_t *)&c->tcp, admin_closed);
  uv_close((uv_handle_t *)&c->timer, admin_closed);
}

static void admin_timeout(uv_timer_t *t) { admin_close(t->data); }

static void admin_written(uv_write_t *req, int status) {
  (void)status;
  admin_write_t *aw = (admin_write_t *)req;
  admin_close(aw->conn);
  wxd_buf_free(&aw->out);
  free(aw);
}

static void admin_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf) {
  (void)hint;
  admin_conn_t *c = h->data;
  *buf = uv_buf_init(c->buf + c->len, (unsigned)(sizeof c->buf - c->len - 1));
}

static void admin_respond(admin_conn_t *c) {
  c->answered = 1;
  uv_read_stop((uv_stream_t *)&c->tcp);
  admin_write_t *aw = calloc(1, sizeof *aw);
  if (!aw) {
    admin_close(c);
    return;
  }
  aw->conn = c;
  wxd_buf_t body = {0};
  int status = 404;
  const char *ctype = "application/json";
  c->buf[c->len] = 0;
  if (strncmp(c->buf, "GET /status ", 12) == 0 || strncmp(c->buf, "GET /status?", 12) == 0) {
    status = 200;
    status_json(c->srv, &body);
  } else if ((strncmp(c->buf, "GET /metrics ", 13) == 0 || strncmp(c->buf, "GET /metrics?", 13) == 0) &&
             !c->srv->cfg->metrics) {
    /* A scraper sees the target down, and a person reads why. */
    ctype = "text/plain; charset=utf-8";
    append_str(&body, "metrics are off (metrics = false in config.lua)\n");
  } else if (strncmp(c->buf, "GET /metrics ", 13) == 0 || strncmp(c->buf, "GET /metrics?", 13) == 0) {
    status = 200;
    ctype = "text/plain; version=0.0.4; charset=utf-8";
    wxd_metrics_render_server(c->srv, &body);
  } else {
    append_str(&body, "{\"error\":\"not found\",\"endpoints\":[\"GET /status\",\"GET /metrics\"]}\n");
  }
  char head[256];
  int hl = snprintf(head, sizeof head,
                    "HTTP/1.1 %d %s\r\nServer: wxd\r\nContent-Type: %s\r\n"
                    "Content-Length: %zu\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
                    status, status == 200 ? "OK" : "Not Found", ctype, body.len);
  wxd_buf_append(&aw->out, head, (size_t)hl);
  wxd_buf_append(&aw->out, body.data, body.len);
  wxd_buf_free(&body);
  uv_buf_t b = uv_buf_init(aw->out.data, (unsigned)aw->out.len);
  if (uv_write(&aw->req, (uv_stream_t *)&c->tcp, &b, 1, admin_written) != 0) {
    wxd_buf_free(&aw->out);
    free(aw);
    admin_close(c);
  }
}

static void admin_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf) {
  (void)buf;
  admin_conn_t *c = st->data;
  if (c->answered) return;
  if (nread < 0) {
    admin_close(c);
    return;
  }
  c->len += (size_t)nread;
  c->buf[c->len] = 0;
  if (strstr(c->buf, "\r\n\r\n") || c->len >= sizeof c->buf - 1) admin_respond(c);
}

static void admin_connection(uv_stream_t *server, int status) {
  wxd_server_t *s = server->data;
  if (status < 0) return;
  admin_conn_t *c = calloc(1, sizeof *c);
  if (!c) return;
  c->srv = s;
  uv_tcp_init(s->loop, &c->tcp);
  uv_timer_init(s->loop, &c->timer);
  c->tcp.data = c;
  c->timer.data = c;
  c->handles = 2;
  c->next = s->admin_conns;
  if (c->next) c->next->prev = c;
  s->admin_conns = c;
  uv_timer_start(&c->timer, admin_timeout, ADMIN_TIMEOUT_MS, 0);
  if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0 ||
      uv_read_start((uv_stream_t *)&c->tcp, admin_alloc, admin_read) != 0)
    admin_close(c);
}

int wxd_reload_start_admin(wxd_server_t *s) {
  const wxd_config_t *cfg = s->cfg;
  if (!cfg->admin_host[0]) return 0;
  struct sockaddr_storage ss;
  socklen_t alen;
  if (wxd_resolve(cfg->admin_host, cfg->admin_port, &ss, &alen) != 0) return -1;
  uv_tcp_init(s->loop, &s->admin);
  s->admin.data = s;
  s->admin_open = 1;
  int rc = uv_tcp_bind(&s->admin, (struct sockaddr *)&ss, 0);
  if (rc == 0) rc = uv_listen((uv_stream_t *)&s->admin, 64, admin_connection);
  if (rc != 0) {
    wxd_logf(WXD_LOG_ERROR, -1, "cannot serve status on %s:%d: %s", cfg->admin_host, cfg->admin_port,
             uv_strerror(rc));
    return -1;
  }
  wxd_logf(WXD_LOG_INFO, -1, "status endpoint on http://%s:%d/status", cfg->admin_host, cfg->admin_port);
  return 0;
}

/* ---- wxd dev: watch the app's files ---- */

typedef struct wxd_watch {
  uv_fs_event_t ev;
  struct wxd_watch *next;
  wxd_server_t *srv;
} wxd_watch_t;

#define WATCH_MAX_DIRS 512
#define WATCH_MAX_DEPTH 6

static void watch_closed(uv_handle_t *h) { free(h->data); }

static void unwatch_all(wxd_server_t *s) {
  wxd_watch_t *wt = s->watches;
  while (wt) {
    wxd_watch_t *next = wt->next;
    uv_close((uv_handle_t *)&wt->ev, watch_closed);
    wt = next;
  }
  s->watches = NULL;
}

static void on_fs_event(uv_fs_event_t *ev, const char *filename, int events, int status) {
  (void)events;
  wxd_watch_t *wt = ev->data;
  if (status < 0) return;
  size_t n = filename ? strlen(filename) : 0;
  /* Only Lua sources and directories (a new folder of handlers) matter;
   * editors' swap and backup files do not. */
  int lua = n > 4 && strcmp(filename + n - 4, ".lua") == 0;
  int dir = n > 0 && strchr(filename, '.') == NULL;
  if (!lua && !dir) return;
  uv_timer_start(&wt->srv->watch_debounce, on_debounce, 150, 0);
}

static int watch_dir(wxd_server_t *s, const char *path, int depth, int *count) {
  if (*count >= WATCH_MAX_DIRS || depth > WATCH_MAX_DEPTH) return 0;
  wxd_watch_t *wt = calloc(1, sizeof *wt);
  if (!wt) return -1;
  wt->srv = s;
  uv_fs_event_init(s->loop, &wt->ev);
  wt->ev.data = wt;
  if (uv_fs_event_start(&wt->ev, on_fs_event, path, 0) != 0) {
    uv_close((uv_handle_t *)&wt->ev, watch_closed);
    return 0;
  }
  wt->next = s->watches;
  s->watches = wt;
  (*count)++;
  DIR *d = opendir(path);
  if (!d) return 0;
  struct dirent *de;
  while ((de = readdir(d)) != NULL) {
    /* Hidden folders (.git), dependencies and build output are not app code. */
    if (de->d_name[0] == '.' || strcmp(de->d_name, "node_modules") == 0 ||
        strcmp(de->d_name, "build") == 0)
      continue;
    char sub[PATH_MAX];
    if (snprintf(sub, sizeof sub, "%s/%s", path, de->d_name) >= (int)sizeof sub) continue;
    struct stat st;
    if (lstat(sub, &st) == 0 && S_ISDIR(st.st_mode)) watch_dir(s, sub, depth + 1, count);
  }
  closedir(d);
  return 0;
}

void wxd_reload_watch(wxd_server_t *s) {
  unwatch_all(s);
  int count = 0;
  watch_dir(s, s->cfg->app_dir, 0, &count);
  wxd_logf(WXD_LOG_DEBUG, -1, "dev: watching %d director%s under %s", count, count == 1 ? "y" : "ies",
           s->cfg->app_dir);
}

static void on_debounce(uv_timer_t *t) {
  wxd_server_t *s = t->data;
  wxd_reload_start(s, "file change");
  /* Folders may have come or gone. */
  wxd_reload_watch(s);
}

void wxd_reload_close(wxd_server_t *s) {
  uv_close((uv_handle_t *)&s->reload_async, NULL);
  uv_close((uv_handle_t *)&s->watch_debounce, NULL);
  unwatch_all(s);
  wxd_reload_close_admin(s);
}

void wxd_reload_close_admin(wxd_server_t *s) {
  while (s->admin_conns) admin_close(s->admin_conns);
  if (s->admin_open) {
    uv_close((uv_handle_t *)&s->admin, NULL);
    s->admin_open = 0;
  }
}
