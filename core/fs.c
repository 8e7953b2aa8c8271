/* fs: stat and realpath for wxd.static (see fs.h). */
#include "fs.h"

#include <errno.h>
#include <lauxlib.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* The short stable error strings wxd.static branches on. */
static int fs_fail(lua_State *L, int err) {
  lua_pushnil(L);
  switch (err) {
    case ENOENT:
    case ENOTDIR: lua_pushliteral(L, "not found"); break;
    case EACCES: lua_pushliteral(L, "permission denied"); break;
    case ENAMETOOLONG: lua_pushliteral(L, "name too long"); break;
    case ELOOP: lua_pushliteral(L, "symlink loop"); break;
    default: lua_pushstring(L, strerror(err)); break;
  }
  return 2;
}

static const char *check_path(lua_State *L) {
  size_t n;
  const char *p = luaL_checklstring(L, 1, &n);
  /* A NUL would end the C string early: another file than the one named. */
  if (memchr(p, 0, n)) luaL_argerror(L, 1, "path contains NUL");
  return p;
}

static int fs_stat(lua_State *L) {
  const char *p = check_path(L);
  struct stat st;
  if (stat(p, &st) != 0) return fs_fail(L, errno);
  lua_createtable(L, 0, 4);
  lua_pushnumber(L, (lua_Number)st.st_size);
  lua_setfield(L, -2, "size");
  lua_pushnumber(L, (lua_Number)st.st_mtime);
  lua_setfield(L, -2, "mtime");
  lua_pushboolean(L, S_ISREG(st.st_mode));
  lua_setfield(L, -2, "file");
  lua_pushboolean(L, S_ISDIR(st.st_mode));
  lua_setfield(L, -2, "dir");
  return 1;
}

static int fs_realpath(lua_State *L) {
  const char *p = check_path(L);
  char *r = realpath(p, NULL);
  if (!r) return fs_fail(L, errno);
  lua_pushstring(L, r);
  free(r);
  return 1;
}

int wxd_open_fs(lua_State *L) {
  static const luaL_Reg fns[] = {{"stat", fs_stat}, {"realpath", fs_realpath}, {NULL, NULL}};
  lua_createtable(L, 0, 2);
  luaL_register(L, NULL, fns);
  return 1;
}
