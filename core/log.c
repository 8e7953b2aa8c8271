/* log: see log.h. */
#include "log.h"
#include "logtext.h"

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

/* Text format (`wxd dev`, WXD_LOG_FORMAT=text): lines are built as JSON
 * and turned into text just before the write (core/logtext.h), so every
 * writer of log lines gets it. Set before threads start. */
static int log_text_format;

void wxd_log_set_text_format(int on) { log_text_format = on; }

static void write_all(const char *p, size_t len) {
  if (!log_text_format) {
    write_raw(p, len);
    return;
  }
  size_t lines = 1;
  for (size_t i = 0; i < len; i++) lines += p[i] == '\n';
  /* An escaped newline ("\n", 2 bytes) becomes a newline and an indent of 4. */
  size_t cap = 3 * len + 256 * lines;
  char *buf = malloc(cap);
  if (!buf) {
    write_raw(p, len);
    return;
  }
  size_t o = 0;
  for (size_t i = 0; i < len;) {
    const char *nl = memchr(p + i, '\n', len - i);
    size_t ll = nl ? (size_t)(nl - (p + i)) : len - i;
    size_t n = wxd_log_text(p + i, ll, buf + o, cap - o);
    if (n == 0) { /* not ours, or too long: as it is */
      memcpy(buf + o, p + i, ll);
      n = ll;
      buf[o + n++] = '\n';
    }
    o += n;
    i += ll + 1;
  }
  write_raw(buf, o);
  free(buf);
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
