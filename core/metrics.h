/* metrics: Prometheus counters, gauges and histograms shared by every worker.
 *
 * A metric family (name, help, type, label names, buckets) has series, one
 * per set of label values; each series owns a few numeric slots. Every
 * writer (each worker thread, plus one for other threads and one for shared
 * gauges) has its own array of slots: a worker adds to its own with a
 * relaxed load and store (it is the only writer), so the hot path takes no
 * lock and shares no cache line. A scrape sums the arrays (relaxed loads)
 * under the registry mutex, which is otherwise taken only to create a
 * family or a series (callers cache the slot they get).
 *
 * Histograms keep a count per bucket (not cumulative) and a sum; the
 * exposition makes the buckets cumulative, so a scrape that races with
 * observations still shows non-decreasing buckets and _count == +Inf.
 */
#ifndef WXD_METRICS_H
#define WXD_METRICS_H

#include <lua.h>
#include <stddef.h>

#include "buf.h"

enum { WXD_METRIC_COUNTER = 0, WXD_METRIC_GAUGE, WXD_METRIC_HISTOGRAM };

#define WXD_METRICS_MAX_LABELS 8
#define WXD_METRICS_MAX_BUCKETS 32
#define WXD_METRICS_DEFAULT_SERIES 1000 /* label sets per family unless told */

/* Sets up the registry for nworkers worker threads. Called by the server
 * before its workers start; other processes (wxd script) get a registry
 * with no worker writers on first use. enabled 0 (config metrics = false):
 * the core counts no requests (its callers check cfg->metrics), and the
 * library's modules see wxd.core.metrics.enabled false and count nothing. */
void wxd_metrics_init(int nworkers, int enabled);

/* The writer index of worker `worker` (-1: any other thread). */
int wxd_metrics_writer(int worker);

/* Declares a family, or finds the one declared with the same name. Returns
 * its id, or -1 with err set (bad name or labels, or the name declared
 * before with a different type, labels or buckets). */
int wxd_metrics_family(const char *name, const char *help, int type, int nlabels, const char *const *labels,
                       int nbuckets, const double *buckets, unsigned max_series, char *err, size_t errlen);

/* The first slot of the series of `family` with these label values (one per
 * label name, lens[i] bytes each), created on first use. Returns -1 with err
 * set past the family's series limit ("cardinality") or out of slots. */
int wxd_metrics_series(int family, const char *const *values, const size_t *lens, char *err, size_t errlen);

/* Hot path. `writer` must be the calling thread's own writer index, except
 * that any thread may use the shared writer (wxd_metrics_add_shared). */
void wxd_metrics_add(int writer, int slot, double v);
void wxd_metrics_observe(int writer, int family, int slot, double v);
/* Gauges set as one value for the whole process (atomic, any thread). */
void wxd_metrics_set_shared(int slot, double v);
void wxd_metrics_add_shared(int slot, double v);
/* The sum of a slot over every writer (tests, Lua's m:value()). */
double wxd_metrics_value(int slot);

/* Appends every family in text exposition format 0.0.4. */
void wxd_metrics_render(wxd_buf_t *out);
/* Appends a label value as the exposition quotes it (\\, \" and \n
 * escaped; a byte of invalid UTF-8 becomes '?'), for renderers of state kept
 * elsewhere (metrics_server.c). */
void wxd_metrics_put_label(wxd_buf_t *b, const char *s, size_t n);

/* ---- the core's own request metrics (core/http*.c) ---- */

/* A request ended: counts it by route pattern (NULL: "unmatched"),
 * method and status class, and observes its duration. */
void wxd_metrics_request(int worker, const char *route, size_t route_len, const char *method, int status,
                         double seconds);
/* Requests in their handler are the workers' stats.in_flight (server.h),
 * kept next to the request counter the worker writes anyway, and shown by
 * metrics_server.c. */

/* Everything GET /metrics shows: the server's state (metrics_server.c),
 * then the registry. Main thread. */
struct wxd_server;
void wxd_metrics_render_server(struct wxd_server *s, wxd_buf_t *out);

/* Lua module wxd.core.metrics. */
int wxd_open_metrics(lua_State *L);

#endif
