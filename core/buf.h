/* buf: a growable byte buffer, and a per-Lua-state scratch buffer.
 *
 * A wxd_buf_t is owned by whatever embeds it (a connection's output, a
 * fetch exchange, ...), which frees it with wxd_buf_free. Zero-initialised
 * is empty and valid.
 *
 * The scratch buffer is for native functions that build a string and then
 * push it (XML encoding, message sealing): one per lua_State (so per worker
 * and generation, nothing shared between threads), owned by that state
 * (freed by its __gc when the state closes), so a Lua error raised while it
 * is in use leaks nothing. It is reused across calls: hold it only within
 * one native call that does not run Lua code, and give it back with
 * wxd_scratch_release, which keeps at most WXD_SCRATCH_KEEP bytes.
 */
#ifndef WXD_BUF_H
#define WXD_BUF_H

#include <lua.h>
#include <stddef.h>

typedef struct wxd_buf {
  char *data;
  size_t len;
  size_t cap;
} wxd_buf_t;

/* Grows b to hold at least `need` more bytes; returns 0 or -1 (ENOMEM, or
 * a size that would overflow). */
int wxd_buf_reserve(wxd_buf_t *b, size_t need);
int wxd_buf_append(wxd_buf_t *b, const void *p, size_t len);
void wxd_buf_free(wxd_buf_t *b);

#define WXD_SCRATCH_KEEP (64 * 1024)

/* The scratch buffer of L's state, emptied (len 0). May raise (memory). */
wxd_buf_t *wxd_scratch(lua_State *L);
/* Done with it: a buffer that grew past WXD_SCRATCH_KEEP is freed. */
void wxd_scratch_release(wxd_buf_t *b);

#endif
