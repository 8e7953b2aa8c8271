/* breaker: circuit breakers shared by every worker thread of the process.
 *
 * A breaker guards calls to one upstream (or anything with a name):
 *
 *   closed     calls pass; results are counted. It opens after `failures`
 *              consecutive failures, or when the failure rate over the last
 *              `window` seconds (ten slots) reaches `failure_rate` with at
 *              least `min_calls` calls in it.
 *   open       calls fail fast, the upstream is not called. After
 *              `cooldown` seconds the next call finds it half-open.
 *   half_open  at most `probes` calls pass at a time; `probes` successes
 *              close it, one failure opens it again.
 *
 * It also keeps a retry budget: each first attempt deposits `retry_ratio`
 * of a token (at most `retry_max` are kept) and each retry spends one, so
 * that retries add at most that ratio of extra calls to the upstream.
 *
 * Breakers live in a process-wide registry (like limit.c's): made on first
 * use by name, shared by every worker, kept across hot reloads, updated in
 * place when asked for again with other settings. State changes are logged
 * (warn when opening, info otherwise) and counted.
 *
 * Lua module wxd.core.breaker (lua/wxd/breaker.lua wraps it).
 */
#ifndef WXD_BREAKER_H
#define WXD_BREAKER_H

#include <lua.h>

int wxd_open_breaker(lua_State *L);

/* One breaker's state and counters, as GET /metrics shows them. */
typedef struct {
  const char *name;
  const char *state; /* "closed", "open" or "half_open" (open past its cooldown) */
  double calls, successes, failures, rejected, retries, retries_denied;
  double opened, half_opened, closed;
} wxd_breaker_usage_t;

/* Calls fn for every breaker of the process (the registry's mutex held:
 * fn must not call into breakers). */
void wxd_breaker_each(void (*fn)(void *arg, const wxd_breaker_usage_t *u), void *arg);

#endif
