/* query: application/x-www-form-urlencoded parsing (query strings and
 * form bodies) for wxd.app; see query.c for the rules. */
#ifndef WXD_QUERY_H
#define WXD_QUERY_H

#include <lua.h>
#include <stddef.h>

/* Decodes s[0..n) by the rules of query.c ('+' a space, a valid %XX its
 * byte, anything else itself); writes the first `cap` bytes of the result
 * to out and returns its whole length (at most n). */
size_t wxd_query_decode(const char *s, size_t n, char *out, size_t cap);

/* wxd.core.http.parse_query(s, all, max_params) -> table */
int wxd_query_parse(lua_State *L);

#endif
