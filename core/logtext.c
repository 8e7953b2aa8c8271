/* logtext: see logtext.h. */
#include "logtext.h"

#include <string.h>

typedef struct out {
  char *p;
  size_t n, cap;
} out_t;

static void put(out_t *o, const char *s, size_t len) {
  if (len > o->cap - o->n) len = o->cap - o->n;
  memcpy(o->p + o->n, s, len);
  o->n += len;
}

static void put_c(out_t *o, char c) { put(o, &c, 1); }

/* The end of the JSON string whose opening quote is at s[i] (the index past
 * its closing quote), or 0 when it is not closed. */
static size_t string_end(const char *s, size_t len, size_t i) {
  for (i++; i < len; i++) {
    if (s[i] == '\\') i++;
    else if (s[i] == '"') return i + 1;
  }
  return 0;
}

/* The end of the value starting at s[i] (a string, number, literal, object
 * or array), or 0 when the line ends first. */
static size_t value_end(const char *s, size_t len, size_t i) {
  if (i >= len) return 0;
  if (s[i] == '"') return string_end(s, len, i);
  if (s[i] == '{' || s[i] == '[') {
    int depth = 0;
    for (; i < len; i++) {
      if (s[i] == '"') {
        size_t e = string_end(s, len, i);
        if (!e) return 0;
        i = e - 1;
      } else if (s[i] == '{' || s[i] == '[') {
        depth++;
      } else if (s[i] == '}' || s[i] == ']') {
        if (--depth == 0) return i + 1;
      }
    }
    return 0;
  }
  while (i < len && s[i] != ',' && s[i] != '}') i++;
  return i;
}

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* Writes the JSON string s[0..len) (inside the quotes) unescaped; after
 * each newline, `indent`. */
static void unescape(out_t *o, const char *s, size_t len, const char *indent) {
  for (size_t i = 0; i < len; i++) {
    char c = s[i];
    if (c != '\\' || i + 1 >= len) {
      put_c(o, c);
      continue;
    }
    c = s[++i];
    switch (c) {
    case 'n':
      put_c(o, '\n');
      put(o, indent, strlen(indent));
      break;
    case 't': put_c(o, '\t'); break;
    case 'r': break;
    case 'b': case 'f': put_c(o, ' '); break;
    case 'u': {
      unsigned cp = 0;
      int ok = i + 4 < len;
      for (int k = 1; ok && k <= 4; k++) {
        int h = hexval(s[i + k]);
        if (h < 0) ok = 0;
        else cp = cp * 16 + (unsigned)h;
      }
      if (!ok) {
        put_c(o, '?');
        break;
      }
      i += 4;
      /* The escaper writes \u00XX for control bytes and \ufffd: no surrogates. */
      if (cp < 0x20 || cp == 0x7f) put_c(o, '?');
      else if (cp < 0x80) put_c(o, (char)cp);
      else if (cp < 0x800) {
        put_c(o, (char)(0xc0 | (cp >> 6)));
        put_c(o, (char)(0x80 | (cp & 0x3f)));
      } else {
        put_c(o, (char)(0xe0 | (cp >> 12)));
        put_c(o, (char)(0x80 | ((cp >> 6) & 0x3f)));
        put_c(o, (char)(0x80 | (cp & 0x3f)));
      }
      break;
    }
    default: put_c(o, c); /* \" \\ \/ */
    }
  }
}

#define DEFERRED_MAX 8

size_t wxd_log_text(const char *s, size_t len, char *buf, size_t cap) {
  out_t o = {buf, 0, cap};
  const char *ts = NULL, *level = NULL, *msg = NULL, *worker = NULL;
  size_t ts_len = 0, level_len = 0, msg_len = 0, worker_len = 0;
  /* Fields other than the four above, in order: key and value spans. */
  struct {
    const char *k, *v;
    size_t kl, vl;
  } fields[64];
  int nf = 0;
  if (len < 2 || s[0] != '{') return 0;
  size_t i = 1;
  while (i < len && s[i] != '}') {
    if (s[i] != '"') return 0;
    size_t ke = string_end(s, len, i);
    if (!ke || ke >= len || s[ke] != ':') return 0;
    size_t vs = ke + 1, ve = value_end(s, len, vs);
    if (!ve) return 0;
    const char *k = s + i + 1, *v = s + vs;
    size_t kl = ke - i - 2, vl = ve - vs;
    if (v[0] == '"') v++, vl -= 2; /* a string: its inside */
    if (kl == 2 && memcmp(k, "ts", 2) == 0 && !ts) ts = v, ts_len = vl;
    else if (kl == 5 && memcmp(k, "level", 5) == 0 && !level) level = v, level_len = vl;
    else if (kl == 3 && memcmp(k, "msg", 3) == 0 && !msg) msg = v, msg_len = vl;
    else if (kl == 6 && memcmp(k, "worker", 6) == 0 && !worker) worker = v, worker_len = vl;
    else if (nf < (int)(sizeof fields / sizeof fields[0])) {
      fields[nf].k = k, fields[nf].kl = kl;
      fields[nf].v = s + vs, fields[nf].vl = ve - vs; /* with its quotes, if a string */
      nf++;
    }
    i = ve;
    if (i < len && s[i] == ',') i++;
  }
  if (i >= len) return 0;

  /* 2026-12-03T22:17:03.842Z -> 22:17:03.842 */
  const char *t = ts ? memchr(ts, 'T', ts_len) : NULL;
  if (t) {
    size_t tl = ts_len - (size_t)(t + 1 - ts);
    if (tl > 0 && t[tl] == 'Z') tl--;
    put(&o, t + 1, tl);
    put_c(&o, ' ');
  }
  if (level) {
    char up[8];
    size_t n = level_len < 5 ? level_len : 5;
    for (size_t k = 0; k < n; k++) up[k] = (char)(level[k] >= 'a' && level[k] <= 'z' ? level[k] - 32 : level[k]);
    for (size_t k = n; k < 5; k++) up[k] = ' ';
    put(&o, up, 5);
    put_c(&o, ' ');
  }
  if (worker) {
    put_c(&o, 'w');
    put(&o, worker, worker_len);
    put_c(&o, ' ');
  }
  if (msg) unescape(&o, msg, msg_len, "  ");
  int deferred[DEFERRED_MAX], nd = 0;
  for (int f = 0; f < nf; f++) {
    const char *v = fields[f].v;
    size_t vl = fields[f].vl;
    int is_string = v[0] == '"';
    if (is_string && nd < DEFERRED_MAX && memmem(v, vl, "\\n", 2)) {
      deferred[nd++] = f; /* a traceback: on lines of its own, below */
      continue;
    }
    put_c(&o, ' ');
    put(&o, fields[f].k, fields[f].kl);
    put_c(&o, '=');
    if (is_string && !memchr(v, ' ', vl)) unescape(&o, v + 1, vl - 2, "");
    else put(&o, v, vl);
  }
  put_c(&o, '\n');
  for (int d = 0; d < nd; d++) {
    int f = deferred[d];
    put(&o, "  ", 2);
    put(&o, fields[f].k, fields[f].kl);
    put(&o, ":\n    ", 6);
    unescape(&o, fields[f].v + 1, fields[f].vl - 2, "    ");
    put_c(&o, '\n');
  }
  if (o.n == o.cap) return 0; /* did not fit: the JSON line instead */
  return o.n;
}
