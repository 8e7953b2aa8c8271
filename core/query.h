/* query: application/x-www-form-urlencoded parsing (query strings and
 * form bodies) for wxd.app; see query.c for the rules. */
#ifndef WXD_QUERY_H
#define WXD_QUERY_H

#include <lua.h>

/* wxd.core.http.parse_query(s, all, max_params) -> table */
int wxd_query_parse(lua_State *L);

#endif
