/* hdrs: see hdrs.h. The per-piece calls are inline there; here is what
 * only runs once per field or per message. */
#include "hdrs.h"

#include <stdlib.h>
#include <string.h>

void wxd_hdrs_init(wxd_hdrs_t *h, wxd_hdr_t *slots, unsigned max) {
  memset(h, 0, sizeof *h);
  h->v = slots;
  h->cap = slots ? max : 0;
  h->max = max;
  h->max_bytes = SIZE_MAX;
}

void wxd_hdrs_free(wxd_hdrs_t *h) {
  if (h->heap) free(h->v);
  h->v = NULL;
  h->n = h->cap = 0;
  h->heap = 0;
}

int wxd_hdrs_push(wxd_hdrs_t *h) {
  if (h->n == h->max) return WXD_HDRS_TOO_MANY;
  if (h->n == h->cap) {
    unsigned cap = h->cap ? h->cap * 2 : 16;
    if (cap > h->max) cap = h->max;
    wxd_hdr_t *v = realloc(h->heap ? h->v : NULL, cap * sizeof *v);
    if (!v) return WXD_HDRS_NOMEM;
    h->v = v;
    h->cap = cap;
    h->heap = 1;
  }
  wxd_hdr_t *f = &h->v[h->n++];
  memset(f, 0, sizeof *f);
  return WXD_HDRS_OK;
}
