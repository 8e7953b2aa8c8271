/* trace: see trace.h. */
#include "trace.h"

#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

/* splitmix64 per thread: each worker draws its own ids without locks. */
static _Thread_local uint64_t rng_state;
static _Thread_local int rng_seeded;

static uint64_t next_random(void) {
  if (!rng_seeded) {
    if (getrandom(&rng_state, sizeof rng_state, 0) != (ssize_t)sizeof rng_state) {
      struct timespec ts;
      clock_gettime(CLOCK_MONOTONIC, &ts);
      rng_state = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 32) ^ (uint64_t)(uintptr_t)&rng_state;
    }
    rng_seeded = 1;
  }
  uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static void hex64(char *out, uint64_t v) {
  static const char hex[] = "0123456789abcdef";
  for (int i = 15; i >= 0; i--) {
    out[i] = hex[v & 15];
    v >>= 4;
  }
}

void wxd_trace_new_span_id(char out[17]) {
  uint64_t v;
  do v = next_random(); while (v == 0);
  hex64(out, v);
  out[16] = 0;
}

void wxd_trace_new_trace_id(char out[33]) {
  uint64_t a = next_random(), b = next_random();
  if ((a | b) == 0) b = 1;
  hex64(out, a);
  hex64(out + 16, b);
  out[32] = 0;
}

/* n lowercase hex digits, not all zero when nonzero is set. */
static int lower_hex(const char *s, size_t n, int nonzero) {
  int any = 0;
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return 0;
    if (c != '0') any = 1;
  }
  return any || !nonzero;
}

int wxd_trace_parse(const char *v, size_t n, char trace_id[33], char parent_id[17], uint8_t *flags) {
  /* version "-" trace-id "-" parent-id "-" flags: 2+1+32+1+16+1+2 = 55 */
  while (n > 0 && (v[0] == ' ' || v[0] == '\t')) v++, n--;
  while (n > 0 && (v[n - 1] == ' ' || v[n - 1] == '\t')) n--;
  if (n < 55 || !lower_hex(v, 2, 0) || memcmp(v, "ff", 2) == 0) return 0;
  int v00 = memcmp(v, "00", 2) == 0;
  if (v00 ? n != 55 : (n > 55 && v[55] != '-')) return 0;
  if (v[2] != '-' || v[35] != '-' || v[52] != '-') return 0;
  if (!lower_hex(v + 3, 32, 1) || !lower_hex(v + 36, 16, 1) || !lower_hex(v + 53, 2, 0)) return 0;
  memcpy(trace_id, v + 3, 32);
  trace_id[32] = 0;
  memcpy(parent_id, v + 36, 16);
  parent_id[16] = 0;
  unsigned hi = (unsigned)(v[53] <= '9' ? v[53] - '0' : v[53] - 'a' + 10);
  unsigned lo = (unsigned)(v[54] <= '9' ? v[54] - '0' : v[54] - 'a' + 10);
  *flags = (uint8_t)(hi << 4 | lo);
  return 1;
}

int wxd_trace_id_ok(const char *v, size_t n, size_t max) {
  if (n == 0 || n > max) return 0;
  for (size_t i = 0; i < n; i++) {
    char c = v[i];
    /* c != 0: strchr would find the set's own terminator. */
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
          (c != 0 && strchr("-_.:@/+=", c))))
      return 0;
  }
  return 1;
}

void wxd_trace_set_request_id(wxd_trace_t *t, const char *rid, size_t ridlen, const char *fallback_id) {
  if (rid && wxd_trace_id_ok(rid, ridlen, WXD_TRACE_REQUEST_ID_MAX)) {
    memcpy(t->request_id, rid, ridlen);
    t->request_id[ridlen] = 0;
  } else {
    size_t n = strnlen(fallback_id, WXD_TRACE_REQUEST_ID_MAX);
    memcpy(t->request_id, fallback_id, n);
    t->request_id[n] = 0;
  }
}

void wxd_trace_draw(uint64_t ids[3]) {
  ids[0] = next_random();
  ids[1] = next_random();
  if ((ids[0] | ids[1]) == 0) ids[1] = 1;
  do ids[2] = next_random(); while (ids[2] == 0);
}

void wxd_trace_set_new(wxd_trace_t *t, const uint64_t ids[3]) {
  hex64(t->trace_id, ids[0]);
  hex64(t->trace_id + 16, ids[1]);
  t->trace_id[32] = 0;
  hex64(t->span_id, ids[2]);
  t->span_id[16] = 0;
  t->parent_id[0] = 0;
  t->flags = 0;
}

void wxd_trace_make_ids(wxd_trace_t *t, const char *tp, size_t tplen) {
  if (tp && wxd_trace_parse(tp, tplen, t->trace_id, t->parent_id, &t->flags)) {
    wxd_trace_new_span_id(t->span_id);
    return;
  }
  uint64_t ids[3];
  wxd_trace_draw(ids);
  wxd_trace_set_new(t, ids);
}

void wxd_trace_begin(wxd_trace_t *t, const char *tp, size_t tplen, const char *rid, size_t ridlen,
                     const char *fallback_id) {
  wxd_trace_make_ids(t, tp, tplen);
  wxd_trace_set_request_id(t, rid, ridlen, fallback_id);
  t->openid[0] = 0;
  t->gray[0] = 0;
}

void wxd_trace_none(wxd_trace_t *t, const char *request_id) {
  t->trace_id[0] = t->span_id[0] = t->parent_id[0] = 0;
  t->flags = 0;
  size_t n = strnlen(request_id, WXD_TRACE_REQUEST_ID_MAX);
  memcpy(t->request_id, request_id, n);
  t->request_id[n] = 0;
  t->openid[0] = 0;
  t->gray[0] = 0;
}

int wxd_trace_gray_ok(const char *v, size_t n) {
  if (n == 0 || n > WXD_TRACE_GRAY_MAX) return 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)v[i];
    if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '-' ||
          ch == '_' || ch == '.'))
      return 0;
  }
  return 1;
}
