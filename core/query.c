/* query: application/x-www-form-urlencoded parsing for wxd.app (query
 * strings and form bodies), exposed as wxd.core.http.parse_query.
 *
 * It runs on every request that looks at req.query (every WeChat callback
 * does), so it is one pass over the string with no intermediate Lua
 * strings: each name and value is decoded into a per-state scratch buffer
 * and interned once. The rules are those documented in wxd.app: '&'
 * separates pairs, the first '=' splits a pair, '+' is a space, a %XX
 * escape is decoded and an invalid one ("%zz", a lone '%') kept as it is,
 * pairs with an empty name are skipped, and parsing stops after max_params
 * pairs (counted whether or not their name is empty).
 */
#include <lauxlib.h>
#include <string.h>

#include "buf.h"
#include "query.h"

static int hexval(unsigned char c) {
  if (c >= '0' && c <= '9') return c - '0';
  c |= 0x20;
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

size_t wxd_query_decode(const char *s, size_t n, char *out, size_t cap) {
  size_t o = 0;
  for (size_t i = 0; i < n; i++, o++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '+') {
      c = ' ';
    } else if (c == '%' && i + 2 < n && hexval((unsigned char)s[i + 1]) >= 0 && hexval((unsigned char)s[i + 2]) >= 0) {
      c = (unsigned char)(hexval((unsigned char)s[i + 1]) * 16 + hexval((unsigned char)s[i + 2]));
      i += 2;
    }
    if (o < cap) out[o] = (char)c;
  }
  return o;
}

/* Pushes the decoded s[0..len), less `drop` trailing bytes of the decoded
 * form when it ends in "[]" (see wxd_query_parse). out has room for len
 * bytes: decoding never grows a string. */
static void push_decoded(lua_State *L, const char *s, size_t len, char *out, int drop_brackets) {
  if (!memchr(s, '%', len) && !memchr(s, '+', len)) {
    if (drop_brackets && len > 2 && s[len - 2] == '[' && s[len - 1] == ']') len -= 2;
    lua_pushlstring(L, s, len);
    return;
  }
  size_t o = wxd_query_decode(s, len, out, len);
  if (drop_brackets && o > 2 && out[o - 2] == '[' && out[o - 1] == ']') o -= 2;
  lua_pushlstring(L, out, o);
}

/* parse_query(s, all, max_params) -> table: name -> value (last wins), or
 * with all, name -> array of values in order; there a name ending in "[]"
 * once decoded ("a[]", "a%5B%5D") is stored without it, so that "a[]=1&a=2"
 * gives a = {"1", "2"} (PHP's and qs's array syntax read as repeats). */
int wxd_query_parse(lua_State *L) {
  size_t len = 0;
  const char *s = lua_isnoneornil(L, 1) ? "" : luaL_checklstring(L, 1, &len);
  int all = lua_toboolean(L, 2);
  lua_Integer max = luaL_checkinteger(L, 3);
  lua_createtable(L, 0, 8);
  if (len == 0) return 1;
  wxd_buf_t *b = wxd_scratch(L);
  if (wxd_buf_reserve(b, len) != 0) return luaL_error(L, "not enough memory");
  char *scratch = b->data;
  lua_Integer n = 0;
  size_t pos = 0;
  while (pos < len) {
    const char *amp = memchr(s + pos, '&', len - pos);
    size_t stop = amp ? (size_t)(amp - s) : len;
    if (stop > pos) {
      if (++n > max) break;
      const char *pair = s + pos;
      size_t plen = stop - pos;
      const char *eq = memchr(pair, '=', plen);
      size_t klen = eq ? (size_t)(eq - pair) : plen;
      if (klen > 0) {
        push_decoded(L, pair, klen, scratch, all);
        if (eq)
          push_decoded(L, eq + 1, plen - klen - 1, scratch, 0);
        else
          lua_pushliteral(L, "");
        if (all) {
          lua_pushvalue(L, -2);
          lua_rawget(L, -4);
          if (lua_istable(L, -1)) {
            lua_pushvalue(L, -2);
            lua_rawseti(L, -2, (int)lua_objlen(L, -2) + 1);
            lua_pop(L, 3);
          } else {
            lua_pop(L, 1);
            lua_createtable(L, 1, 0);
            lua_insert(L, -2);
            lua_rawseti(L, -2, 1);
            lua_rawset(L, -3);
          }
        } else {
          lua_rawset(L, -3);
        }
      }
    }
    if (!amp) break;
    pos = stop + 1;
  }
  wxd_scratch_release(b);
  return 1;
}
