/* trace: W3C trace context (traceparent) and request ids.
 *
 * A request gets a trace id (the caller's, from a valid traceparent, or a
 * new one), a span id of its own (always new), the caller's span as its
 * parent, and a request id (a sane X-Request-Id, or the core's own id).
 * Ids come from a per-thread generator seeded from getrandom(2): cheap,
 * unpredictable enough for correlation (they are not secrets).
 */
#ifndef WXD_TRACE_H
#define WXD_TRACE_H

#include <stddef.h>
#include <stdint.h>

#define WXD_TRACE_REQUEST_ID_MAX 64
#define WXD_TRACE_OPENID_MAX 64
#define WXD_TRACE_GRAY_MAX 32

typedef struct wxd_trace {
  char trace_id[33];  /* 32 lowercase hex digits */
  char span_id[17];   /* this request's span */
  char parent_id[17]; /* the caller's span; "" for a new trace */
  uint8_t flags;      /* the caller's trace-flags (bit 0: sampled) */
  char request_id[WXD_TRACE_REQUEST_ID_MAX + 1];
  char openid[WXD_TRACE_OPENID_MAX + 1]; /* "" until known */
  char gray[WXD_TRACE_GRAY_MAX + 1];     /* the request's colour (wxd.gray); "" for none */
} wxd_trace_t;

/* Parses a traceparent header value (W3C Trace Context level 1, section 3.2:
 * version ff, all-zero ids, wrong lengths and upper-case or non-hex digits
 * are invalid; a future version may append "-..." fields). Returns 1 and
 * fills trace_id/parent_id/flags when valid, else 0. */
int wxd_trace_parse(const char *v, size_t n, char trace_id[33], char parent_id[17], uint8_t *flags);

/* Starts a request's context: traceparent (may be NULL) and X-Request-Id
 * (may be NULL) as received; fallback_id is the core's request id. */
void wxd_trace_begin(wxd_trace_t *t, const char *tp, size_t tplen, const char *rid, size_t ridlen,
                     const char *fallback_id);

/* The two halves of wxd_trace_begin, for a context made lazily: the
 * request id (a sane X-Request-Id, else fallback_id), and the ids (the
 * caller's trace from a valid traceparent, else a new one; a new span). */
void wxd_trace_set_request_id(wxd_trace_t *t, const char *rid, size_t ridlen, const char *fallback_id);
void wxd_trace_make_ids(wxd_trace_t *t, const char *tp, size_t tplen);
/* A new trace in two steps: the random ids drawn (trace id high and low
 * halves, span id; never zero), then written as hex into t. Between the
 * two, a sampling decision can read the draw without formatting it: the
 * trace id's hex digits 16..23 are ids[1] >> 32. */
void wxd_trace_draw(uint64_t ids[3]);
void wxd_trace_set_new(wxd_trace_t *t, const uint64_t ids[3]);

/* A request without trace context (config trace = false): no ids made,
 * trace_id "" (what readers test); request_id is the core's own id. */
void wxd_trace_none(wxd_trace_t *t, const char *request_id);

/* 1 when v (n bytes) may be used as a request id or an openid: 1..max
 * bytes of letters, digits and -_.:@/+= (nothing a log or header could
 * be broken with). */
int wxd_trace_id_ok(const char *v, size_t n, size_t max);

/* The context a coroutine runs under: a request's own, or the copy a task
 * took from the coroutine that spawned it (so that a task outliving its
 * request keeps the ids); NULL for timers and scripts. httplua.c. */
struct wxd_co;
wxd_trace_t *wxd_trace_of(struct wxd_co *co);
/* task.c: a task's copy, or NULL. */
wxd_trace_t *wxd_task_trace(struct wxd_co *co);
/* Where a coroutine's gray colour lives, with trace = false too: a
 * request's context, or a task's copy of its spawner's; NULL for timers
 * and scripts. httplua.c; task.c's is wxd_task_slot. */
wxd_trace_t *wxd_trace_slot(struct wxd_co *co);
wxd_trace_t *wxd_task_slot(struct wxd_co *co);

/* 1 when v (n bytes) may be a gray colour: 1..WXD_TRACE_GRAY_MAX letters,
 * digits and -_. (it goes into headers, baggage and log lines as is). */
int wxd_trace_gray_ok(const char *v, size_t n);

/* New random ids as lowercase hex (never all zero), NUL-terminated. */
void wxd_trace_new_trace_id(char out[33]);
void wxd_trace_new_span_id(char out[17]);

#endif
