/* fs: the file-system facts wxd.static needs, as wxd.core.fs.
 *
 * stat(path) -> { size, mtime, file, dir } | nil, err
 * realpath(path) -> absolute path with no symlink, "." or ".." | nil, err
 *
 * Both are plain blocking syscalls on the worker's thread: they read
 * metadata the kernel caches, and serving a static file needs their answer
 * before anything else can happen.
 */
#ifndef WXD_FS_H
#define WXD_FS_H

#include <lua.h>

/* Lua module wxd.core.fs. */
int wxd_open_fs(lua_State *L);

#endif
