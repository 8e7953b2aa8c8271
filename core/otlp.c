/* otlp: the OTLP/HTTP JSON body for a batch of spans (wxd.core.otlp.encode),
 * written straight into a buffer. lua/wxd/otlp.lua built tables for
 * wxd.json.encode before: about 32000 instructions per span, the largest
 * cost of exporting; this writes the same JSON for a fraction of it.
 *
 * A span is the table wxd.trace records: trace_id, span_id, parent_id
 * (nil for a root), name, kind, start_s, end_s (seconds), error, attrs
 * (name -> string, number or boolean; other values are left out).
 */
#include <lauxlib.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "buf.h"
#include "log.h"
#include "otlp.h"

/* The body being written; `bad` once an allocation failed (then nothing
 * more is written and the encoder raises). */
typedef struct {
  wxd_buf_t b;
  int bad;
} out_t;

#define OUT_MT "wxd.otlp.out"

static int out_gc(lua_State *L) {
  out_t *o = luaL_checkudata(L, 1, OUT_MT);
  wxd_buf_free(&o->b);
  return 0;
}

static void put(out_t *o, const char *s, size_t n) {
  if (!o->bad && wxd_buf_append(&o->b, s, n) != 0) o->bad = 1;
}

#define PUTS(o, lit) put(o, lit, sizeof lit - 1)

/* A JSON string: escaped, valid UTF-8 whatever the bytes (wxd_json_escape). */
static void put_string(out_t *o, const char *s, size_t n) {
  if (o->bad) return;
  if (n > (SIZE_MAX - 2) / 6 || wxd_buf_reserve(&o->b, n * 6 + 2) != 0) {
    o->bad = 1;
    return;
  }
  wxd_buf_t *b = &o->b;
  b->data[b->len++] = '"';
  b->len += wxd_json_escape(b->data + b->len, n * 6, s, n);
  b->data[b->len++] = '"';
}

/* Decimal digits of an integral double below 2^63 (printf's %.0f takes
 * the multi-precision route for numbers this large: most of the encoder's
 * time). Fractions round to the nearest; out of range is written as 0. */
static size_t put_integral(char *out, double d) {
  double r = d < 0 ? -d : d;
  if (!(r < 9223372036854775808.0)) r = 0;
  uint64_t u = (uint64_t)(r + 0.5);
  size_t o = 0;
  if (d < 0 && u != 0) out[o++] = '-';
  char tmp[24];
  size_t n = 0;
  do tmp[n++] = (char)('0' + u % 10); while (u /= 10);
  while (n) out[o++] = tmp[--n];
  return o;
}

/* One attribute (key at k, value at index vi); returns 0 when the value's
 * type has no OTLP form and nothing was written. */
static int put_attr(out_t *o, const char *k, size_t kl, lua_State *L, int vi, int first) {
  char tmp[64];
  int t = lua_type(L, vi);
  if (t != LUA_TSTRING && t != LUA_TNUMBER && t != LUA_TBOOLEAN) return 0;
  if (!first) PUTS(o, ",");
  PUTS(o, "{\"key\":");
  put_string(o, k, kl);
  PUTS(o, ",\"value\":{");
  if (t == LUA_TBOOLEAN) {
    if (lua_toboolean(L, vi)) PUTS(o, "\"boolValue\":true}}");
    else PUTS(o, "\"boolValue\":false}}");
  } else if (t == LUA_TNUMBER) {
    double d = lua_tonumber(L, vi);
    int n;
    if (d == floor(d) && fabs(d) < 9007199254740992.0) {
      memcpy(tmp, "\"intValue\":\"", 12);
      n = 12 + (int)put_integral(tmp + 12, d);
      memcpy(tmp + n, "\"}}", 3);
      n += 3;
    } else if (isfinite(d)) n = snprintf(tmp, sizeof tmp, "\"doubleValue\":%.17g}}", d);
    else n = snprintf(tmp, sizeof tmp, "\"stringValue\":\"%s\"}}", isnan(d) ? "NaN" : d > 0 ? "Infinity" : "-Infinity");
    put(o, tmp, (size_t)n);
  } else {
    size_t vl;
    const char *v = lua_tolstring(L, vi, &vl);
    PUTS(o, "\"stringValue\":");
    put_string(o, v, vl);
    PUTS(o, "}}");
  }
  return 1;
}

/* The string field `name` of the table at idx (or "" when absent and
 * optional); raises for a missing required one. */
static const char *field_string(lua_State *L, int idx, const char *name, int required, size_t *len) {
  lua_getfield(L, idx, name);
  const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, len) : NULL;
  lua_pop(L, 1); /* the string stays alive in the span table */
  if (!s && required) luaL_error(L, "wxd.otlp: a span needs a string %s", name);
  if (!s) {
    *len = 0;
    return "";
  }
  return s;
}

static double field_number(lua_State *L, int idx, const char *name) {
  lua_getfield(L, idx, name);
  if (lua_type(L, -1) != LUA_TNUMBER) luaL_error(L, "wxd.otlp: a span needs a number %s", name);
  double d = lua_tonumber(L, -1);
  lua_pop(L, 1);
  return d;
}

static void encode_span(out_t *o, lua_State *L, int si) {
  size_t n;
  char tmp[160];
  const char *s = field_string(L, si, "trace_id", 1, &n);
  PUTS(o, "{\"traceId\":");
  put_string(o, s, n);
  s = field_string(L, si, "span_id", 1, &n);
  PUTS(o, ",\"spanId\":");
  put_string(o, s, n);
  s = field_string(L, si, "parent_id", 0, &n);
  PUTS(o, ",\"parentSpanId\":");
  put_string(o, s, n);
  s = field_string(L, si, "name", 1, &n);
  PUTS(o, ",\"name\":");
  put_string(o, s, n);
  double kind = field_number(L, si, "kind"), start = field_number(L, si, "start_s"), end = field_number(L, si, "end_s");
  size_t tl = 0;
  memcpy(tmp, ",\"kind\":", 8);
  tl = 8 + put_integral(tmp + 8, kind);
  memcpy(tmp + tl, ",\"startTimeUnixNano\":\"", 22);
  tl += 22;
  tl += put_integral(tmp + tl, start * 1e9);
  memcpy(tmp + tl, "\",\"endTimeUnixNano\":\"", 21);
  tl += 21;
  tl += put_integral(tmp + tl, end * 1e9);
  tmp[tl++] = '"';
  put(o, tmp, tl);
  PUTS(o, ",\"attributes\":[");
  lua_getfield(L, si, "attrs");
  if (lua_istable(L, -1)) {
    int ai = lua_gettop(L), first = 1;
    lua_pushnil(L);
    while (lua_next(L, ai) != 0) {
      /* A string key only: lua_tolstring on a number key would confuse lua_next. */
      if (lua_type(L, -2) == LUA_TSTRING) {
        size_t kl;
        const char *k = lua_tolstring(L, -2, &kl);
        if (put_attr(o, k, kl, L, lua_gettop(L), first)) first = 0;
      }
      lua_pop(L, 1);
    }
  }
  lua_pop(L, 1);
  lua_getfield(L, si, "error");
  int err = lua_toboolean(L, -1);
  lua_pop(L, 1);
  if (err) PUTS(o, "],\"status\":{\"code\":2}}");
  else PUTS(o, "],\"status\":{\"code\":0}}");
}

/* encode(spans, service_name, instance_id, version) -> JSON string */
static int l_encode(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  size_t svl, inl, vel;
  const char *svc = luaL_checklstring(L, 2, &svl);
  const char *inst = luaL_checklstring(L, 3, &inl);
  const char *ver = luaL_checklstring(L, 4, &vel);
  int count = (int)lua_objlen(L, 1);
  /* A bad span raises: the buffer is freed by the userdata's __gc then. */
  out_t *o = lua_newuserdata(L, sizeof *o);
  memset(o, 0, sizeof *o);
  luaL_getmetatable(L, OUT_MT);
  lua_setmetatable(L, -2);
  if (wxd_buf_reserve(&o->b, 256 + (size_t)count * 640) != 0) o->bad = 1;
  PUTS(o, "{\"resourceSpans\":[{\"resource\":{\"attributes\":[{\"key\":\"service.name\",\"value\":{\"stringValue\":");
  put_string(o, svc, svl);
  PUTS(o, "}},{\"key\":\"service.instance.id\",\"value\":{\"stringValue\":");
  put_string(o, inst, inl);
  PUTS(o, "}}]},\"scopeSpans\":[{\"scope\":{\"name\":\"wxd\",\"version\":");
  put_string(o, ver, vel);
  PUTS(o, "},\"spans\":[");
  for (int i = 1; i <= count && !o->bad; i++) {
    lua_rawgeti(L, 1, i);
    if (!lua_istable(L, -1)) {
      wxd_buf_free(&o->b);
      return luaL_error(L, "wxd.otlp: span %d is not a table", i);
    }
    if (i > 1) PUTS(o, ",");
    encode_span(o, L, lua_gettop(L));
    lua_pop(L, 1);
  }
  PUTS(o, "]}]}]}");
  if (o->bad) {
    wxd_buf_free(&o->b);
    return luaL_error(L, "wxd.otlp: out of memory");
  }
  lua_pushlstring(L, o->b.data, o->b.len);
  wxd_buf_free(&o->b);
  return 1;
}

int wxd_open_otlp(lua_State *L) {
  if (luaL_newmetatable(L, OUT_MT)) {
    lua_pushcfunction(L, out_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, l_encode);
  lua_setfield(L, -2, "encode");
  return 1;
}
