/* httpfile: a range of a file as (part of) a streamed response body,
 * written by the core: wxd.core.http.send_file(path, offset, length).
 *
 * The stream must have been started with a Content-Length (res:write after
 * setting it), which the file's bytes count against. On a plain connection
 * whose write queue is empty the bytes go with sendfile(2), from the page
 * cache to the socket without a copy through user space; when the socket
 * is full (EAGAIN) one 64 KiB piece is read and queued instead, and the
 * next sendfile waits until that has been written, so libuv's write
 * completion is the writability signal and no second watcher is needed on
 * the socket. HTTPS reads and encrypts piece by piece, keeping at most
 * OUTPUT_HIGH_WATER queued. Meanwhile the handler's coroutine waits.
 *
 * sendfile and pread run on the worker thread: cheap from the page cache,
 * a stall of the worker on a cold disk (as Lua's own file reads are).
 */
#include "http_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <lauxlib.h>
#include <stdlib.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <unistd.h>

#define FILE_PIECE (64 * 1024)   /* read and queued when sendfile cannot go on */
#define SENDFILE_MAX (1u << 20)  /* bytes per sendfile call */

struct wxd_http_file {
  int fd;
  uint64_t off;   /* next byte of the file */
  uint64_t left;  /* bytes still to send */
  char piece[FILE_PIECE];
};

void wxd__http_file_release(wxd_req_t *r) {
  if (!r->file) return;
  close(r->file->fd);
  free(r->file);
  r->file = NULL;
}

enum { STEP_DONE, STEP_WAIT, STEP_FAILED };

/* Sends what the connection takes now. */
static int file_step(wxd_req_t *r) {
  wxd_conn_t *c = r->conn;
  struct wxd_http_file *f = r->file;
  while (f->left > 0) {
    if (!c || c->closing) return STEP_FAILED;
    if (!c->tls) {
      /* Queued bytes go first: a sendfile now would overtake them. */
      if (c->writes_pending) return STEP_WAIT;
      uv_os_fd_t sock;
      if (uv_fileno((uv_handle_t *)&c->tcp, &sock) != 0) return STEP_FAILED;
      off_t off = (off_t)f->off;
      size_t want = f->left < SENDFILE_MAX ? (size_t)f->left : SENDFILE_MAX;
      ssize_t n = sendfile(sock, f->fd, &off, want);
      if (n > 0) {
        f->off += (uint64_t)n;
        f->left -= (uint64_t)n;
        r->bytes_out += (size_t)n;
        continue;
      }
      if (n == 0) return STEP_FAILED; /* the file is shorter than announced */
      if (errno == EINTR) continue;
      if (errno != EAGAIN) return STEP_FAILED;
      /* Socket full: fall through and queue one piece. */
    } else if (conn_unsent(c) > OUTPUT_HIGH_WATER) {
      return STEP_WAIT;
    }
    size_t want = f->left < FILE_PIECE ? (size_t)f->left : FILE_PIECE;
    ssize_t n = pread(f->fd, f->piece, want, (off_t)f->off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return STEP_FAILED;
    f->off += (uint64_t)n;
    f->left -= (uint64_t)n;
    r->bytes_out += (size_t)n;
    if (wxd__http_conn_writev(c, &(uv_buf_t){.base = f->piece, .len = (size_t)n}, 1) != 0) return STEP_FAILED;
    if (!c->tls && c->writes_pending) return STEP_WAIT;
  }
  return STEP_DONE;
}

/* Resumes the waiting handler with true, or nil, "closed". */
static void file_resume(wxd_req_t *r, int step) {
  wxd__http_file_release(r);
  if (step != STEP_DONE && r->conn && !r->conn->closing) {
    /* Bytes are missing from a response whose length is on the wire: the
     * connection cannot carry another response. Closing it resumes the
     * handler (drain_wait) with nil, "closed". */
    r->keep_alive = 0;
    wxd__http_conn_close(r->conn);
    return;
  }
  r->drain_wait = 0;
  lua_State *T = r->co->T;
  if (step == STEP_DONE) {
    lua_pushboolean(T, 1);
    wxd_co_resume(r->co, 1);
  } else {
    lua_pushnil(T);
    lua_pushliteral(T, "closed");
    wxd_co_resume(r->co, 2);
  }
}

void wxd__http_file_continue(wxd_req_t *r) {
  int step = file_step(r);
  if (step != STEP_WAIT) file_resume(r, step);
}

/* wxd.core.http.send_file(path, offset, length) -> true | nil, err */
int wxd__http_send_file(lua_State *L) {
  size_t pl;
  const char *path = luaL_checklstring(L, 1, &pl);
  lua_Number off = luaL_checknumber(L, 2);
  lua_Number len = luaL_checknumber(L, 3);
  if (memchr(path, 0, pl)) return luaL_argerror(L, 1, "path contains NUL");
  if (!(off >= 0 && off < 1e15) || off != (lua_Number)(uint64_t)off) return luaL_argerror(L, 2, "bad offset");
  if (!(len >= 0 && len < 1e15) || len != (lua_Number)(uint64_t)len) return luaL_argerror(L, 3, "bad length");
  wxd_co_t *co = wxd_co_lookup(L);
  if (!co || co->kind != WXD_CO_REQUEST) return luaL_error(L, "send_file: not in a request handler");
  wxd_req_t *r = co->data;
  wxd_conn_t *c = r->conn;
  if (!c || c->closing) {
    lua_pushnil(L);
    lua_pushliteral(L, "closed");
    return 2;
  }
  if (!r->streaming || (!r->stream_sized && !r->stream_nobody))
    return luaL_error(L, "send_file: start the response with a Content-Length first (res:write)");
  if (r->file) return luaL_error(L, "send_file: already sending a file");
  if (r->stream_nobody || len == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  if ((uint64_t)len > r->stream_left) return luaL_error(L, "send_file: more bytes than the Content-Length set");
  /* O_NOFOLLOW: wxd.static passes the resolved path; a symlink put there
   * since is refused rather than followed. */
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    lua_pushnil(L);
    lua_pushstring(L, errno == ENOENT ? "not found" : strerror(errno));
    return 2;
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size < (uint64_t)off + (uint64_t)len) {
    close(fd);
    lua_pushnil(L);
    lua_pushliteral(L, "file changed");
    return 2;
  }
  struct wxd_http_file *f = malloc(sizeof *f);
  if (!f) {
    close(fd);
    return luaL_error(L, "send_file: out of memory");
  }
  f->fd = fd;
  f->off = (uint64_t)off;
  f->left = (uint64_t)len;
  r->file = f;
  r->stream_left -= (uint64_t)len;
  int step = file_step(r);
  if (step == STEP_DONE) {
    wxd__http_file_release(r);
    lua_pushboolean(L, 1);
    return 1;
  }
  if (step == STEP_FAILED) {
    wxd__http_file_release(r);
    if (r->conn && !r->conn->closing) {
      r->keep_alive = 0;
      wxd__http_conn_close(r->conn);
    }
    lua_pushnil(L);
    lua_pushliteral(L, "closed");
    return 2;
  }
  /* drain_wait: a closing connection resumes us with nil, "closed". */
  r->drain_wait = 1;
  return wxd_co_yield(co, L, 0);
}
