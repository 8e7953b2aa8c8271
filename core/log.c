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

static void write_all(const char *p, size_t len) {
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

size_t wxd_json_escape(char *out, size_t cap, const char *s, size_t len) {
  static const char hex[] = "0123456789abcdef";
  size_t o = 0;
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    char esc[7];
    size_t n;
    if (c == '"' || c == '\\') {
      esc[0] = '\\';
      esc[1] = (char)c;
      n = 2;
    } else if (c == '\n') {
      memcpy(esc, "\\n", 2);
      n = 2;
    } else if (c == '\t') {
      memcpy(esc, "\\t", 2);
      n = 2;
    } else if (c == '\r') {
      memcpy(esc, "\\r", 2);
      n = 2;
    } else if (c < 0x20 || c == 0x7f) {
      memcpy(esc, "\\u00", 4);
      esc[4] = hex[c >> 4];
      esc[5] = hex[c & 15];
      n = 6;
    } else {
      esc[0] = (char)c;
      n = 1;
    }
    if (o + n > cap) break;
    memcpy(out + o, esc, n);
    o += n;
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
  n += wxd_json_escape(line + n, room / 2, msg, strlen(msg));
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
