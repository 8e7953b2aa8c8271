/* log: see log.h. */
#include "log.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static pthread_mutex_t log_mutex = PTHREAD_MUTEX_INITIALIZER;
static int log_min_level = WXD_LOG_INFO; /* written before threads start */

static const char *const level_names[] = {"debug", "info", "warn", "error"};

void wxd_log_set_level(int level) { log_min_level = level; }
int wxd_log_level(void) { return log_min_level; }

int wxd_log_parse_level(const char *name) {
  for (int i = 0; i < 4; i++)
    if (strcmp(name, level_names[i]) == 0) return i;
  return -1;
}

const char *wxd_log_level_name(int level) {
  return level >= 0 && level < 4 ? level_names[level] : "info";
}

/* ---- WXD_LOG_FORMAT=text: the same lines for a human ---- */

static pthread_once_t format_once = PTHREAD_ONCE_INIT;
static int text_format;

static void read_format(void) {
  const char *f = getenv("WXD_LOG_FORMAT");
  text_format = f && strcmp(f, "text") == 0;
}

/* Appends a JSON string's content (p at the opening quote) unescaped;
 * returns the position after the closing quote. \u escapes of the BMP are
 * written as UTF-8 (surrogate pairs do not occur: the writers escape only
 * control bytes and invalid UTF-8). */
static const char *put_unescaped(const char *p, const char *end, char **o, const char *oend) {
  p++;
  while (p < end && *p != '"') {
    char c = *p++;
    if (c == '\\' && p < end) {
      char e = *p++;
      if (e == 'n') c = '\n';
      else if (e == 't') c = '\t';
      else if (e == 'r') c = '\r';
      else if (e == 'b' || e == 'f') c = ' ';
      else if (e == 'u' && end - p >= 4) {
        unsigned v = (unsigned)strtoul((char[5]){p[0], p[1], p[2], p[3], 0}, NULL, 16);
        p += 4;
        char u[3];
        int n = 0;
        if (v < 0x80) u[n++] = (char)v;
        else if (v < 0x800) u[n++] = (char)(0xc0 | v >> 6), u[n++] = (char)(0x80 | (v & 0x3f));
        else u[n++] = (char)(0xe0 | v >> 12), u[n++] = (char)(0x80 | ((v >> 6) & 0x3f)), u[n++] = (char)(0x80 | (v & 0x3f));
        for (int i = 0; i < n && *o < oend; i++) *(*o)++ = u[i];
        continue;
      } else c = e;
    }
    if (*o < oend) *(*o)++ = c;
  }
  return p < end ? p + 1 : p;
}

/* The end of the JSON value at p (a string, a number, a literal, or a
 * nested object or array copied as it is). */
static const char *skip_value(const char *p, const char *end) {
  int depth = 0, in_str = 0;
  for (; p < end; p++) {
    char c = *p;
    if (in_str) {
      if (c == '\\') p++;
      else if (c == '"') {
        in_str = 0;
        if (depth == 0) return p + 1;
      }
    } else if (c == '"') in_str = 1;
    else if (c == '{' || c == '[') depth++;
    else if (c == '}' || c == ']') {
      if (depth == 0) return p;
      if (--depth == 0) return p + 1;
    } else if (c == ',' && depth == 0) return p;
  }
  return p;
}

/* One JSON line as "ts LEVEL [wN] msg  key=value ...", with string values
 * that hold line breaks (tracebacks) written below, indented. */
static size_t line_to_text(const char *p, const char *end, char *out, size_t cap) {
  char *o = out, *oend = out + cap - 2;
  char tail[8192];
  char *t = tail, *tend = tail + sizeof tail - 1;
  const char *ts = NULL, *level = NULL, *worker = NULL, *msg = NULL;
  const char *ts_end = NULL, *level_end = NULL, *worker_end = NULL;
  char rest[8192];
  char *r = rest, *rend = rest + sizeof rest - 1;
  if (p < end && *p == '{') p++;
  while (p < end && *p == '"') {
    const char *k = p + 1, *ke = memchr(k, '"', (size_t)(end - k));
    if (!ke || ke + 1 >= end || ke[1] != ':') break;
    const char *v = ke + 2, *ve = skip_value(v, end);
    size_t kl = (size_t)(ke - k);
    if (kl == 2 && memcmp(k, "ts", 2) == 0) ts = v, ts_end = ve;
    else if (kl == 5 && memcmp(k, "level", 5) == 0) level = v, level_end = ve;
    else if (kl == 6 && memcmp(k, "worker", 6) == 0) worker = v, worker_end = ve;
    else if (kl == 3 && memcmp(k, "msg", 3) == 0) msg = v;
    else if (*v == '"' && memmem(v, (size_t)(ve - v), "\\n", 2)) {
      /* A multi-line value: below the line, every line indented. */
      char buf[8192], *b = buf;
      put_unescaped(v, ve, &b, buf + sizeof buf);
      int n = snprintf(t, (size_t)(tend - t), "    %.*s:\n      ", (int)kl, k);
      if (n > 0 && n < tend - t) t += n;
      for (char *q = buf; q < b && t < tend - 8; q++) {
        *t++ = *q;
        if (*q == '\n') memcpy(t, "      ", 6), t += 6;
      }
      if (t < tend) *t++ = '\n';
    } else {
      int n = snprintf(r, (size_t)(rend - r), " %.*s=", (int)kl, k);
      if (n > 0 && n < rend - r) r += n;
      if (*v == '"') put_unescaped(v, ve, &r, rend);
      else {
        size_t vl = (size_t)(ve - v) < (size_t)(rend - r) ? (size_t)(ve - v) : (size_t)(rend - r);
        memcpy(r, v, vl);
        r += vl;
      }
    }
    p = ve;
    if (p < end && *p == ',') p++;
  }
  if (ts) put_unescaped(ts, ts_end, &o, oend);
  if (level && o < oend) {
    *o++ = ' ';
    char *l0 = o;
    put_unescaped(level, level_end, &o, oend);
    for (char *q = l0; q < o; q++) *q = (char)(*q >= 'a' && *q <= 'z' ? *q - 32 : *q);
    while (o - l0 < 5 && o < oend) *o++ = ' ';
  }
  if (worker) {
    int n = snprintf(o, (size_t)(oend - o), " [w%.*s]", (int)(worker_end - worker), worker);
    if (n > 0 && n < oend - o) o += n;
  }
  if (msg && o < oend) {
    *o++ = ' ';
    put_unescaped(msg, end, &o, oend);
  }
  size_t rl = (size_t)(r - rest) < (size_t)(oend - o) ? (size_t)(r - rest) : (size_t)(oend - o);
  memcpy(o, rest, rl);
  o += rl;
  *o++ = '\n';
  size_t tl = (size_t)(t - tail) < (size_t)(out + cap - o) ? (size_t)(t - tail) : (size_t)(out + cap - o);
  memcpy(o, tail, tl);
  return (size_t)(o - out) + tl;
}

static void write_raw(const char *p, size_t len);

/* Converts each line of a buffer of JSON lines and writes it. */
static void write_text(const char *p, size_t len) {
  static _Thread_local char out[32768];
  const char *end = p + len;
  while (p < end) {
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    const char *le = nl ? nl : end;
    size_t n = line_to_text(p, le, out, sizeof out);
    write_raw(out, n);
    p = nl ? nl + 1 : end;
  }
}

static void write_all(const char *p, size_t len) {
  pthread_once(&format_once, read_format);
  if (text_format) write_text(p, len);
  else write_raw(p, len);
}

static void write_raw(const char *p, size_t len) {
  pthread_mutex_lock(&log_mutex);
  while (len > 0) {
    ssize_t n = write(STDERR_FILENO, p, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      break; /* stderr is gone: nothing sensible left to do */
    }
    p += n;
    len -= (size_t)n;
  }
  pthread_mutex_unlock(&log_mutex);
}

/* Length of the well-formed UTF-8 sequence at p (Unicode 15, table 3-7),
 * or 0 when there is none; then *bad is the length of its maximal ill-formed
 * prefix (at least 1), which becomes one U+FFFD as the Unicode standard
 * recommends (and Python, browsers and Go do). */
static size_t utf8_sequence(const unsigned char *p, size_t avail, size_t *bad) {
  unsigned char c = p[0], lo = 0x80, hi = 0xbf;
  size_t need;
  if (c >= 0xc2 && c <= 0xdf) {
    need = 2;
  } else if (c >= 0xe0 && c <= 0xef) {
    need = 3;
    if (c == 0xe0) lo = 0xa0;      /* overlong */
    else if (c == 0xed) hi = 0x9f; /* UTF-16 surrogates */
  } else if (c >= 0xf0 && c <= 0xf4) {
    need = 4;
    if (c == 0xf0) lo = 0x90;      /* overlong */
    else if (c == 0xf4) hi = 0x8f; /* above U+10FFFF */
  } else {
    *bad = 1; /* a continuation byte, C0, C1 or F5..FF */
    return 0;
  }
  size_t i = 1;
  for (; i < need && i < avail; i++) {
    if (p[i] < lo || p[i] > hi) break;
    lo = 0x80, hi = 0xbf;
  }
  if (i == need) return need;
  *bad = i;
  return 0;
}

/* Bytes copied as they are: printable ASCII but the quote and backslash. */
static inline int json_plain(unsigned char c) { return c >= 0x20 && c < 0x7f && c != '"' && c != '\\'; }

size_t wxd_json_escape(char *out, size_t cap, const char *s, size_t len) {
  static const char hex[] = "0123456789abcdef";
  const unsigned char *p = (const unsigned char *)s, *end = p + len;
  size_t o = 0;
  while (p < end) {
    /* A run of plain ASCII and well-formed UTF-8 is copied at once. */
    const unsigned char *run = p;
    size_t bad = 0;
    while (p < end) {
      if (json_plain(*p)) {
        p++;
      } else if (*p >= 0x80) {
        size_t k = utf8_sequence(p, (size_t)(end - p), &bad);
        if (!k) break;
        p += k;
      } else {
        break;
      }
    }
    size_t n = (size_t)(p - run);
    if (n > cap - o) {
      /* Cut on a character boundary: never after a lead byte. */
      n = cap - o;
      while (n > 0 && (run[n] & 0xc0) == 0x80) n--;
      memcpy(out + o, run, n);
      return o + n;
    }
    memcpy(out + o, run, n);
    o += n;
    if (p == end) break;

    unsigned char c = *p;
    char esc[6];
    size_t en = 2, skip = 1;
    esc[0] = '\\';
    if (bad) {
      memcpy(esc, "\\ufffd", 6); /* invalid UTF-8: the replacement character */
      en = 6;
      skip = bad;
    } else if (c == '"' || c == '\\') {
      esc[1] = (char)c;
    } else if (c == '\n') {
      esc[1] = 'n';
    } else if (c == '\t') {
      esc[1] = 't';
    } else if (c == '\r') {
      esc[1] = 'r';
    } else if (c == '\b') {
      esc[1] = 'b';
    } else if (c == '\f') {
      esc[1] = 'f';
    } else { /* other control bytes and DEL */
      memcpy(esc, "\\u00", 4);
      esc[4] = hex[c >> 4];
      esc[5] = hex[c & 15];
      en = 6;
    }
    if (en > cap - o) break;
    memcpy(out + o, esc, en);
    o += en;
    p += skip;
  }
  return o;
}

void wxd_log_timestamp(char *buf, size_t cap) {
  struct timeval tv;
  struct tm tm;
  gettimeofday(&tv, NULL);
  gmtime_r(&tv.tv_sec, &tm);
  size_t n = strftime(buf, cap, "%Y-%m-%dT%H:%M:%S", &tm);
  snprintf(buf + n, cap - n, ".%03dZ", (int)(tv.tv_usec / 1000));
}

void wxd_log(int level, int worker, const char *msg, const char *extra_json) {
  wxd_log_n(level, worker, msg, strlen(msg), extra_json);
}

void wxd_log_n(int level, int worker, const char *msg, size_t msg_len, const char *extra_json) {
  if (level < log_min_level) return;
  char line[16384];
  char ts[40];
  wxd_log_timestamp(ts, sizeof ts);
  size_t n = (size_t)snprintf(line, sizeof line, "{\"ts\":\"%s\",\"level\":\"%s\"", ts,
                              wxd_log_level_name(level));
  if (worker >= 0) n += (size_t)snprintf(line + n, sizeof line - n, ",\"worker\":%d", worker);
  n += (size_t)snprintf(line + n, sizeof line - n, ",\"msg\":\"");
  /* Leave room for the closing of the object and the extra fields. */
  size_t room = sizeof line - n - 8;
  size_t extra_len = extra_json ? strlen(extra_json) : 0;
  if (extra_len + 2 < room / 2) room -= extra_len + 2;
  else extra_len = 0; /* an oversized extra is dropped rather than cut in half */
  n += wxd_json_escape(line + n, room / 2, msg, msg_len);
  line[n++] = '"';
  if (extra_len) {
    line[n++] = ',';
    memcpy(line + n, extra_json, extra_len);
    n += extra_len;
  }
  line[n++] = '}';
  line[n++] = '\n';
  write_all(line, n);
}

void wxd_logf(int level, int worker, const char *fmt, ...) {
  if (level < log_min_level) return;
  char msg[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  wxd_log(level, worker, msg, NULL);
}

void wxd_logbuf_append(wxd_logbuf_t *b, const char *line, size_t len) {
  if (b->len + len > b->cap) {
    size_t cap = b->cap ? b->cap * 2 : 16384;
    while (cap < b->len + len) cap *= 2;
    char *p = realloc(b->data, cap);
    if (!p) { /* out of memory: write through instead of losing the line */
      wxd_logbuf_flush(b);
      write_all(line, len);
      return;
    }
    b->data = p;
    b->cap = cap;
  }
  memcpy(b->data + b->len, line, len);
  b->len += len;
  if (b->len >= 16384) wxd_logbuf_flush(b);
}

void wxd_logbuf_flush(wxd_logbuf_t *b) {
  if (b->len == 0) return;
  write_all(b->data, b->len);
  b->len = 0;
}

void wxd_logbuf_free(wxd_logbuf_t *b) {
  wxd_logbuf_flush(b);
  free(b->data);
  b->data = NULL;
  b->cap = 0;
}
