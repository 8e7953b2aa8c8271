/* metrics: see metrics.h. */
#include "metrics.h"

#include <lauxlib.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vm.h"

#define PAGE_SLOTS 1024
#define MAX_PAGES 256 /* 262144 slots per writer at most */
#define MAX_FAMILIES 512
#define MAX_LABEL_VALUE 256
#define ROUTE_CACHE 256 /* per worker: distinct (route, method, status class) */
#define ROUTE_MAX 96

typedef _Atomic uint64_t slot_t;

typedef struct family {
  char name[128];
  char *help;
  int type;
  int nlabels;
  char labels[WXD_METRICS_MAX_LABELS][64];
  int nbuckets; /* finite bounds; +Inf is implied */
  double buckets[WXD_METRICS_MAX_BUCKETS];
  int width;    /* slots per series */
  unsigned max_series;
  int *series;  /* indexes into R.series, in creation order */
  unsigned nseries, cap;
} family_t;

typedef struct series {
  int family;
  int slot;
  uint64_t hash;
  char *key; /* label values, each as a 2-byte length and the bytes */
  size_t keylen;
  int next;  /* hash chain */
} series_t;

typedef struct route_entry {
  uint64_t hash;
  int used;
  int cls;
  int worker;
  const char *method;
  char route[ROUTE_MAX];
  size_t rlen;
  int count_slot, hist_slot;
  slot_t *count, *hist; /* the worker's own slots of the two series (NULL: none) */
} route_entry_t;

/* The registry; every field is guarded by mu, except what the hot path
 * reads: pages[] entries and fam[] entries, which are written (under mu)
 * before any slot or family id that leads to them is handed out. */
static struct {
  pthread_mutex_t mu;
  int ready;
  int nworkers, nwriters; /* writers: "other threads", shared, then the workers */
  slot_t **pages;         /* [writer * MAX_PAGES + page] */
  int nslots;
  family_t *fam[MAX_FAMILIES];
  int nfam;
  series_t *series;
  int nseries, cap;
  int *heads;
  unsigned nheads; /* a power of two */
  int fam_requests, fam_duration;
  route_entry_t *routes; /* [worker * ROUTE_CACHE]: touched only by that worker */
  int off;                /* config metrics = false: set before the workers start */
} R = {.mu = PTHREAD_MUTEX_INITIALIZER};

static inline double bits_double(uint64_t b) {
  double d;
  memcpy(&d, &b, sizeof d);
  return d;
}

static inline uint64_t double_bits(double d) {
  uint64_t b;
  memcpy(&b, &d, sizeof b);
  return b;
}

static inline slot_t *slot_ptr(int writer, int slot) {
  return &R.pages[writer * MAX_PAGES + slot / PAGE_SLOTS][slot % PAGE_SLOTS];
}

static uint64_t hash_bytes(uint64_t h, const void *p, size_t n) {
  const unsigned char *s = p;
  for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 1099511628211ull; /* FNV-1a */
  return h;
}


/* ---- registry (under R.mu) ---- */

static int name_ok(const char *s, int metric) {
  size_t n = strlen(s);
  if (n == 0 || n >= (metric ? 128 : 64)) return 0;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (metric && c == ':') ||
             (i > 0 && c >= '0' && c <= '9');
    if (!ok) return 0;
  }
  return metric || strncmp(s, "__", 2) != 0;
}

static int find_family_locked(const char *name) {
  for (int i = 0; i < R.nfam; i++)
    if (strcmp(R.fam[i]->name, name) == 0) return i;
  return -1;
}

static int same_shape(const family_t *f, int type, int nlabels, const char *const *labels, int nbuckets,
                      const double *buckets) {
  if (f->type != type || f->nlabels != nlabels || f->nbuckets != nbuckets) return 0;
  for (int i = 0; i < nlabels; i++)
    if (strcmp(f->labels[i], labels[i]) != 0) return 0;
  for (int i = 0; i < nbuckets; i++)
    if (f->buckets[i] != buckets[i]) return 0;
  return 1;
}

static int family_locked(const char *name, const char *help, int type, int nlabels, const char *const *labels,
                         int nbuckets, const double *buckets, unsigned max_series, char *err, size_t errlen) {
  if (!name_ok(name, 1)) {
    snprintf(err, errlen, "invalid metric name \"%.128s\" (letters, digits, '_' and ':')", name);
    return -1;
  }
  if (type < 0 || type > WXD_METRIC_HISTOGRAM) {
    snprintf(err, errlen, "%s: unknown metric type", name);
    return -1;
  }
  if (nlabels < 0 || nlabels > WXD_METRICS_MAX_LABELS) {
    snprintf(err, errlen, "%s: at most %d labels", name, WXD_METRICS_MAX_LABELS);
    return -1;
  }
  for (int i = 0; i < nlabels; i++) {
    if (!name_ok(labels[i], 0) || (type == WXD_METRIC_HISTOGRAM && strcmp(labels[i], "le") == 0)) {
      snprintf(err, errlen, "%s: invalid label name \"%.64s\"", name, labels[i]);
      return -1;
    }
    for (int j = 0; j < i; j++)
      if (strcmp(labels[i], labels[j]) == 0) {
        snprintf(err, errlen, "%s: label \"%s\" appears twice", name, labels[i]);
        return -1;
      }
  }
  if (type != WXD_METRIC_HISTOGRAM) nbuckets = 0;
  if (nbuckets < 0 || nbuckets > WXD_METRICS_MAX_BUCKETS) {
    snprintf(err, errlen, "%s: at most %d buckets", name, WXD_METRICS_MAX_BUCKETS);
    return -1;
  }
  for (int i = 0; i < nbuckets; i++)
    if (!isfinite(buckets[i]) || (i > 0 && buckets[i] <= buckets[i - 1])) {
      snprintf(err, errlen, "%s: buckets must be finite and increasing", name);
      return -1;
    }
  int id = find_family_locked(name);
  if (id >= 0) {
    if (same_shape(R.fam[id], type, nlabels, labels, nbuckets, buckets)) return id;
    snprintf(err, errlen, "%s: declared before with a different type, labels or buckets", name);
    return -1;
  }
  if (R.nfam >= MAX_FAMILIES) {
    snprintf(err, errlen, "%s: too many metrics (at most %d)", name, MAX_FAMILIES);
    return -1;
  }
  family_t *f = calloc(1, sizeof *f);
  if (!f || !(f->help = strdup(help ? help : ""))) {
    free(f);
    snprintf(err, errlen, "out of memory");
    return -1;
  }
  snprintf(f->name, sizeof f->name, "%s", name);
  f->type = type;
  f->nlabels = nlabels;
  for (int i = 0; i < nlabels; i++) snprintf(f->labels[i], sizeof f->labels[i], "%s", labels[i]);
  f->nbuckets = nbuckets;
  if (nbuckets) memcpy(f->buckets, buckets, sizeof(double) * (size_t)nbuckets);
  f->width = type == WXD_METRIC_HISTOGRAM ? nbuckets + 2 : 1; /* buckets, +Inf, sum */
  f->max_series = max_series ? max_series : WXD_METRICS_DEFAULT_SERIES;
  R.fam[R.nfam] = f;
  return R.nfam++;
}

/* Valid UTF-8: what a scraper can read back (\\, \" and \n are escaped). */
static int label_value_ok(const unsigned char *s, size_t n) {
  size_t i = 0;
  while (i < n) {
    unsigned char c = s[i];
    if (c < 0x80) {
      i++;
      continue;
    }
    size_t need = c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3 : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
    if (!need || i + need > n) return 0;
    unsigned char lo = 0x80, hi = 0xbf;
    if (c == 0xe0) lo = 0xa0;
    else if (c == 0xed) hi = 0x9f;
    else if (c == 0xf0) lo = 0x90;
    else if (c == 0xf4) hi = 0x8f;
    if (s[i + 1] < lo || s[i + 1] > hi) return 0;
    for (size_t k = 2; k < need; k++)
      if (s[i + k] < 0x80 || s[i + k] > 0xbf) return 0;
    i += need;
  }
  return 1;
}

/* Makes room for `width` more slots in every writer's array. A series
 * never straddles two pages, so a pointer to its first slot reaches all of
 * them (the core's request metrics keep such pointers). */
static int grow_slots_locked(int width) {
  int first = R.nslots;
  if (first / PAGE_SLOTS != (first + width - 1) / PAGE_SLOTS) first = (first / PAGE_SLOTS + 1) * PAGE_SLOTS;
  int last = first + width - 1;
  if (last / PAGE_SLOTS >= MAX_PAGES) return -1;
  for (int pg = first / PAGE_SLOTS; pg <= last / PAGE_SLOTS; pg++) {
    if (R.pages[pg]) continue; /* writer 0's page exists: all do */
    for (int w = R.nwriters - 1; w >= 0; w--) {
      slot_t *p = calloc(PAGE_SLOTS, sizeof *p);
      if (!p) return -1; /* pages made so far stay: they are filled later */
      R.pages[w * MAX_PAGES + pg] = p;
    }
  }
  R.nslots = first + width;
  return first;
}

static int series_locked(int fid, const char *const *values, const size_t *lens, char *err, size_t errlen) {
  family_t *f = R.fam[fid];
  char key[WXD_METRICS_MAX_LABELS * (MAX_LABEL_VALUE + 2)];
  size_t kl = 0;
  for (int i = 0; i < f->nlabels; i++) {
    if (lens[i] > MAX_LABEL_VALUE) {
      snprintf(err, errlen, "%s: label %s: value longer than %d bytes", f->name, f->labels[i], MAX_LABEL_VALUE);
      return -1;
    }
    if (!label_value_ok((const unsigned char *)values[i], lens[i])) {
      snprintf(err, errlen, "%s: label %s: value is not valid UTF-8", f->name, f->labels[i]);
      return -1;
    }
    key[kl++] = (char)(lens[i] >> 8);
    key[kl++] = (char)(lens[i] & 0xff);
    memcpy(key + kl, values[i], lens[i]);
    kl += lens[i];
  }
  uint64_t h = hash_bytes(hash_bytes(1469598103934665603ull, &fid, sizeof fid), key, kl);
  for (int i = R.heads[h & (R.nheads - 1)]; i >= 0; i = R.series[i].next) {
    series_t *s = &R.series[i];
    if (s->hash == h && s->family == fid && s->keylen == kl && memcmp(s->key, key, kl) == 0) return s->slot;
  }
  if (f->nseries >= f->max_series) {
    snprintf(err, errlen, "%s: more than %u label sets (cardinality limit)", f->name, f->max_series);
    return -1;
  }
  if (f->nseries == f->cap) {
    unsigned cap = f->cap ? f->cap * 2 : 8;
    int *p = realloc(f->series, cap * sizeof *p);
    if (!p) goto oom;
    f->series = p;
    f->cap = cap;
  }
  if (R.nseries == R.cap) {
    int cap = R.cap ? R.cap * 2 : 256;
    series_t *p = realloc(R.series, (size_t)cap * sizeof *p);
    if (!p) goto oom;
    R.series = p;
    R.cap = cap;
  }
  if ((unsigned)R.nseries >= R.nheads) { /* load factor 1: rehash into twice the heads */
    unsigned nh = R.nheads * 2;
    int *heads = malloc(nh * sizeof *heads);
    if (!heads) goto oom;
    for (unsigned i = 0; i < nh; i++) heads[i] = -1;
    for (int i = 0; i < R.nseries; i++) {
      unsigned b = (unsigned)(R.series[i].hash & (nh - 1));
      R.series[i].next = heads[b];
      heads[b] = i;
    }
    free(R.heads);
    R.heads = heads;
    R.nheads = nh;
  }
  char *kc = malloc(kl ? kl : 1);
  if (!kc) goto oom;
  int slot = grow_slots_locked(f->width);
  if (slot < 0) {
    free(kc);
    snprintf(err, errlen, "%s: out of metric slots", f->name);
    return -1;
  }
  memcpy(kc, key, kl);
  series_t *s = &R.series[R.nseries];
  *s = (series_t){.family = fid, .slot = slot, .hash = h, .key = kc, .keylen = kl};
  s->next = R.heads[h & (R.nheads - 1)];
  R.heads[h & (R.nheads - 1)] = R.nseries;
  f->series[f->nseries++] = R.nseries++;
  return slot;
oom:
  snprintf(err, errlen, "out of memory");
  return -1;
}

static const double DURATION_BUCKETS[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};

#define WRITER_OTHER 0
#define WRITER_SHARED 1
#define WRITER_WORKER0 2

static void out_of_memory(void) {
  fprintf(stderr, "wxd: out of memory (metrics)\n");
  abort();
}

/* Workers are added before their threads start (only the main thread
 * runs then), after a VM of the main thread may have made the registry. */
static void add_workers_locked(int nworkers) {
  if (nworkers <= R.nworkers) return;
  int old = R.nwriters;
  slot_t **pages = realloc(R.pages, (size_t)(nworkers + 2) * MAX_PAGES * sizeof *pages);
  route_entry_t *routes = calloc((size_t)nworkers * ROUTE_CACHE, sizeof *routes);
  if (!pages || !routes) out_of_memory();
  memset(pages + (size_t)old * MAX_PAGES, 0, (size_t)(nworkers + 2 - old) * MAX_PAGES * sizeof *pages);
  for (int w = old; w < nworkers + 2; w++)
    for (int pg = 0; pg < MAX_PAGES && pages[pg]; pg++)
      if (!(pages[w * MAX_PAGES + pg] = calloc(PAGE_SLOTS, sizeof(slot_t)))) out_of_memory();
  free(R.routes);
  R.pages = pages;
  R.routes = routes;
  R.nworkers = nworkers;
  R.nwriters = nworkers + 2;
}

static void init_locked(int nworkers) {
  if (R.ready) {
    add_workers_locked(nworkers);
    return;
  }
  R.nworkers = 0;
  R.nwriters = 2;
  R.pages = calloc((size_t)R.nwriters * MAX_PAGES, sizeof *R.pages);
  R.nheads = 256;
  R.heads = malloc(R.nheads * sizeof *R.heads);
  if (!R.pages || !R.heads) out_of_memory();
  add_workers_locked(nworkers);
  for (unsigned i = 0; i < R.nheads; i++) R.heads[i] = -1;
  R.ready = 1;
  char err[256];
  static const char *const req_labels[] = {"route", "method", "status"};
  R.fam_requests = family_locked("wxd_http_requests_total",
                                 "HTTP requests answered, by route pattern, method and status class", WXD_METRIC_COUNTER,
                                 3, req_labels, 0, NULL, 2000, err, sizeof err);
  R.fam_duration = family_locked("wxd_http_request_duration_seconds",
                                 "Time from a request's first byte to its response, by route pattern",
                                 WXD_METRIC_HISTOGRAM, 1, req_labels, 11, DURATION_BUCKETS, 500, err, sizeof err);
}

void wxd_metrics_init(int nworkers, int enabled) {
  pthread_mutex_lock(&R.mu);
  R.off = !enabled;
  init_locked(nworkers);
  pthread_mutex_unlock(&R.mu);
}

int wxd_metrics_writer(int worker) {
  pthread_mutex_lock(&R.mu);
  if (!R.ready) init_locked(0);
  int n = R.nworkers;
  pthread_mutex_unlock(&R.mu);
  return worker >= 0 && worker < n ? WRITER_WORKER0 + worker : WRITER_OTHER;
}

int wxd_metrics_family(const char *name, const char *help, int type, int nlabels, const char *const *labels,
                       int nbuckets, const double *buckets, unsigned max_series, char *err, size_t errlen) {
  pthread_mutex_lock(&R.mu);
  if (!R.ready) init_locked(0);
  int id = family_locked(name, help, type, nlabels, labels, nbuckets, buckets, max_series, err, errlen);
  pthread_mutex_unlock(&R.mu);
  return id;
}

int wxd_metrics_series(int family, const char *const *values, const size_t *lens, char *err, size_t errlen) {
  pthread_mutex_lock(&R.mu);
  int slot = family >= 0 && family < R.nfam ? series_locked(family, values, lens, err, errlen) : -1;
  pthread_mutex_unlock(&R.mu);
  return slot;
}

/* ---- hot path ---- */

static inline void cas_add(slot_t *p, double v) {
  uint64_t old = atomic_load_explicit(p, memory_order_relaxed);
  while (!atomic_compare_exchange_weak_explicit(p, &old, double_bits(bits_double(old) + v), memory_order_relaxed,
                                                memory_order_relaxed)) {
  }
}

/* A slot of the calling worker's own array: it is the only writer, so no
 * read-modify-write is needed. */
static inline void own_add(slot_t *p, double v) {
  atomic_store_explicit(p, double_bits(bits_double(atomic_load_explicit(p, memory_order_relaxed)) + v),
                        memory_order_relaxed);
}

static inline void add(int writer, int slot, double v) {
  slot_t *p = slot_ptr(writer, slot);
  if (writer >= WRITER_WORKER0) own_add(p, v);
  else cas_add(p, v);
}

static inline void observe(int writer, int family, int slot, double v) {
  const family_t *f = R.fam[family];
  int i = 0;
  while (i < f->nbuckets && v > f->buckets[i]) i++;
  add(writer, slot + i, 1);
  add(writer, slot + f->nbuckets + 1, v);
}

void wxd_metrics_add(int writer, int slot, double v) { add(writer, slot, v); }

void wxd_metrics_observe(int writer, int family, int slot, double v) { observe(writer, family, slot, v); }

void wxd_metrics_set_shared(int slot, double v) {
  atomic_store_explicit(slot_ptr(WRITER_SHARED, slot), double_bits(v), memory_order_relaxed);
}

void wxd_metrics_add_shared(int slot, double v) { cas_add(slot_ptr(WRITER_SHARED, slot), v); }

static double sum_slot(int slot) {
  double s = 0;
  for (int w = 0; w < R.nwriters; w++) s += bits_double(atomic_load_explicit(slot_ptr(w, slot), memory_order_relaxed));
  return s;
}

double wxd_metrics_value(int slot) {
  pthread_mutex_lock(&R.mu);
  double v = slot >= 0 && slot < R.nslots ? sum_slot(slot) : 0;
  pthread_mutex_unlock(&R.mu);
  return v;
}

/* ---- the core's request metrics ---- */

static int request_series(const char *route, size_t rl, const char *method, int cls, int *hist) {
  static const char *const classes[] = {"1xx", "2xx", "3xx", "4xx", "5xx", "other"};
  char err[256];
  const char *v[3] = {route, method, classes[cls]};
  size_t l[3] = {rl, strlen(method), strlen(classes[cls])};
  pthread_mutex_lock(&R.mu);
  int slot = series_locked(R.fam_requests, v, l, err, sizeof err);
  *hist = series_locked(R.fam_duration, v, l, err, sizeof err);
  if (slot < 0 || *hist < 0) { /* past the limit: one catch-all route */
    v[0] = "other";
    l[0] = 5;
    if (slot < 0) slot = series_locked(R.fam_requests, v, l, err, sizeof err);
    if (*hist < 0) *hist = series_locked(R.fam_duration, v, l, err, sizeof err);
  }
  pthread_mutex_unlock(&R.mu);
  return slot;
}

/* Each worker's last hit in its route cache: traffic mostly repeats a few
 * routes, and a hit costs no hashing. Only that worker's thread uses it. */
static _Thread_local route_entry_t *last_hit;

void wxd_metrics_request(int worker, const char *route, size_t rl, const char *method, int status, double seconds) {
  if (!route) {
    route = "unmatched";
    rl = 9;
  }
  int cls = status >= 100 && status < 600 ? status / 100 - 1 : 5;
  int hist = -1, slot = -1;
  route_entry_t *e = last_hit;
  /* method names are llhttp's static strings: the same method, the same pointer */
  if (e && e->method == method && e->cls == cls && e->rlen == rl && e->worker == worker &&
      memcmp(e->route, route, rl) == 0) {
    own_add(e->count, 1);
    const family_t *f = R.fam[R.fam_duration];
    int i = 0;
    while (i < f->nbuckets && seconds > f->buckets[i]) i++;
    own_add(e->hist + i, 1);
    own_add(e->hist + f->nbuckets + 1, seconds);
    return;
  }
  e = NULL;
  if (worker >= 0 && worker < R.nworkers && rl < ROUTE_MAX) {
    uint64_t h = hash_bytes(hash_bytes(hash_bytes(1469598103934665603ull, route, rl), method, strlen(method)),
                            &cls, sizeof cls);
    route_entry_t *tab = R.routes + (size_t)worker * ROUTE_CACHE;
    for (unsigned probe = 0; probe < 8; probe++) {
      route_entry_t *c = &tab[(h + probe) & (ROUTE_CACHE - 1)];
      if (!c->used) {
        e = c;
        break;
      }
      if (c->hash == h && c->cls == cls && c->rlen == rl && memcmp(c->route, route, rl) == 0 &&
          strcmp(c->method, method) == 0) {
        slot = c->count_slot;
        hist = c->hist_slot;
        if (c->count && c->hist) last_hit = c;
        break;
      }
    }
    if (slot < 0 && e) {
      slot = request_series(route, rl, method, cls, &hist);
      int writer = WRITER_WORKER0 + worker;
      *e = (route_entry_t){.hash = h, .used = 1, .cls = cls, .worker = worker, .method = method, .rlen = rl,
                           .count_slot = slot, .hist_slot = hist,
                           .count = slot >= 0 ? slot_ptr(writer, slot) : NULL,
                           .hist = hist >= 0 ? slot_ptr(writer, hist) : NULL};
      memcpy(e->route, route, rl);
    }
  }
  if (slot < 0 && !e) slot = request_series(route, rl, method, cls, &hist);
  /* Workers' ids are below nworkers (fixed once they run). */
  int writer = worker >= 0 && worker < R.nworkers ? WRITER_WORKER0 + worker : WRITER_OTHER;
  if (slot >= 0) add(writer, slot, 1);
  if (hist >= 0) observe(writer, R.fam_duration, hist, seconds);
}


/* ---- exposition ---- */

static void put(wxd_buf_t *b, const char *s, size_t n) { wxd_buf_append(b, s, n); }
static void puts_(wxd_buf_t *b, const char *s) { wxd_buf_append(b, s, strlen(s)); }

static void put_escaped(wxd_buf_t *b, const char *s, size_t n, int quote) {
  size_t start = 0;
  for (size_t i = 0; i < n; i++) {
    const char *rep = s[i] == '\\' ? "\\\\" : s[i] == '\n' ? "\\n" : (quote && s[i] == '"') ? "\\\"" : NULL;
    if (!rep) continue;
    put(b, s + start, i - start);
    puts_(b, rep);
    start = i + 1;
  }
  put(b, s + start, n - start);
}

void wxd_metrics_put_label(wxd_buf_t *b, const char *s, size_t n) {
  if (label_value_ok((const unsigned char *)s, n)) {
    put_escaped(b, s, n, 1);
    return;
  }
  for (size_t i = 0; i < n; i++) {
    char c = (unsigned char)s[i] >= 0x80 ? '?' : s[i];
    put_escaped(b, &c, 1, 1);
  }
}

/* The shortest of %.15g and %.17g that reads back as v: 0.1, not 0.10000000000000001. */
static void fmt_shortest(char *tmp, size_t cap, double v) {
  snprintf(tmp, cap, "%.15g", v);
  if (strtod(tmp, NULL) != v) snprintf(tmp, cap, "%.17g", v);
}

static void put_number(wxd_buf_t *b, double v) {
  char tmp[64];
  if (isnan(v)) snprintf(tmp, sizeof tmp, "NaN");
  else if (isinf(v)) snprintf(tmp, sizeof tmp, v > 0 ? "+Inf" : "-Inf");
  else fmt_shortest(tmp, sizeof tmp, v);
  puts_(b, tmp);
}

/* name{labels[,le="x"]} */
static void put_sample(wxd_buf_t *b, const family_t *f, const char *suffix, const series_t *s, const char *le) {
  puts_(b, f->name);
  puts_(b, suffix);
  if (f->nlabels == 0 && !le) return;
  put(b, "{", 1);
  size_t k = 0;
  for (int i = 0; i < f->nlabels; i++) {
    size_t n = ((size_t)(unsigned char)s->key[k] << 8) | (unsigned char)s->key[k + 1];
    if (i) put(b, ",", 1);
    puts_(b, f->labels[i]);
    put(b, "=\"", 2);
    put_escaped(b, s->key + k + 2, n, 1);
    put(b, "\"", 1);
    k += 2 + n;
  }
  if (le) {
    if (f->nlabels) put(b, ",", 1);
    puts_(b, "le=\"");
    puts_(b, le);
    put(b, "\"", 1);
  }
  put(b, "}", 1);
}

void wxd_metrics_render(wxd_buf_t *b) {
  static const char *const types[] = {"counter", "gauge", "histogram"};
  pthread_mutex_lock(&R.mu);
  if (!R.ready) init_locked(0);
  for (int fi = 0; fi < R.nfam; fi++) {
    const family_t *f = R.fam[fi];
    puts_(b, "# HELP ");
    puts_(b, f->name);
    put(b, " ", 1);
    put_escaped(b, f->help, strlen(f->help), 0);
    puts_(b, "\n# TYPE ");
    puts_(b, f->name);
    put(b, " ", 1);
    puts_(b, types[f->type]);
    put(b, "\n", 1);
    for (unsigned si = 0; si < f->nseries; si++) {
      const series_t *s = &R.series[f->series[si]];
      if (f->type != WXD_METRIC_HISTOGRAM) {
        put_sample(b, f, "", s, NULL);
        put(b, " ", 1);
        put_number(b, sum_slot(s->slot));
        put(b, "\n", 1);
        continue;
      }
      double cum = 0;
      for (int i = 0; i <= f->nbuckets; i++) {
        char le[64];
        if (i < f->nbuckets) fmt_shortest(le, sizeof le, f->buckets[i]);
        else snprintf(le, sizeof le, "+Inf");
        cum += sum_slot(s->slot + i);
        put_sample(b, f, "_bucket", s, le);
        put(b, " ", 1);
        put_number(b, cum);
        put(b, "\n", 1);
      }
      put_sample(b, f, "_sum", s, NULL);
      put(b, " ", 1);
      put_number(b, sum_slot(s->slot + f->nbuckets + 1));
      put(b, "\n", 1);
      put_sample(b, f, "_count", s, NULL);
      put(b, " ", 1);
      put_number(b, cum);
      put(b, "\n", 1);
    }
  }
  pthread_mutex_unlock(&R.mu);
}

/* ---- Lua: wxd.core.metrics ---- */

static int writer_of(lua_State *L) { return (int)lua_tointeger(L, lua_upvalueindex(1)); }

static int check_slot(lua_State *L, int idx) {
  lua_Integer s = luaL_checkinteger(L, idx);
  if (s < 0 || s >= R.nslots) luaL_argerror(L, idx, "not a metric slot"); /* nslots only grows */
  return (int)s;
}

/* family(name, help, type, labels, buckets|nil, max_series|nil) -> id; raises */
static int l_family(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  const char *help = luaL_optstring(L, 2, "");
  const char *type = luaL_checkstring(L, 3);
  int t = strcmp(type, "counter") == 0 ? WXD_METRIC_COUNTER
          : strcmp(type, "gauge") == 0 ? WXD_METRIC_GAUGE
          : strcmp(type, "histogram") == 0 ? WXD_METRIC_HISTOGRAM : -1;
  if (t < 0) return luaL_argerror(L, 3, "counter, gauge or histogram");
  const char *labels[WXD_METRICS_MAX_LABELS];
  double buckets[WXD_METRICS_MAX_BUCKETS];
  int nl = 0, nb = 0;
  if (!lua_isnoneornil(L, 4)) {
    luaL_checktype(L, 4, LUA_TTABLE);
    nl = (int)lua_objlen(L, 4);
    if (nl > WXD_METRICS_MAX_LABELS) return luaL_error(L, "wxd.metrics: %s: at most %d labels", name,
                                                       WXD_METRICS_MAX_LABELS);
    for (int i = 0; i < nl; i++) {
      lua_rawgeti(L, 4, i + 1);
      labels[i] = lua_tostring(L, -1);
      if (!labels[i] || lua_type(L, -1) != LUA_TSTRING) return luaL_error(L, "wxd.metrics: %s: label names must be strings", name);
      lua_pop(L, 1); /* the string stays alive in the table */
    }
  }
  if (!lua_isnoneornil(L, 5)) {
    luaL_checktype(L, 5, LUA_TTABLE);
    nb = (int)lua_objlen(L, 5);
    if (nb > WXD_METRICS_MAX_BUCKETS) return luaL_error(L, "wxd.metrics: %s: at most %d buckets", name,
                                                        WXD_METRICS_MAX_BUCKETS);
    for (int i = 0; i < nb; i++) {
      lua_rawgeti(L, 5, i + 1);
      if (lua_type(L, -1) != LUA_TNUMBER) return luaL_error(L, "wxd.metrics: %s: buckets must be numbers", name);
      buckets[i] = lua_tonumber(L, -1);
      lua_pop(L, 1);
    }
  }
  lua_Integer maxs = luaL_optinteger(L, 6, 0);
  if (maxs < 0 || maxs > 100000) return luaL_argerror(L, 6, "max_series must be 1..100000");
  char err[300];
  int id = wxd_metrics_family(name, help, t, nl, labels, nb, buckets, (unsigned)maxs, err, sizeof err);
  if (id < 0) return luaL_error(L, "wxd.metrics: %s", err);
  lua_pushinteger(L, id);
  return 1;
}

/* series(family, v1, ...) -> slot | nil, err */
static int l_series(lua_State *L) {
  lua_Integer fid = luaL_checkinteger(L, 1);
  int n = lua_gettop(L) - 1;
  if (n > WXD_METRICS_MAX_LABELS) return luaL_error(L, "too many label values");
  const char *v[WXD_METRICS_MAX_LABELS];
  size_t l[WXD_METRICS_MAX_LABELS];
  for (int i = 0; i < n; i++) v[i] = luaL_checklstring(L, i + 2, &l[i]);
  pthread_mutex_lock(&R.mu);
  int ok = fid >= 0 && fid < R.nfam && R.fam[fid]->nlabels == n;
  pthread_mutex_unlock(&R.mu);
  if (!ok) return luaL_error(L, "wxd.metrics: wrong family or number of label values");
  char err[400];
  int slot = wxd_metrics_series((int)fid, v, l, err, sizeof err);
  if (slot < 0) {
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
  }
  lua_pushinteger(L, slot);
  return 1;
}

static int l_add(lua_State *L) {
  wxd_metrics_add(writer_of(L), check_slot(L, 1), luaL_optnumber(L, 2, 1));
  return 0;
}

static int l_observe(lua_State *L) {
  lua_Integer fid = luaL_checkinteger(L, 1);
  int slot = check_slot(L, 2);
  if (fid < 0 || fid >= R.nfam) return luaL_argerror(L, 1, "not a family");
  wxd_metrics_observe(writer_of(L), (int)fid, slot, luaL_checknumber(L, 3));
  return 0;
}

static int l_set(lua_State *L) {
  wxd_metrics_set_shared(check_slot(L, 1), luaL_checknumber(L, 2));
  return 0;
}

static int l_add_shared(lua_State *L) {
  wxd_metrics_add_shared(check_slot(L, 1), luaL_checknumber(L, 2));
  return 0;
}

static int l_value(lua_State *L) {
  lua_pushnumber(L, wxd_metrics_value(check_slot(L, 1)));
  return 1;
}

static int l_render(lua_State *L) {
  wxd_buf_t b = {0};
  wxd_metrics_render(&b);
  lua_pushlstring(L, b.data ? b.data : "", b.len);
  wxd_buf_free(&b);
  return 1;
}

int wxd_open_metrics(lua_State *L) {
  static const luaL_Reg fns[] = {{"family", l_family}, {"series", l_series},   {"add", l_add},
                                 {"observe", l_observe}, {"set", l_set},       {"add_shared", l_add_shared},
                                 {"value", l_value},   {"render", l_render}, {NULL, NULL}};
  int writer = wxd_metrics_writer(wxd_vm_get(L)->worker);
  lua_createtable(L, 0, 9);
  for (const luaL_Reg *r = fns; r->name; r++) {
    lua_pushinteger(L, writer);
    lua_pushcclosure(L, r->func, 1);
    lua_setfield(L, -2, r->name);
  }
  pthread_mutex_lock(&R.mu);
  lua_pushboolean(L, !R.off);
  pthread_mutex_unlock(&R.mu);
  lua_setfield(L, -2, "enabled");
  return 1;
}
