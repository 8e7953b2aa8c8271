/* hdrs: header fields collected from llhttp's callbacks, shared by the
 * server (http.c) and the client (fetchresp.c).
 *
 * A field is four offsets into a buffer its owner keeps (the request or
 * response head); names are stored in lower case. llhttp hands a name or
 * a value over in as many pieces as the input was split into: pieces of
 * the same name or value are joined, and a name that follows a value
 * starts the next field. The collector bounds the number of fields and,
 * when asked, the bytes they take (4 per field for ": " and CRLF, plus
 * each name and value), which the server counts together with its request
 * target and trailers (wxd_hdrs_count).
 *
 * Storage is either a fixed array of the owner (slots == max: never
 * allocates) or grown on the heap up to max and freed by wxd_hdrs_free.
 */
#ifndef WXD_HDRS_H
#define WXD_HDRS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "buf.h"

typedef struct wxd_hdr {
  uint32_t name_off, name_len, value_off, value_len;
} wxd_hdr_t;

enum { WXD_HDRS_OK = 0, WXD_HDRS_TOO_MANY, WXD_HDRS_TOO_LARGE, WXD_HDRS_NOMEM };

typedef struct wxd_hdrs {
  wxd_hdr_t *v;         /* the fields, v[0 .. n) */
  unsigned n, cap, max; /* held, room in v, allowed */
  int state;            /* 0 none, 1 in a name, 2 in a value */
  unsigned heap : 1;    /* v was allocated here */
  size_t bytes;         /* counted against max_bytes */
  size_t max_bytes;
} wxd_hdrs_t;

/* slots: the owner's array of `max` fields, or NULL to grow on the heap. */
void wxd_hdrs_init(wxd_hdrs_t *h, wxd_hdr_t *slots, unsigned max);
void wxd_hdrs_free(wxd_hdrs_t *h);
/* A new field, zeroed, at v[n-1]: WXD_HDRS_TOO_MANY or _NOMEM otherwise. */
int wxd_hdrs_push(wxd_hdrs_t *h);

/* Empty, for the next message; max_bytes SIZE_MAX when not counted. */
static inline void wxd_hdrs_reset(wxd_hdrs_t *h, size_t max_bytes) {
  h->n = 0;
  h->state = 0;
  h->bytes = 0;
  h->max_bytes = max_bytes;
}

/* Counts n more bytes of the head: WXD_HDRS_TOO_LARGE past max_bytes. */
static inline int wxd_hdrs_count(wxd_hdrs_t *h, size_t n) {
  h->bytes += n;
  return h->bytes > h->max_bytes ? WXD_HDRS_TOO_LARGE : WXD_HDRS_OK;
}

/* A piece of a field name (on_header_field), lower-cased into buf. */
static inline int wxd_hdrs_name(wxd_hdrs_t *h, wxd_buf_t *buf, const char *at, size_t len) {
  if (h->state != 1) {
    int e = wxd_hdrs_push(h);
    if (e) return e;
    h->v[h->n - 1].name_off = (uint32_t)buf->len;
    h->state = 1;
    if (wxd_hdrs_count(h, 4)) return WXD_HDRS_TOO_LARGE;
  }
  if (wxd_hdrs_count(h, len)) return WXD_HDRS_TOO_LARGE;
  if (wxd_buf_reserve(buf, len)) return WXD_HDRS_NOMEM;
  char *dst = buf->data + buf->len;
  /* ASCII only: names are tokens, and tolower(3) would follow a locale a
   * script may set with os.setlocale. */
  for (size_t i = 0; i < len; i++) {
    unsigned char ch = (unsigned char)at[i];
    dst[i] = (char)(ch >= 'A' && ch <= 'Z' ? ch + 32 : ch);
  }
  buf->len += len;
  h->v[h->n - 1].name_len += (uint32_t)len;
  return WXD_HDRS_OK;
}

/* A piece of a field value (on_header_value), copied into buf. */
static inline int wxd_hdrs_value(wxd_hdrs_t *h, wxd_buf_t *buf, const char *at, size_t len) {
  wxd_hdr_t *f = &h->v[h->n - 1];
  if (h->state != 2) {
    f->value_off = (uint32_t)buf->len;
    h->state = 2;
  }
  if (wxd_hdrs_count(h, len)) return WXD_HDRS_TOO_LARGE;
  if (wxd_buf_append(buf, at, len)) return WXD_HDRS_NOMEM;
  f->value_len += (uint32_t)len;
  return WXD_HDRS_OK;
}

/* The value is complete (on_header_value_complete): the field is, too.
 * Whitespace after the value is not part of it (RFC 9110 5.5; llhttp
 * leaves it in, and drops only what precedes the value). */
static inline void wxd_hdrs_value_done(wxd_hdrs_t *h, const wxd_buf_t *buf) {
  h->state = 0;
  if (h->n == 0) return;
  wxd_hdr_t *f = &h->v[h->n - 1];
  while (f->value_len > 0) {
    char c = buf->data[f->value_off + f->value_len - 1];
    if (c != ' ' && c != '\t') break;
    f->value_len--;
  }
}

/* The index of the first field called `name` (lower case), or -1. */
static inline int wxd_hdrs_find(const wxd_hdrs_t *h, const wxd_buf_t *buf, const char *name, size_t nl) {
  for (unsigned i = 0; i < h->n; i++) {
    const wxd_hdr_t *f = &h->v[i];
    if (f->name_len == nl && memcmp(buf->data + f->name_off, name, nl) == 0) return (int)i;
  }
  return -1;
}

#endif
