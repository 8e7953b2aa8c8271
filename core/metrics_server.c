/* metrics_server: the server's own state as Prometheus metrics (GET
 * /metrics on the admin listener): what workers, reloads and shared
 * dictionaries already keep is read at scrape time, then the registry of
 * metrics.c (requests, app and library metrics) follows. Runs on the main
 * thread; reads worker counters with relaxed atomic loads.
 */
#include <stdio.h>
#include <string.h>

#include "breaker.h"
#include "metrics.h"
#include "server.h"
#include "shdict.h"
#include "ws.h"

static void put(wxd_buf_t *b, const char *s) { wxd_buf_append(b, s, strlen(s)); }

static void family(wxd_buf_t *b, const char *name, const char *type, const char *help) {
  char tmp[512];
  snprintf(tmp, sizeof tmp, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
  put(b, tmp);
}

/* Values are counts and ratios of thousandths: %.15g writes them exactly
 * (0.02, not 0.020000000000000000416). */
static void sample(wxd_buf_t *b, const char *name, const char *labels, double v) {
  char tmp[512];
  snprintf(tmp, sizeof tmp, "%s%s %.15g\n", name, labels, v);
  put(b, tmp);
}

typedef struct {
  wxd_buf_t *b;
  int field;
} dict_walk_t;

static void dict_sample(void *arg, const wxd_shdict_usage_t *u) {
  dict_walk_t *dw = arg;
  static const char *const names[] = {"wxd_shdict_capacity_bytes", "wxd_shdict_used_bytes", "wxd_shdict_items",
                                      "wxd_shdict_evictions_total", "wxd_shdict_expired_total"};
  double v[] = {(double)u->capacity, (double)u->used, (double)u->count, (double)u->evictions, (double)u->expired};
  char labels[128];
  /* Dictionary names are identifiers (config checks them). */
  snprintf(labels, sizeof labels, "{dict=\"%s\"}", u->name);
  sample(dw->b, names[dw->field], labels, v[dw->field]);
}

typedef struct {
  wxd_buf_t *b;
  int field;
} breaker_walk_t;

/* name{breaker="NAME",<extra>} v */
static void breaker_line(wxd_buf_t *b, const char *name, const char *breaker, const char *extra, double v) {
  put(b, name);
  put(b, "{breaker=\"");
  wxd_metrics_put_label(b, breaker, strlen(breaker));
  put(b, "\",");
  put(b, extra);
  char tmp[64];
  snprintf(tmp, sizeof tmp, "} %.15g\n", v);
  put(b, tmp);
}

static void breaker_sample(void *arg, const wxd_breaker_usage_t *u) {
  breaker_walk_t *bw = arg;
  wxd_buf_t *b = bw->b;
  switch (bw->field) {
  case 0:
    breaker_line(b, "wxd_breaker_state", u->name, "state=\"closed\"", strcmp(u->state, "closed") == 0);
    breaker_line(b, "wxd_breaker_state", u->name, "state=\"open\"", strcmp(u->state, "open") == 0);
    breaker_line(b, "wxd_breaker_state", u->name, "state=\"half_open\"", strcmp(u->state, "half_open") == 0);
    break;
  case 1:
    breaker_line(b, "wxd_breaker_calls_total", u->name, "result=\"success\"", u->successes);
    breaker_line(b, "wxd_breaker_calls_total", u->name, "result=\"failure\"", u->failures);
    breaker_line(b, "wxd_breaker_calls_total", u->name, "result=\"rejected\"", u->rejected);
    break;
  case 2:
    breaker_line(b, "wxd_breaker_transitions_total", u->name, "to=\"open\"", u->opened);
    breaker_line(b, "wxd_breaker_transitions_total", u->name, "to=\"half_open\"", u->half_opened);
    breaker_line(b, "wxd_breaker_transitions_total", u->name, "to=\"closed\"", u->closed);
    break;
  default:
    breaker_line(b, "wxd_breaker_retries_total", u->name, "result=\"allowed\"", u->retries);
    breaker_line(b, "wxd_breaker_retries_total", u->name, "result=\"denied\"", u->retries_denied);
  }
}

/* Breakers (breaker.c) and WebSocket publishes dropped (wstopic.c): state
 * kept in the core, read at scrape time. */
static void render_breakers_ws(struct wxd_server *s, wxd_buf_t *b) {
  static const char *const breaker_families[][3] = {
      {"wxd_breaker_state", "gauge", "Circuit breaker state: 1 for the state it is in"},
      {"wxd_breaker_calls_total", "counter", "Calls through a breaker: succeeded, failed, or rejected while open"},
      {"wxd_breaker_transitions_total", "counter", "Circuit breaker state changes, by the state entered"},
      {"wxd_breaker_retries_total", "counter", "Retries through a breaker: allowed or denied by its retry budget"}};
  for (int f = 0; f < 4; f++) {
    family(b, breaker_families[f][0], breaker_families[f][1], breaker_families[f][2]);
    breaker_walk_t bw = {b, f};
    wxd_breaker_each(breaker_sample, &bw);
  }
  char labels[64];
  family(b, "wxd_ws_publish_dropped_total", "counter",
         "WebSocket publishes dropped for a worker whose queue of undelivered publishes was full");
  for (int i = 0; i < s->n; i++) {
    snprintf(labels, sizeof labels, "{worker=\"%d\"}", i);
    sample(b, "wxd_ws_publish_dropped_total", labels, (double)wxd_ws_topics_dropped(s->ws_topics, i));
  }
}

void wxd_metrics_render_server(struct wxd_server *s, wxd_buf_t *b) {
  char labels[64];
  family(b, "wxd_workers", "gauge", "Worker threads");
  sample(b, "wxd_workers", "", s->n);
  family(b, "wxd_connections", "gauge", "Open client connections, by worker");
  for (int i = 0; i < s->n; i++) {
    snprintf(labels, sizeof labels, "{worker=\"%d\"}", i);
    sample(b, "wxd_connections", labels, atomic_load_explicit(&s->workers[i].stats.connections, memory_order_relaxed));
  }
  family(b, "wxd_worker_busy_ratio", "gauge", "Share of the last second a worker's loop was not idle");
  for (int i = 0; i < s->n; i++) {
    snprintf(labels, sizeof labels, "{worker=\"%d\"}", i);
    sample(b, "wxd_worker_busy_ratio", labels,
           atomic_load_explicit(&s->workers[i].stats.busy_permille, memory_order_relaxed) / 1000.0);
  }
  family(b, "wxd_http_requests_in_flight", "gauge", "Requests in their handler now");
  unsigned in_flight = 0;
  for (int i = 0; i < s->n; i++) in_flight += atomic_load_explicit(&s->workers[i].stats.in_flight, memory_order_relaxed);
  sample(b, "wxd_http_requests_in_flight", "", in_flight);
  family(b, "wxd_retired_generations", "gauge", "Replaced app generations still finishing requests");
  unsigned retired = 0;
  for (int i = 0; i < s->n; i++) retired += atomic_load_explicit(&s->workers[i].stats.retired, memory_order_relaxed);
  sample(b, "wxd_retired_generations", "", retired);
  wxd_reload_state_t *rs = &s->reload;
  pthread_mutex_lock(&rs->mu);
  unsigned gen = rs->generation, ok = rs->succeeded, failed = rs->failed;
  pthread_mutex_unlock(&rs->mu);
  family(b, "wxd_generation", "gauge", "The app generation serving now (1 at start, +1 per reload)");
  sample(b, "wxd_generation", "", gen);
  family(b, "wxd_reloads_total", "counter", "Hot reloads, by result");
  sample(b, "wxd_reloads_total", "{result=\"succeeded\"}", ok);
  sample(b, "wxd_reloads_total", "{result=\"failed\"}", failed);
  static const char *const dict_families[][2] = {
      {"wxd_shdict_capacity_bytes", "Capacity of a shared dictionary"},
      {"wxd_shdict_used_bytes", "Bytes a shared dictionary's entries take"},
      {"wxd_shdict_items", "Entries in a shared dictionary"},
      {"wxd_shdict_evictions_total", "Live entries dropped to make room"},
      {"wxd_shdict_expired_total", "Expired entries reclaimed"}};
  for (int f = 0; f < 5; f++) {
    family(b, dict_families[f][0], f >= 3 ? "counter" : "gauge", dict_families[f][1]);
    dict_walk_t dw = {b, f};
    wxd_shdict_registry_each(s->shdicts, dict_sample, &dw);
  }
  render_breakers_ws(s, b);
  wxd_metrics_render(b);
}
