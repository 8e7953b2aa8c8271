/* buf: see buf.h. */
#include "buf.h"

#include <lauxlib.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int wxd_buf_reserve(wxd_buf_t *b, size_t need) {
  if (need > SIZE_MAX / 2 - b->len) return -1;
  if (b->len + need <= b->cap) return 0;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < b->len + need) cap *= 2;
  char *p = realloc(b->data, cap);
  if (!p) return -1;
  b->data = p;
  b->cap = cap;
  return 0;
}

int wxd_buf_append(wxd_buf_t *b, const void *p, size_t len) {
  if (wxd_buf_reserve(b, len) != 0) return -1;
  if (len) memcpy(b->data + b->len, p, len);
  b->len += len;
  return 0;
}

void wxd_buf_free(wxd_buf_t *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}

/* The registry key of the scratch buffer: this variable's address. */
static const char scratch_key = 0;

static int scratch_gc(lua_State *L) {
  wxd_buf_free(lua_touserdata(L, 1));
  return 0;
}

wxd_buf_t *wxd_scratch(lua_State *L) {
  lua_pushlightuserdata(L, (void *)&scratch_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  wxd_buf_t *b = lua_touserdata(L, -1);
  lua_pop(L, 1);
  if (!b) {
    lua_pushlightuserdata(L, (void *)&scratch_key);
    b = lua_newuserdata(L, sizeof *b);
    memset(b, 0, sizeof *b);
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, scratch_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
  }
  b->len = 0;
  return b;
}

void wxd_scratch_release(wxd_buf_t *b) {
  if (b->cap > WXD_SCRATCH_KEEP) wxd_buf_free(b);
  b->len = 0;
}
