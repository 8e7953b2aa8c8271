/* json: see json.h. */
#include "json.h"

#include <lauxlib.h>
#include <locale.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

/* Stack slots of encode() and decode(): the argument, then the array
 * metatable (a copy of upvalue 1), then, for encode, the buffer. */
#define ARG_SLOT 1
#define MT_SLOT 2
#define BUF_SLOT 3

/* cjson's rule, kept so that tables cjson encoded still encode: an array
 * may have holes (written as null) unless its largest index is over
 * SPARSE_SAFE and over SPARSE_RATIO times the number of items. */
#define SPARSE_SAFE 10
#define SPARSE_RATIO 2

/* A buffer larger than this is given back after the call, so that one big
 * response does not pin its size for the life of the Lua state. */
#define KEEP_BUFFER (256 * 1024)

/* The "C" locale for number formatting and parsing: a handler that calls
 * os.setlocale must not turn 1.5 into "1,5" for every thread. Created once,
 * never changed afterwards. */
static pthread_once_t c_locale_once = PTHREAD_ONCE_INIT;
static locale_t c_locale;

static void c_locale_init(void) { c_locale = newlocale(LC_ALL_MASK, "C", (locale_t)0); }

/* ---- encoding ---- */

/* The output buffer: a full userdata kept as an upvalue of encode, so that
 * an error raised half-way (longjmp) leaks nothing, and reused by the next
 * call. Nothing in encode calls Lua code, so no call can nest in another. */
typedef struct json_buf {
  char *data;
  size_t len, cap;
} json_buf_t;

static int buf_gc(lua_State *L) {
  json_buf_t *b = lua_touserdata(L, 1);
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
  return 0;
}

/* Where the encoder is, for error messages: per nesting level, either the
 * stack slot of the object key being written or the array index. */
typedef struct path_step {
  int key_slot; /* 0 for an array item */
  size_t index;
} path_step_t;

typedef struct encoder {
  lua_State *L;
  json_buf_t *b;
  int depth;
  path_step_t path[WXD_JSON_MAX_DEPTH + 1];
} encoder_t;

static void reserve(encoder_t *e, size_t n) {
  json_buf_t *b = e->b;
  if (b->cap - b->len >= n) return;
  size_t cap = b->cap ? b->cap : 1024;
  while (cap - b->len < n) {
    if (cap > SIZE_MAX / 2) luaL_error(e->L, "wxd.json: value too large to encode");
    cap *= 2;
  }
  char *p = realloc(b->data, cap);
  if (!p) luaL_error(e->L, "wxd.json: out of memory");
  b->data = p;
  b->cap = cap;
}

static void put(encoder_t *e, const char *s, size_t n) {
  reserve(e, n);
  memcpy(e->b->data + e->b->len, s, n);
  e->b->len += n;
}

static void put_char(encoder_t *e, char c) {
  reserve(e, 1);
  e->b->data[e->b->len++] = c;
}

/* Appends the path of the first `levels` steps, "$.a[2]["x y"]", to a
 * luaL_Buffer (at the top of the stack). Keys are shown in printable ASCII
 * and cut; long paths keep their first levels. */
static void add_path(encoder_t *e, int levels, luaL_Buffer *lb) {
  lua_State *L = e->L;
  luaL_addchar(lb, '$');
  int shown = levels < 12 ? levels : 12;
  for (int d = 1; d <= shown; d++) {
    path_step_t *st = &e->path[d];
    char tmp[48];
    if (!st->key_slot) {
      snprintf(tmp, sizeof tmp, "[%zu]", st->index);
      luaL_addstring(lb, tmp);
      continue;
    }
    size_t len;
    const char *k = lua_tolstring(L, st->key_slot, &len);
    int ident = len > 0 && len <= 40 && !(k[0] >= '0' && k[0] <= '9');
    for (size_t i = 0; ident && i < len; i++) {
      unsigned char c = (unsigned char)k[i];
      if (!(c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))) ident = 0;
    }
    if (ident) {
      luaL_addchar(lb, '.');
      luaL_addlstring(lb, k, len);
      continue;
    }
    luaL_addstring(lb, "[\"");
    for (size_t i = 0; i < len && i < 32; i++) {
      unsigned char c = (unsigned char)k[i];
      if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
        luaL_addchar(lb, (char)c);
      } else {
        snprintf(tmp, sizeof tmp, "\\x%02x", c);
        luaL_addstring(lb, tmp);
      }
    }
    luaL_addstring(lb, len > 32 ? "...\"]" : "\"]");
  }
  if (shown < levels) luaL_addstring(lb, "...");
}

/* Raises "wxd.json: <what> at <path><hint>". The path is that of the value
 * being written in the innermost open table, or, with `of_table`, that of
 * the innermost table itself. */
static void fail(encoder_t *e, int of_table, const char *what, const char *hint) {
  lua_State *L = e->L;
  luaL_checkstack(L, LUA_MINSTACK, "wxd.json: nested too deep"); /* room for the buffer */
  luaL_Buffer lb;
  luaL_buffinit(L, &lb);
  luaL_addstring(&lb, "wxd.json: ");
  luaL_addstring(&lb, what);
  luaL_addstring(&lb, " at ");
  add_path(e, of_table ? e->depth - 1 : e->depth, &lb);
  if (hint) luaL_addstring(&lb, hint);
  luaL_pushresult(&lb);
  lua_error(L);
}

static void encode_string(encoder_t *e, int idx) {
  size_t len;
  const char *s = lua_tolstring(e->L, idx, &len);
  if (len > (SIZE_MAX - 2) / 6) luaL_error(e->L, "wxd.json: string too large to encode");
  reserve(e, len * 6 + 2);
  json_buf_t *b = e->b;
  b->data[b->len++] = '"';
  b->len += wxd_json_escape(b->data + b->len, len * 6, s, len);
  b->data[b->len++] = '"';
}

/* Integers are exact up to 2^63; everything else gets the shortest of
 * %.15g, %.16g and %.17g that reads back to the same double. */
static void encode_number(encoder_t *e, lua_Number d) {
  if (!isfinite(d)) fail(e, 0, "cannot encode NaN or infinity", NULL);
  char tmp[40];
  size_t n;
  if (d == floor(d) && d > -9223372036854775808.0 && d < 9223372036854775808.0) {
    long long v = (long long)d;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    char *p = tmp + sizeof tmp;
    do {
      *--p = (char)('0' + u % 10);
      u /= 10;
    } while (u);
    if (v < 0) *--p = '-';
    put(e, p, (size_t)(tmp + sizeof tmp - p));
    return;
  }
  pthread_once(&c_locale_once, c_locale_init);
  locale_t old = c_locale ? uselocale(c_locale) : (locale_t)0;
  n = 0;
  for (int prec = 15; prec <= 17; prec++) {
    n = (size_t)snprintf(tmp, sizeof tmp, "%.*g", prec, d);
    if (strtod(tmp, NULL) == d) break;
  }
  if (c_locale) uselocale(old);
  put(e, tmp, n);
}

static void encode_value(encoder_t *e, int idx);

/* Raises for a key that has no place in the JSON array or object being
 * written (`in_array`: an array, `marked`: by the array metatable). */
static void fail_key(encoder_t *e, int key_slot, int in_array, int marked) {
  lua_State *L = e->L;
  char what[160];
  int t = lua_type(L, key_slot);
  const char *hint = NULL;
  if (t == LUA_TSTRING && marked) {
    snprintf(what, sizeof what, "cannot encode an array (json.array) with string keys");
  } else if (t == LUA_TSTRING || (t == LUA_TNUMBER && !in_array && lua_tonumber(L, key_slot) >= 1 &&
                                  lua_tonumber(L, key_slot) == floor(lua_tonumber(L, key_slot)))) {
    snprintf(what, sizeof what, "cannot encode a table with both array items and string keys");
  } else if (t == LUA_TNUMBER) {
    snprintf(what, sizeof what, "cannot encode a table with the key %.14g", lua_tonumber(L, key_slot));
    hint = ": array indexes are 1, 2, ...; use string keys for an object";
  } else {
    snprintf(what, sizeof what, "cannot encode a table with a %s key", luaL_typename(L, key_slot));
  }
  fail(e, 1, what, hint);
}

static int is_index(lua_State *L, int idx, double *k) {
  if (lua_type(L, idx) != LUA_TNUMBER) return 0;
  *k = lua_tonumber(L, idx);
  return *k >= 1 && *k == floor(*k);
}

static void encode_array(encoder_t *e, int idx, int marked) {
  lua_State *L = e->L;
  size_t count = 0;
  double max = 0, k = 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    if (!is_index(L, -1, &k)) fail_key(e, lua_gettop(L), 1, marked);
    count++;
    if (k > max) max = k;
  }
  if (max > SPARSE_SAFE && max > SPARSE_RATIO * (double)count) {
    char what[120];
    snprintf(what, sizeof what, "cannot encode an excessively sparse array (largest index %.14g, %zu items)", max,
             count);
    fail(e, 1, what, ": fill the gaps, or use string keys for an object");
  }
  size_t n = (size_t)max;
  put_char(e, '[');
  path_step_t *st = &e->path[e->depth];
  st->key_slot = 0;
  for (size_t i = 1; i <= n; i++) {
    if (i > 1) put_char(e, ',');
    st->index = i;
    lua_rawgeti(L, idx, (int)i);
    encode_value(e, lua_gettop(L));
    lua_pop(L, 1);
  }
  put_char(e, ']');
}

/* An object, from the first key and value lua_next gave (on the stack). */
static void encode_object(encoder_t *e, int idx) {
  lua_State *L = e->L;
  path_step_t *st = &e->path[e->depth];
  put_char(e, '{');
  int first = 1;
  do {
    int key = lua_gettop(L) - 1;
    if (lua_type(L, key) != LUA_TSTRING) fail_key(e, key, 0, 0);
    if (!first) put_char(e, ',');
    first = 0;
    encode_string(e, key);
    put_char(e, ':');
    st->key_slot = key;
    encode_value(e, key + 1);
    lua_pop(L, 1);
  } while (lua_next(L, idx));
  put_char(e, '}');
}

static void encode_table(encoder_t *e, int idx) {
  lua_State *L = e->L;
  if (e->depth >= WXD_JSON_MAX_DEPTH)
    luaL_error(L, "wxd.json: cannot encode tables nested deeper than %d levels (does a table contain itself?)",
               WXD_JSON_MAX_DEPTH);
  luaL_checkstack(L, 6, "wxd.json: nested too deep");
  int marked = 0;
  if (lua_getmetatable(L, idx)) {
    marked = lua_rawequal(L, -1, MT_SLOT);
    lua_pop(L, 1);
  }
  e->depth++;
  lua_pushnil(L);
  if (!lua_next(L, idx)) {
    put(e, marked ? "[]" : "{}", 2);
  } else {
    double k;
    if (marked || is_index(L, -2, &k)) {
      lua_pop(L, 2);
      encode_array(e, idx, marked);
    } else {
      encode_object(e, idx);
    }
  }
  e->depth--;
}

static void encode_value(encoder_t *e, int idx) {
  lua_State *L = e->L;
  switch (lua_type(L, idx)) {
  case LUA_TNIL:
    put(e, "null", 4);
    return;
  case LUA_TBOOLEAN:
    if (lua_toboolean(L, idx)) put(e, "true", 4);
    else put(e, "false", 5);
    return;
  case LUA_TNUMBER:
    encode_number(e, lua_tonumber(L, idx));
    return;
  case LUA_TSTRING:
    encode_string(e, idx);
    return;
  case LUA_TTABLE:
    encode_table(e, idx);
    return;
  case LUA_TLIGHTUSERDATA:
    if (lua_touserdata(L, idx) == NULL) {
      put(e, "null", 4);
      return;
    }
    break;
  default:
    break;
  }
  char what[64];
  snprintf(what, sizeof what, "cannot encode a %s", luaL_typename(L, idx));
  fail(e, 0, what, NULL);
}

/* encode(value) -> string; raises on a value that has no JSON form. */
static int json_encode(lua_State *L) {
  luaL_checkany(L, ARG_SLOT);
  lua_settop(L, ARG_SLOT);
  lua_pushvalue(L, lua_upvalueindex(1));
  lua_pushvalue(L, lua_upvalueindex(2));
  encoder_t e;
  e.L = L;
  e.b = lua_touserdata(L, BUF_SLOT);
  e.b->len = 0;
  e.depth = 0;
  encode_value(&e, ARG_SLOT);
  lua_pushlstring(L, e.b->data, e.b->len);
  if (e.b->cap > KEEP_BUFFER) {
    free(e.b->data);
    e.b->data = NULL;
    e.b->cap = 0;
  }
  e.b->len = 0;
  return 1;
}

/* ---- decoding ---- */

typedef struct decoder {
  lua_State *L;
  const char *start, *p, *end;
  int depth;
  char err[96]; /* the detail of a failure */
} decoder_t;

/* Records why decoding stopped and what was found at the current byte;
 * returns -1. */
static int derr(decoder_t *d, const char *what) {
  size_t at = (size_t)(d->p - d->start) + 1;
  if (d->p >= d->end) {
    snprintf(d->err, sizeof d->err, "%s at byte %zu (found the end)", what, at);
  } else {
    unsigned char c = (unsigned char)*d->p;
    if (c > 0x20 && c < 0x7f)
      snprintf(d->err, sizeof d->err, "%s at byte %zu (found '%c')", what, at, c);
    else
      snprintf(d->err, sizeof d->err, "%s at byte %zu (found byte 0x%02x)", what, at, c);
  }
  return -1;
}

/* The same, without the byte. */
static int derr_at(decoder_t *d, const char *what, const char *where) {
  snprintf(d->err, sizeof d->err, "%s at byte %zu", what, (size_t)(where - d->start) + 1);
  return -1;
}

static void skip_space(decoder_t *d) {
  while (d->p < d->end && (*d->p == ' ' || *d->p == '\t' || *d->p == '\n' || *d->p == '\r')) d->p++;
}

static int decode_value(decoder_t *d);

static int hex4(const char *p, unsigned *out) {
  unsigned v = 0;
  for (int i = 0; i < 4; i++) {
    char c = p[i];
    v <<= 4;
    if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
    else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
    else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
    else return -1;
  }
  *out = v;
  return 0;
}

static void add_utf8(luaL_Buffer *lb, unsigned cp) {
  char u[4];
  size_t n;
  if (cp < 0x80) {
    u[0] = (char)cp;
    n = 1;
  } else if (cp < 0x800) {
    u[0] = (char)(0xc0 | (cp >> 6));
    u[1] = (char)(0x80 | (cp & 0x3f));
    n = 2;
  } else if (cp < 0x10000) {
    u[0] = (char)(0xe0 | (cp >> 12));
    u[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
    u[2] = (char)(0x80 | (cp & 0x3f));
    n = 3;
  } else {
    u[0] = (char)(0xf0 | (cp >> 18));
    u[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    u[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    u[3] = (char)(0x80 | (cp & 0x3f));
    n = 4;
  }
  luaL_addlstring(lb, u, n);
}

/* A string (d->p at its opening quote), pushed. */
static int decode_string(decoder_t *d) {
  lua_State *L = d->L;
  const char *p = ++d->p, *end = d->end;
  /* Most strings have no escape: one copy straight from the input. */
  while (p < end && *p != '"' && *p != '\\' && (unsigned char)*p >= 0x20) p++;
  if (p < end && *p == '"') {
    lua_pushlstring(L, d->p, (size_t)(p - d->p));
    d->p = p + 1;
    return 0;
  }
  if (!lua_checkstack(L, LUA_MINSTACK)) return derr_at(d, "out of stack", d->p);
  luaL_Buffer lb;
  luaL_buffinit(L, &lb);
  luaL_addlstring(&lb, d->p, (size_t)(p - d->p));
  d->p = p;
  for (;;) {
    if (d->p >= end) return derr(d, "unterminated string");
    unsigned char c = (unsigned char)*d->p;
    if (c == '"') break;
    if (c < 0x20) return derr(d, "control character in a string");
    if (c != '\\') {
      const char *run = d->p;
      while (d->p < end && *d->p != '"' && *d->p != '\\' && (unsigned char)*d->p >= 0x20) d->p++;
      luaL_addlstring(&lb, run, (size_t)(d->p - run));
      continue;
    }
    if (++d->p >= end) return derr(d, "unterminated string");
    switch (*d->p) {
    case '"': luaL_addchar(&lb, '"'); break;
    case '\\': luaL_addchar(&lb, '\\'); break;
    case '/': luaL_addchar(&lb, '/'); break;
    case 'b': luaL_addchar(&lb, '\b'); break;
    case 'f': luaL_addchar(&lb, '\f'); break;
    case 'n': luaL_addchar(&lb, '\n'); break;
    case 'r': luaL_addchar(&lb, '\r'); break;
    case 't': luaL_addchar(&lb, '\t'); break;
    case 'u': {
      unsigned cp;
      if (end - d->p < 5 || hex4(d->p + 1, &cp) != 0) return derr(d, "invalid \\u escape");
      d->p += 4;
      if (cp >= 0xd800 && cp <= 0xdbff) {
        unsigned lo;
        if (end - d->p >= 7 && d->p[1] == '\\' && d->p[2] == 'u' && hex4(d->p + 3, &lo) == 0 && lo >= 0xdc00 &&
            lo <= 0xdfff) {
          cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
          d->p += 6;
        } else {
          cp = 0xfffd; /* a lone high surrogate */
        }
      } else if (cp >= 0xdc00 && cp <= 0xdfff) {
        cp = 0xfffd; /* a lone low surrogate */
      }
      add_utf8(&lb, cp);
      break;
    }
    default:
      return derr(d, "invalid escape");
    }
    d->p++;
  }
  d->p++;
  luaL_pushresult(&lb);
  return 0;
}

static int decode_number(decoder_t *d) {
  const char *p = d->p, *end = d->end, *s = p;
  int integer = 1;
  if (p < end && *p == '-') p++;
  const char *digits = p;
  if (p < end && *p == '0') {
    p++;
  } else if (p < end && *p >= '1' && *p <= '9') {
    while (p < end && *p >= '0' && *p <= '9') p++;
  } else {
    d->p = p;
    return derr(d, "invalid number");
  }
  size_t ndigits = (size_t)(p - digits);
  if (p < end && *p == '.') {
    integer = 0;
    if (++p >= end || *p < '0' || *p > '9') {
      d->p = p;
      return derr(d, "invalid number");
    }
    while (p < end && *p >= '0' && *p <= '9') p++;
  }
  if (p < end && (*p == 'e' || *p == 'E')) {
    integer = 0;
    p++;
    if (p < end && (*p == '+' || *p == '-')) p++;
    if (p >= end || *p < '0' || *p > '9') {
      d->p = p;
      return derr(d, "invalid number");
    }
    while (p < end && *p >= '0' && *p <= '9') p++;
  }
  double v;
  if (integer && ndigits <= 15) { /* exact in a double */
    int64_t n = 0;
    for (const char *q = digits; q < p; q++) n = n * 10 + (*q - '0');
    v = (double)(*s == '-' ? -n : n);
    if (*s == '-' && n == 0) v = -0.0;
  } else {
    char tmp[64];
    char *buf = tmp;
    size_t len = (size_t)(p - s);
    if (len >= sizeof tmp) {
      buf = malloc(len + 1);
      if (!buf) return derr_at(d, "out of memory", s);
    }
    memcpy(buf, s, len);
    buf[len] = '\0';
    pthread_once(&c_locale_once, c_locale_init);
    v = c_locale ? strtod_l(buf, NULL, c_locale) : strtod(buf, NULL);
    if (buf != tmp) free(buf);
    if (!isfinite(v)) return derr_at(d, "number out of range", s);
  }
  lua_pushnumber(d->L, v);
  d->p = p;
  return 0;
}

static int literal(decoder_t *d, const char *word, size_t n) {
  if ((size_t)(d->end - d->p) < n || memcmp(d->p, word, n) != 0) return derr(d, "invalid literal");
  d->p += n;
  return 0;
}

static int enter(decoder_t *d) {
  if (d->depth >= WXD_JSON_MAX_DEPTH || !lua_checkstack(d->L, 4)) {
    char what[48];
    snprintf(what, sizeof what, "nested deeper than %d levels", WXD_JSON_MAX_DEPTH);
    return derr_at(d, what, d->p);
  }
  d->depth++;
  d->p++;
  lua_newtable(d->L);
  return 0;
}

static int decode_array(decoder_t *d) {
  if (enter(d) != 0) return -1;
  lua_State *L = d->L;
  lua_pushvalue(L, MT_SLOT);
  lua_setmetatable(L, -2);
  skip_space(d);
  if (d->p < d->end && *d->p == ']') {
    d->p++;
    d->depth--;
    return 0;
  }
  for (int i = 1;; i++) {
    if (decode_value(d) != 0) return -1;
    lua_rawseti(L, -2, i);
    skip_space(d);
    if (d->p < d->end && *d->p == ',') {
      d->p++;
      continue;
    }
    if (d->p < d->end && *d->p == ']') break;
    return derr(d, "expected ',' or ']'");
  }
  d->p++;
  d->depth--;
  return 0;
}

static int decode_object(decoder_t *d) {
  if (enter(d) != 0) return -1;
  lua_State *L = d->L;
  skip_space(d);
  if (d->p < d->end && *d->p == '}') {
    d->p++;
    d->depth--;
    return 0;
  }
  for (;;) {
    skip_space(d);
    if (d->p >= d->end || *d->p != '"') return derr(d, "expected a string key");
    if (decode_string(d) != 0) return -1;
    skip_space(d);
    if (d->p >= d->end || *d->p != ':') return derr(d, "expected ':'");
    d->p++;
    if (decode_value(d) != 0) return -1;
    lua_rawset(L, -3);
    skip_space(d);
    if (d->p < d->end && *d->p == ',') {
      d->p++;
      continue;
    }
    if (d->p < d->end && *d->p == '}') break;
    return derr(d, "expected ',' or '}'");
  }
  d->p++;
  d->depth--;
  return 0;
}

static int decode_value(decoder_t *d) {
  skip_space(d);
  if (d->p >= d->end) return derr(d, "expected a value");
  switch (*d->p) {
  case '{': return decode_object(d);
  case '[': return decode_array(d);
  case '"': return decode_string(d);
  case 't':
    if (literal(d, "true", 4) != 0) return -1;
    lua_pushboolean(d->L, 1);
    return 0;
  case 'f':
    if (literal(d, "false", 5) != 0) return -1;
    lua_pushboolean(d->L, 0);
    return 0;
  case 'n':
    if (literal(d, "null", 4) != 0) return -1;
    lua_pushlightuserdata(d->L, NULL);
    return 0;
  default:
    if (*d->p == '-' || (*d->p >= '0' && *d->p <= '9')) return decode_number(d);
    return derr(d, "expected a value");
  }
}

/* decode(text) -> value, or nil, "invalid json", detail. */
static int json_decode(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, ARG_SLOT, &len);
  lua_settop(L, ARG_SLOT);
  lua_pushvalue(L, lua_upvalueindex(1));
  decoder_t d;
  d.L = L;
  d.start = d.p = s;
  d.end = s + len;
  d.depth = 0;
  d.err[0] = '\0';
  if (len >= 3 && memcmp(s, "\xef\xbb\xbf", 3) == 0) d.p += 3;
  int rc = decode_value(&d);
  if (rc == 0) {
    skip_space(&d);
    if (d.p < d.end) rc = derr(&d, "more after the value");
  }
  if (rc != 0) {
    lua_settop(L, MT_SLOT);
    lua_pushnil(L);
    lua_pushliteral(L, "invalid json");
    lua_pushstring(L, d.err);
    return 3;
  }
  return 1;
}

int wxd_open_json(lua_State *L) {
  lua_createtable(L, 0, 4);

  lua_createtable(L, 0, 1); /* the array metatable */
  lua_pushliteral(L, "wxd.json.array");
  lua_setfield(L, -2, "__name");

  lua_pushvalue(L, -1);
  json_buf_t *b = lua_newuserdata(L, sizeof *b);
  memset(b, 0, sizeof *b);
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, buf_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  lua_pushcclosure(L, json_encode, 2);
  lua_setfield(L, -3, "encode");

  lua_pushvalue(L, -1);
  lua_pushcclosure(L, json_decode, 1);
  lua_setfield(L, -3, "decode");

  lua_setfield(L, -2, "array_mt");
  lua_pushlightuserdata(L, NULL);
  lua_setfield(L, -2, "null");
  return 1;
}
