/* wstopic: the topic registry shared by the workers (see ws.h).
 *
 * One mutex guards the hash of topics, every topic's per-worker subscriber
 * counts and lists, and the per-worker delivery queues. A publish takes the
 * mutex once: it finds the topic, builds the frame once (refcounted across
 * workers) and queues it to each worker with subscribers; each such worker
 * is woken by its uv_async and writes the frame to its subscribers. A
 * worker walks its own list of a topic without the mutex: only its own
 * thread adds to or removes from that list, and never while it walks it
 * (a connection that breaks during the walk leaves the list later, from
 * its handle's close callback).
 *
 * Metrics: each worker observes, per publish it delivered, the time from
 * the publish to its frame written to its last subscriber
 * (wxd_ws_publish_delivery_seconds); publishes refused for a full queue
 * are counted (wxd_ws_publish_dropped_total).
 */
#include "ws_internal.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "metrics.h"

#define NBUCKETS 4096
/* Unsent publishes a worker may have queued: beyond, new ones are dropped
 * for that worker (and counted), whatever is wrong with it. */
#define QUEUE_MAX_BYTES (64u * 1024 * 1024)

typedef struct ws_frame {
  atomic_int refs;
  uint64_t born;       /* uv_hrtime() at the publish */
  size_t tlen, flen;
  char *topic;         /* tlen bytes, in data */
  char data[];         /* topic, then the frame (header and payload) */
} ws_frame_t;

typedef struct ws_qent {
  struct ws_qent *next;
  ws_frame_t *f;
} ws_qent_t;

typedef struct ws_slot {
  uv_async_t async;
  int open;
  struct wxd_worker *w;
  ws_qent_t *head, *tail;
  size_t qbytes;
  uint64_t dropped;      /* publishes refused for a full queue (under mu) */
  int writer;            /* the worker's metrics writer */
  int delivering;        /* the worker walks subscribers (its thread only) */
  wxd_ws_t *deferred;    /* closed meanwhile: woken after the walk (its thread only) */
} ws_slot_t;

struct ws_topic {
  struct ws_topic *next; /* bucket chain */
  uint32_t hash;
  size_t len;
  char *name;
  unsigned total;
  unsigned *count;      /* per worker */
  wxd_ws_sub_t **head;  /* per worker: that worker's subscribers */
};

struct wxd_ws_topics {
  pthread_mutex_t mu;
  int n;
  int fam_delivery, slot_delivery; /* -1 until the first worker opens */
  ws_slot_t *slots;
  struct ws_topic *buckets[NBUCKETS];
};

static uint32_t topic_hash(const char *s, size_t n) {
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 16777619u;
  return h;
}

static struct ws_topic *topic_find(wxd_ws_topics_t *t, const char *s, size_t n, uint32_t h) {
  for (struct ws_topic *x = t->buckets[h % NBUCKETS]; x; x = x->next)
    if (x->hash == h && x->len == n && memcmp(x->name, s, n) == 0) return x;
  return NULL;
}

wxd_ws_topics_t *wxd_ws_topics_new(int nworkers) {
  wxd_ws_topics_t *t = calloc(1, sizeof *t);
  if (!t) return NULL;
  t->slots = calloc((size_t)nworkers, sizeof *t->slots);
  if (!t->slots) {
    free(t);
    return NULL;
  }
  t->n = nworkers;
  t->fam_delivery = t->slot_delivery = -1;
  pthread_mutex_init(&t->mu, NULL);
  return t;
}

static void frame_unref(ws_frame_t *f) {
  if (atomic_fetch_sub(&f->refs, 1) == 1) free(f);
}

static void slot_drop_queue(ws_slot_t *s) {
  ws_qent_t *q = s->head;
  s->head = s->tail = NULL;
  s->qbytes = 0;
  while (q) {
    ws_qent_t *next = q->next;
    frame_unref(q->f);
    free(q);
    q = next;
  }
}

void wxd_ws_topics_free(wxd_ws_topics_t *t) {
  if (!t) return;
  for (int i = 0; i < t->n; i++) slot_drop_queue(&t->slots[i]);
  /* Subscriptions left their topics when their connections closed; any
   * topic still here belongs to nothing. */
  for (int b = 0; b < NBUCKETS; b++) {
    struct ws_topic *x = t->buckets[b];
    while (x) {
      struct ws_topic *next = x->next;
      free(x);
      x = next;
    }
  }
  pthread_mutex_destroy(&t->mu);
  free(t->slots);
  free(t);
}

static void on_async(uv_async_t *a);

static const double DELIVERY_BUCKETS[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1};

/* The metrics, declared once (the registry is up before workers open). */
static void metrics_open_locked(wxd_ws_topics_t *t) {
  if (t->fam_delivery >= 0) return;
  char err[256];
  t->fam_delivery = wxd_metrics_family(
      "wxd_ws_publish_delivery_seconds",
      "WebSocket topic publishes: time from the publish to its frame written to the last subscriber, per worker",
      WXD_METRIC_HISTOGRAM, 0, NULL, (int)(sizeof DELIVERY_BUCKETS / sizeof *DELIVERY_BUCKETS), DELIVERY_BUCKETS,
      1, err, sizeof err);
  if (t->fam_delivery >= 0) t->slot_delivery = wxd_metrics_series(t->fam_delivery, NULL, NULL, err, sizeof err);
  if (t->slot_delivery < 0) wxd_logf(WXD_LOG_WARN, -1, "websocket metrics: %s", err);
}

int wxd_ws_worker_open(wxd_ws_topics_t *t, int id, uv_loop_t *loop, struct wxd_worker *w) {
  ws_slot_t *s = &t->slots[id];
  int rc = uv_async_init(loop, &s->async, on_async);
  if (rc != 0) return rc;
  s->async.data = t;
  s->writer = wxd_metrics_writer(id);
  pthread_mutex_lock(&t->mu);
  metrics_open_locked(t);
  s->w = w;
  s->open = 1;
  pthread_mutex_unlock(&t->mu);
  return 0;
}

void wxd_ws_worker_close(wxd_ws_topics_t *t, int id) {
  ws_slot_t *s = &t->slots[id];
  pthread_mutex_lock(&t->mu);
  int was_open = s->open;
  s->open = 0;
  slot_drop_queue(s);
  pthread_mutex_unlock(&t->mu);
  if (was_open) uv_close((uv_handle_t *)&s->async, NULL);
}

/* The header of an unmasked server frame of `len` bytes; returns its size. */
size_t wxd__ws_frame_head(uint8_t *h, int opcode, uint64_t len) {
  h[0] = (uint8_t)(0x80 | opcode);
  if (len < 126) {
    h[1] = (uint8_t)len;
    return 2;
  }
  if (len <= 0xffff) {
    h[1] = 126;
    h[2] = (uint8_t)(len >> 8);
    h[3] = (uint8_t)len;
    return 4;
  }
  h[1] = 127;
  for (int i = 0; i < 8; i++) h[2 + i] = (uint8_t)(len >> (56 - 8 * i));
  return 10;
}

int wxd_ws_publish(wxd_ws_topics_t *t, const char *topic, size_t tlen, const char *text, size_t len) {
  if (!t) return 0;
  uint32_t h = topic_hash(topic, tlen);
  uint8_t head[10];
  size_t hl = wxd__ws_frame_head(head, 0x1, len);
  int queued = 0;
  ws_frame_t *f = NULL;
  pthread_mutex_lock(&t->mu);
  struct ws_topic *x = topic_find(t, topic, tlen, h);
  for (int i = 0; x && i < t->n; i++) {
    ws_slot_t *s = &t->slots[i];
    if (x->count[i] == 0 || !s->open) continue;
    if (s->qbytes + hl + len > QUEUE_MAX_BYTES) {
      s->dropped++;
      continue;
    }
    if (!f) {
      f = malloc(sizeof *f + tlen + hl + len);
      if (!f) break;
      atomic_init(&f->refs, 1); /* ours, until the loop ends */
      f->born = uv_hrtime();
      f->tlen = tlen;
      f->flen = hl + len;
      f->topic = f->data;
      memcpy(f->data, topic, tlen);
      memcpy(f->data + tlen, head, hl);
      memcpy(f->data + tlen + hl, text, len);
    }
    ws_qent_t *q = malloc(sizeof *q);
    if (!q) break;
    q->next = NULL;
    q->f = f;
    atomic_fetch_add(&f->refs, 1);
    if (s->tail) s->tail->next = q;
    else s->head = q;
    s->tail = q;
    s->qbytes += f->flen;
    queued++;
    /* Under the mutex: a slot stays open (its handle not closing) until
     * wxd_ws_worker_close, which takes it. */
    uv_async_send(&s->async);
  }
  pthread_mutex_unlock(&t->mu);
  if (f) frame_unref(f);
  return queued;
}

uint64_t wxd_ws_topics_dropped(wxd_ws_topics_t *t, int id) {
  if (!t || id < 0 || id >= t->n) return 0;
  pthread_mutex_lock(&t->mu);
  uint64_t n = t->slots[id].dropped;
  pthread_mutex_unlock(&t->mu);
  return n;
}

static void on_async(uv_async_t *a) {
  wxd_ws_topics_t *t = a->data;
  ws_slot_t *s = (ws_slot_t *)a; /* async is the slot's first member */
  int id = (int)(s - t->slots);
  pthread_mutex_lock(&t->mu);
  ws_qent_t *q = s->head;
  s->head = s->tail = NULL;
  s->qbytes = 0;
  pthread_mutex_unlock(&t->mu);
  s->delivering = 1;
  while (q) {
    ws_qent_t *next = q->next;
    ws_frame_t *f = q->f;
    pthread_mutex_lock(&t->mu);
    struct ws_topic *x = topic_find(t, f->topic, f->tlen, topic_hash(f->topic, f->tlen));
    wxd_ws_sub_t *sub = x ? x->head[id] : NULL;
    pthread_mutex_unlock(&t->mu);
    if (sub) {
      for (; sub; sub = sub->next) wxd__ws_deliver(sub->ws, f->data + f->tlen, f->flen);
      if (t->slot_delivery >= 0)
        wxd_metrics_observe(s->writer, t->fam_delivery, t->slot_delivery, (double)(uv_hrtime() - f->born) / 1e9);
    }
    frame_unref(f);
    free(q);
    q = next;
  }
  s->delivering = 0;
  /* Connections are freed by their handles' close callbacks, which run on
   * a later turn of the loop: these are all still here. */
  while (s->deferred) {
    wxd_ws_t *ws = s->deferred;
    s->deferred = ws->defer_next;
    ws->defer_next = NULL;
    wxd__ws_wake_closed(ws);
  }
}

int wxd__ws_defer_wake(wxd_ws_topics_t *t, int id, wxd_ws_t *ws) {
  ws_slot_t *s = &t->slots[id];
  if (!s->delivering) return 0;
  ws->defer_next = s->deferred;
  s->deferred = ws;
  return 1;
}

int wxd__ws_subscribe(wxd_ws_topics_t *t, int id, wxd_ws_t *ws, const char *name, size_t n) {
  for (wxd_ws_sub_t *s = ws->subs; s; s = s->ws_next)
    if (s->topic->len == n && memcmp(s->topic->name, name, n) == 0) return 0;
  wxd_ws_sub_t *sub = calloc(1, sizeof *sub);
  if (!sub) return -1;
  uint32_t h = topic_hash(name, n);
  pthread_mutex_lock(&t->mu);
  struct ws_topic *x = topic_find(t, name, n, h);
  if (!x) {
    size_t per = (size_t)t->n;
    x = calloc(1, sizeof *x + per * sizeof(unsigned) + per * sizeof(wxd_ws_sub_t *) + n + 1);
    if (!x) {
      pthread_mutex_unlock(&t->mu);
      free(sub);
      return -1;
    }
    x->head = (wxd_ws_sub_t **)(x + 1);
    x->count = (unsigned *)(x->head + per);
    x->name = (char *)(x->count + per);
    memcpy(x->name, name, n);
    x->len = n;
    x->hash = h;
    x->next = t->buckets[h % NBUCKETS];
    t->buckets[h % NBUCKETS] = x;
  }
  x->total++;
  x->count[id]++;
  sub->ws = ws;
  sub->topic = x;
  sub->next = x->head[id];
  if (sub->next) sub->next->prev = sub;
  x->head[id] = sub;
  pthread_mutex_unlock(&t->mu);
  sub->ws_next = ws->subs;
  ws->subs = sub;
  return 0;
}

static void sub_remove(wxd_ws_topics_t *t, int id, wxd_ws_sub_t *sub) {
  struct ws_topic *x = sub->topic;
  pthread_mutex_lock(&t->mu);
  if (sub->prev) sub->prev->next = sub->next;
  else x->head[id] = sub->next;
  if (sub->next) sub->next->prev = sub->prev;
  x->count[id]--;
  if (--x->total == 0) {
    struct ws_topic **p = &t->buckets[x->hash % NBUCKETS];
    while (*p != x) p = &(*p)->next;
    *p = x->next;
    free(x);
  }
  pthread_mutex_unlock(&t->mu);
  free(sub);
}

int wxd__ws_unsubscribe(wxd_ws_topics_t *t, int id, wxd_ws_t *ws, const char *name, size_t n) {
  for (wxd_ws_sub_t **p = &ws->subs; *p; p = &(*p)->ws_next) {
    wxd_ws_sub_t *s = *p;
    if (s->topic->len == n && memcmp(s->topic->name, name, n) == 0) {
      *p = s->ws_next;
      sub_remove(t, id, s);
      return 1;
    }
  }
  return 0;
}

void wxd__ws_unsubscribe_all(wxd_ws_topics_t *t, int id, wxd_ws_t *ws) {
  while (ws->subs) {
    wxd_ws_sub_t *s = ws->subs;
    ws->subs = s->ws_next;
    sub_remove(t, id, s);
  }
}
