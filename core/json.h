/* json: JSON text to and from Lua values (RFC 8259).
 *
 * Lua sees this as the native module `wxd.core.json`; lua/wxd/json.lua is
 * the public API on top (wxd.json). It replaces lua-cjson inside wxd for
 * three reasons: a Lua table has no way to say "empty array" to cjson 2.1.0
 * (an empty list answered `{}`), cjson writes invalid UTF-8 through raw, and
 * its errors do not say where in the value the problem is.
 *
 * Encoding (raises on what has no JSON form, naming the place, e.g.
 * "wxd.json: cannot encode a function at $.items[2].cb"):
 *  - a table whose metatable is the array metatable is an array (empty: []);
 *    any other table is an array when all its keys are positive integers,
 *    an object when all are strings, and {} when it is empty. Holes in an
 *    array are null, unless the array is excessively sparse (largest index
 *    over 10 and over twice the number of items): that raises, as do other
 *    key types and tables that mix indexes and string keys.
 *  - strings as wxd_json_escape writes them (log.h): valid UTF-8 out for
 *    any input, "/" not escaped.
 *  - integers up to 2^63 in full; other numbers in the fewest digits that
 *    read back to the same double; NaN and infinities raise.
 *  - nil and the null lightuserdata (cjson.null) are null.
 *  - tables nested more than WXD_JSON_MAX_DEPTH deep raise (a table that
 *    contains itself ends there).
 *
 * Decoding (strict RFC 8259; expected failures return nil, "invalid json",
 * detail with the byte offset): objects are plain tables, arrays tables with
 * the array metatable (so [] encodes back as []), null is the null
 * lightuserdata. A UTF-8 byte order mark is skipped. Lone surrogate escapes
 * become U+FFFD; raw bytes in strings are kept as sent. Numbers read as
 * doubles: integers beyond 2^53 lose digits, numbers beyond the double range
 * are refused. Nesting deeper than WXD_JSON_MAX_DEPTH is refused.
 */
#ifndef WXD_JSON_H
#define WXD_JSON_H

#include <lua.h>

/* Deepest nesting of arrays and objects encoded or decoded. */
#define WXD_JSON_MAX_DEPTH 256

/* Lua module wxd.core.json: encode, decode, array_mt, null. */
int wxd_open_json(lua_State *L);

#endif
