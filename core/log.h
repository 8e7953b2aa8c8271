/* log: structured JSON-lines logging to stderr.
 *
 * Every line is one JSON object written with a single write(2) under a
 * process-wide mutex, so lines from different worker threads never interleave.
 * Access-log lines are buffered per worker (wxd_logbuf_t) and flushed by the
 * worker's tick timer, so a busy worker does not pay a syscall per request.
 * With WXD_LOG_FORMAT=text in the environment, each line is written for a
 * human instead: "ts LEVEL [wN] msg key=value ...", and string values that
 * hold line breaks (tracebacks) below it, indented.
 */
#ifndef WXD_LOG_H
#define WXD_LOG_H

#include <stddef.h>

enum wxd_log_level { WXD_LOG_DEBUG = 0, WXD_LOG_INFO, WXD_LOG_WARN, WXD_LOG_ERROR };

/* Minimum level written; set once at start-up before threads run. */
void wxd_log_set_level(int level);
int wxd_log_level(void);
/* 1: write lines as text for people (core/logtext.h) instead of JSON;
 * `wxd dev` and WXD_LOG_FORMAT=text. Set once at start-up. */
void wxd_log_set_text_format(int on);
/* Parses "debug".."error"; returns -1 when unknown. */
int wxd_log_parse_level(const char *name);
const char *wxd_log_level_name(int level);

/* Writes {"ts":..,"level":..,"worker":..,"msg":..<,extra>}. `extra_json` is
 * either NULL or the inside of a JSON object ("\"k\":1,\"j\":\"v\""), already
 * escaped by the caller. worker < 0 omits the field. */
void wxd_log(int level, int worker, const char *msg, const char *extra_json);
/* The same with a message of msg_len bytes (it may hold NULs). */
void wxd_log_n(int level, int worker, const char *msg, size_t msg_len, const char *extra_json);
/* printf-style message, no extra fields. */
void wxd_logf(int level, int worker, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Appends `s` (len bytes) to `out` as the body of a JSON string (no quotes),
 * so that the line stays valid JSON in valid UTF-8 whatever `s` holds:
 * well-formed UTF-8 is copied; each maximal ill-formed piece of it (a stray
 * 8-bit byte, an overlong form, a surrogate, a cut sequence) becomes the
 * escape \ufffd (U+FFFD, the replacement character); quote, backslash,
 * control bytes and DEL are escaped. Returns the number of bytes written,
 * never more than `cap` (6 * len always suffices); output is truncated on a
 * character boundary when it does not fit. */
size_t wxd_json_escape(char *out, size_t cap, const char *s, size_t len);

/* ISO-8601 UTC timestamp with milliseconds into buf (>= 32 bytes). */
void wxd_log_timestamp(char *buf, size_t cap);

/* A growable per-worker buffer of complete lines. */
typedef struct wxd_logbuf {
  char *data;
  size_t len;
  size_t cap;
} wxd_logbuf_t;

/* Appends one complete line (must end in '\n'); flushes when large. */
void wxd_logbuf_append(wxd_logbuf_t *b, const char *line, size_t len);
void wxd_logbuf_flush(wxd_logbuf_t *b);
void wxd_logbuf_free(wxd_logbuf_t *b);

#endif
