/* libFuzzer target: the JSON string escaper (core/log.c) and the JSON
 * decoder and encoder (core/json.c).
 *
 * Checked beyond "no memory error":
 *  - wxd_json_escape of the input, with a capacity taken from its first
 *    byte, writes at most that many bytes, all valid UTF-8 with no raw
 *    control byte, and every quote and backslash is escaped; what it wrote
 *    decodes as a JSON string.
 *  - when the decoder accepts the input, the encoder accepts its value, and
 *    after one round (which repairs invalid UTF-8) encoding is a fixed
 *    point: decode(encode(v)) has the same shape and values as v.
 */
#include <lauxlib.h>
#include <lualib.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "log.h"

/* An independent check of well-formed UTF-8 (Unicode table 3-7). */
static int valid_utf8(const unsigned char *p, size_t n) {
  size_t i = 0;
  while (i < n) {
    unsigned c = p[i];
    size_t k;
    unsigned cp;
    if (c < 0x80) {
      i++;
      continue;
    } else if ((c & 0xe0) == 0xc0) {
      k = 2, cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      k = 3, cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      k = 4, cp = c & 0x07;
    } else {
      return 0;
    }
    if (i + k > n) return 0;
    for (size_t j = 1; j < k; j++) {
      if ((p[i + j] & 0xc0) != 0x80) return 0;
      cp = (cp << 6) | (p[i + j] & 0x3f);
    }
    static const unsigned min[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min[k] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
    i += k;
  }
  return 1;
}

static lua_State *L;
static int encode_ref, decode_ref;

/* Lua memory from malloc, so that LeakSanitizer sees the pointers kept in
 * it (the encoder's reused buffer lives in a userdata). */
static void *lua_malloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  (void)ud, (void)osize;
  if (nsize == 0) {
    free(ptr);
    return NULL;
  }
  return realloc(ptr, nsize);
}

static void setup(void) {
  L = lua_newstate(lua_malloc, NULL);
  if (!L) abort();
  luaL_openlibs(L);
  wxd_open_json(L);
  lua_getfield(L, -1, "encode");
  encode_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_getfield(L, -1, "decode");
  decode_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pop(L, 1);
}

/* decode(s): the value on the stack and 1, or nothing and 0. */
static int decode(const char *s, size_t n) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, decode_ref);
  lua_pushlstring(L, s, n);
  if (lua_pcall(L, 1, 2, 0) != 0) abort(); /* decode never raises on a string */
  int ok = lua_isnil(L, -1);                /* no error string */
  lua_pop(L, ok ? 1 : 2);
  return ok;
}

/* encode(value at the top): replaces it with the text; aborts on error. */
static void encode(void) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, encode_ref);
  lua_insert(L, -2);
  if (lua_pcall(L, 1, 1, 0) != 0) abort(); /* a decoded value always encodes */
}

static int same(int a, int b, int depth) {
  if (lua_type(L, a) != lua_type(L, b)) return 0;
  switch (lua_type(L, a)) {
  case LUA_TTABLE: {
    if (depth > WXD_JSON_MAX_DEPTH + 1) return 0;
    int ma = lua_getmetatable(L, a), mb = lua_getmetatable(L, b);
    if (ma != mb) return 0;
    lua_pop(L, ma + mb);
    size_t na = 0, nb = 0;
    lua_pushnil(L);
    while (lua_next(L, a)) {
      na++;
      lua_pushvalue(L, -2);
      lua_rawget(L, b);
      int ok = same(lua_gettop(L) - 1, lua_gettop(L), depth + 1);
      lua_pop(L, 2);
      if (!ok) {
        lua_pop(L, 1);
        return 0;
      }
    }
    lua_pushnil(L);
    while (lua_next(L, b)) {
      nb++;
      lua_pop(L, 1);
    }
    return na == nb;
  }
  default:
    return lua_rawequal(L, a, b);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!L) setup();
  if (size < 1) return 0;

  /* The escaper. */
  size_t cap = (size_t)data[0] * 8;
  const char *in = (const char *)data + 1;
  size_t len = size - 1;
  char *out = malloc(cap + 2);
  size_t n = wxd_json_escape(out + 1, cap, in, len);
  if (n > cap) abort();
  if (!valid_utf8((unsigned char *)out + 1, n)) abort();
  for (size_t i = 1; i <= n; i++) {
    unsigned char c = (unsigned char)out[i];
    if (c < 0x20) abort();
    if (c == '\\') {
      i++; /* the escaped character */
      if (i > n) abort(); /* never cut inside an escape */
    } else if (c == '"') {
      abort();
    }
  }
  if (cap >= len * 6 && n < len) abort(); /* nothing lost when it fits */
  out[0] = '"';
  out[n + 1] = '"';
  if (!decode(out, n + 2)) abort();
  lua_pop(L, 1);
  free(out);

  /* The decoder and the encoder. */
  int top = lua_gettop(L);
  if (decode((const char *)data, size)) {
    encode();
    size_t elen;
    const char *e1 = lua_tolstring(L, -1, &elen);
    if (!valid_utf8((const unsigned char *)e1, elen)) abort();
    if (!decode(e1, elen)) abort();
    int v2 = lua_gettop(L);
    lua_pushvalue(L, v2);
    encode();
    size_t e2len;
    const char *e2 = lua_tolstring(L, -1, &e2len);
    if (!decode(e2, e2len)) abort();
    if (!same(v2, lua_gettop(L), 0)) abort();
  }
  lua_settop(L, top);
  return 0;
}
