/* libFuzzer target: the XML parser of core/xml.c (expat underneath).
 *
 * The first byte picks the limits (depth 1..32, 1..256 or the default
 * number of elements); the rest is the document. Whatever the input, the
 * parse must return a known code and free everything (ASan checks that).
 * On success the tree must respect the limits, and writing it back out
 * (leaf text escaped) and parsing that must give the same tree.
 * Whatever the flat scanner (wxd_xml_flat_*: WeChat's usual shape, read
 * without expat) accepts, expat must accept too and read as the same
 * elements with the same texts, in order.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "xml.h"

typedef struct out_buf {
  char *p;
  size_t len, cap;
} out_buf_t;

static void put(out_buf_t *b, const char *s, size_t n) {
  if (b->len + n > b->cap) {
    size_t cap = b->cap ? b->cap * 2 : 1024;
    while (cap < b->len + n) cap *= 2;
    b->p = realloc(b->p, cap);
    if (!b->p) abort();
    b->cap = cap;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
}

static void put_str(out_buf_t *b, const char *s) { put(b, s, strlen(s)); }

/* Checks the limits and counts the elements. */
static size_t check(const wxd_xml_node_t *n, unsigned depth, const wxd_xml_limits_t *lim) {
  if (depth > lim->max_depth || !n->name || !n->name[0]) abort();
  if (n->children && n->text) abort();
  if (!n->children && !n->text) abort();
  size_t count = 1;
  for (const wxd_xml_node_t *c = n->children; c; c = c->next) count += check(c, depth + 1, lim);
  return count;
}

static void write_node(out_buf_t *b, const wxd_xml_node_t *n) {
  put_str(b, "<");
  put_str(b, n->name);
  put_str(b, ">");
  if (n->children) {
    for (const wxd_xml_node_t *c = n->children; c; c = c->next) write_node(b, c);
  } else {
    for (size_t i = 0; i < n->text_len; i++) {
      char ch = n->text[i];
      if (ch == '&') put_str(b, "&amp;");
      else if (ch == '<') put_str(b, "&lt;");
      else if (ch == '>') put_str(b, "&gt;");
      else if (ch == '\r') put_str(b, "&#13;");
      else put(b, &ch, 1);
    }
  }
  put_str(b, "</");
  put_str(b, n->name);
  put_str(b, ">");
}

static void same(const wxd_xml_node_t *a, const wxd_xml_node_t *b) {
  if (strcmp(a->name, b->name) != 0) abort();
  if (!a->children != !b->children) abort();
  if (!a->children) {
    if (a->text_len != b->text_len || memcmp(a->text, b->text, a->text_len) != 0) abort();
    return;
  }
  const wxd_xml_node_t *x = a->children, *y = b->children;
  for (; x && y; x = x->next, y = y->next) same(x, y);
  if (x || y) abort();
}

/* 1 when the flat scanner takes the whole document; then the parse (rc,
 * doc) must agree field by field. */
static int flat_agrees(const char *s, size_t n, const wxd_xml_limits_t *lim, int rc, const wxd_xml_doc_t *doc) {
  wxd_xml_flat_t f;
  if (!wxd_xml_flat_open(&f, s, n, lim)) return 0;
  wxd_xml_field_t fields[64];
  size_t nf = 0;
  int r;
  while ((r = wxd_xml_flat_next(&f, &fields[nf < 64 ? nf : 63])) == 1) nf++;
  if (r != 0) return 0;
  if (rc != WXD_XML_OK) abort(); /* the scanner took what expat refuses */
  const wxd_xml_node_t *root = wxd_xml_root(doc);
  if (strcmp(root->name, "xml") != 0) abort();
  const wxd_xml_node_t *c = root->children;
  for (size_t i = 0; i < nf; i++, c = c->next) {
    if (!c || c->children) abort();
    if (i >= 64) continue; /* counted, not kept */
    if (strlen(c->name) != fields[i].name_len || memcmp(c->name, fields[i].name, fields[i].name_len) != 0) abort();
    if (c->text_len != fields[i].text_len || memcmp(c->text, fields[i].text, c->text_len) != 0) abort();
  }
  if (c) abort();
  return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  wxd_xml_limits_t lim = {WXD_XML_MAX_BYTES, (unsigned)(data[0] & 31) + 1,
                          data[0] & 32 ? (size_t)(data[0] >> 6) * 64 + 1 : WXD_XML_MAX_ELEMENTS};
  wxd_xml_doc_t *doc = NULL;
  wxd_xml_error_t err;
  int rc = wxd_xml_parse((const char *)data + 1, size - 1, &lim, &doc, &err);
  flat_agrees((const char *)data + 1, size - 1, &lim, rc, doc);
  if (rc != WXD_XML_OK) {
    if (doc || rc < WXD_XML_ENOMEM || !err.detail || !wxd_xml_strerror(rc)) abort();
    return 0;
  }
  const wxd_xml_node_t *root = wxd_xml_root(doc);
  if (check(root, 1, &lim) > lim.max_elements) abort();

  out_buf_t b = {0};
  write_node(&b, root);
  wxd_xml_doc_t *again = NULL;
  wxd_xml_limits_t big = {WXD_XML_MAX_BYTES * 8, lim.max_depth, lim.max_elements};
  if (wxd_xml_parse(b.p, b.len, &big, &again, NULL) != WXD_XML_OK) abort();
  same(root, wxd_xml_root(again));
  wxd_xml_free(again);
  wxd_xml_free(doc);
  free(b.p);
  return 0;
}
