/* logtext: the human-readable form of a JSON log line, for `wxd dev` and
 * WXD_LOG_FORMAT=text:
 *
 *   22:17:03.842 ERROR w0 handler error id=... method=GET path=/x
 *     error:
 *       app.lua:3: boom
 *       stack traceback:
 *       ...
 *
 * Time (UTC), level, worker and message first, then the other fields as
 * key=value (values with spaces keep their JSON quotes); a string field
 * holding newlines (a traceback) comes below on lines of its own.
 */
#ifndef WXD_LOGTEXT_H
#define WXD_LOGTEXT_H

#include <stddef.h>

/* Converts one JSON log line (without its '\n', as core/log.c writes them)
 * into buf. Returns the length written (ending in '\n'), or 0 when the line
 * is not a flat JSON object of ours or the text does not fit in cap: the
 * caller then writes the JSON line as it is. */
size_t wxd_log_text(const char *json, size_t len, char *buf, size_t cap);

#endif
