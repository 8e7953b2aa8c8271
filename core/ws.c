/* ws: see ws.h. This file owns a WebSocket connection once upgraded: the
 * frame parser, control frames, the close handshake, timeouts, and the Lua
 * object (ws:receive, send, close, ping, subscribe, unsubscribe).
 *
 * Closing: whoever closes first sends a close frame (state CLOSE_SENT when
 * it is us: we go on reading until the client's close frame comes back).
 * Once both are sent, or after a protocol error (the connection is failed:
 * our close frame with the code, then nothing more is parsed), our side of
 * TCP is shut down after the pending writes, and input is read and thrown
 * away until the client's EOF, so that no unread bytes make the kernel
 * reset the connection before the client has read our close frame. A
 * client that does not finish within close_timeout is cut off.
 *
 * Lifetime: the wxd_ws_t is owned together by the connection and the
 * handler's coroutine, and freed when both are gone. The Lua userdata only
 * points at it (and is told when it goes).
 */
#include "ws_internal.h"

#include <lauxlib.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http_internal.h"
#include "log.h"
#include "metrics.h"

#define WS_MT "wxd.ws"
#define CLOSE_REASON_MAX 123

typedef struct ws_box {
  wxd_ws_t *ws;
} ws_box_t;

/* ---- UTF-8 ---- */

int wxd_utf8_feed(wxd_utf8_t *u, const uint8_t *p, size_t n) {
  size_t i = 0;
  while (i < n) {
    uint8_t b = p[i++];
    if (u->need == 0) {
      if (b < 0x80) continue;
      u->lo = 0x80;
      u->hi = 0xBF;
      if (b >= 0xC2 && b <= 0xDF) u->need = 1;
      else if (b == 0xE0) u->need = 2, u->lo = 0xA0;          /* no overlong forms */
      else if (b == 0xED) u->need = 2, u->hi = 0x9F;          /* no surrogates */
      else if (b >= 0xE1 && b <= 0xEF) u->need = 2;
      else if (b == 0xF0) u->need = 3, u->lo = 0x90;          /* no overlong forms */
      else if (b >= 0xF1 && b <= 0xF3) u->need = 3;
      else if (b == 0xF4) u->need = 3, u->hi = 0x8F;          /* nothing above U+10FFFF */
      else return -1;
    } else {
      if (b < u->lo || b > u->hi) return -1;
      u->need--;
      u->lo = 0x80;
      u->hi = 0xBF;
    }
  }
  return 0;
}

static int utf8_valid(const char *s, size_t n) {
  wxd_utf8_t u = {0, 0, 0};
  return wxd_utf8_feed(&u, (const uint8_t *)s, n) == 0 && wxd_utf8_complete(&u);
}

/* Close codes a peer may send (RFC 6455 7.4, and the IANA registry). */
static int close_code_ok(unsigned code) {
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) || (code >= 3000 && code <= 4999);
}

/* ---- lifetime ---- */

static void ws_free(wxd_ws_t *ws) {
  ws_msg_t *m = ws->q_head;
  while (m) {
    ws_msg_t *next = m->next;
    free(m->data);
    free(m);
    m = next;
  }
  wxd_buf_free(&ws->msg);
  if (ws->box) ws->box->ws = NULL;
  free(ws);
}

static uint64_t ws_now(wxd_ws_t *ws) { return uv_now(&ws->conn->w->loop); }

/* ---- writing ---- */

static int ws_write_frame(wxd_ws_t *ws, int opcode, const char *p, size_t len) {
  wxd_conn_t *c = ws->conn;
  if (!c || c->closing) return -1;
  uint8_t head[10];
  size_t hl = wxd__ws_frame_head(head, opcode, len);
  uv_buf_t b[2] = {uv_buf_init((char *)head, (unsigned)hl), uv_buf_init((char *)p, (unsigned)len)};
  return wxd__http_conn_writev(c, b, len ? 2 : 1);
}

static void on_shutdown(uv_shutdown_t *req, int status) {
  wxd_conn_t *c = req->data;
  free(req);
  if (status == UV_ECANCELED) return; /* the connection is closing */
  if (status < 0 && !c->closing) wxd__http_conn_close(c);
}

static void ws_wake_reader(wxd_ws_t *ws);
static void ws_answer_close(wxd_ws_t *ws);
static void ws_wake_writer(wxd_ws_t *ws, int ok);

/* Both close frames are out (or the connection failed): no more frames;
 * end TCP once the client has read what we wrote. */
static void ws_finish(wxd_ws_t *ws) {
  wxd_conn_t *c = ws->conn;
  ws->state = WS_CLOSED;
  if (!c || c->closing) return;
  ws->close_deadline = ws_now(ws) + ws->close_ms;
  if (c->peer_eof) {
    c->close_after_write = 1;
    if (c->writes_pending == 0) wxd__http_conn_close(c);
  } else if (c->tls) {
    /* TLS ends with close_notify when the connection closes. */
    c->close_after_write = 1;
    if (c->writes_pending == 0) wxd__http_conn_close(c);
  } else if (!ws->shut) {
    uv_shutdown_t *req = malloc(sizeof *req);
    if (!req || uv_shutdown(req, (uv_stream_t *)&c->tcp, on_shutdown) != 0) {
      free(req);
      wxd__http_conn_close(c);
      return;
    }
    req->data = c;
    ws->shut = 1;
  }
}

/* Sends our close frame (code 0: none). */
static void ws_send_close(wxd_ws_t *ws, unsigned code, const char *reason, size_t rlen) {
  char p[2 + CLOSE_REASON_MAX];
  size_t n = 0;
  if (code) {
    p[0] = (char)(code >> 8);
    p[1] = (char)(code & 0xff);
    if (rlen > CLOSE_REASON_MAX) rlen = CLOSE_REASON_MAX;
    if (rlen) memcpy(p + 2, reason, rlen);
    n = 2 + rlen;
  }
  ws_write_frame(ws, 0x8, p, n);
}

/* Fails the connection: a protocol error or a limit. */
static void ws_fail(wxd_ws_t *ws, unsigned code, const char *why) {
  if (ws->state == WS_CLOSED) return;
  ws->failed = 1;
  if (ws->state == WS_OPEN) ws_send_close(ws, code, why, strlen(why));
  if (!ws->close_code) ws->close_code = 1006;
  ws_finish(ws);
}

/* We start the close handshake (the handler's ws:close, its end, an idle
 * timeout, shutdown). */
static void ws_start_close(wxd_ws_t *ws, unsigned code, const char *reason, size_t rlen) {
  if (ws->state != WS_OPEN || !ws->conn || ws->conn->closing) return;
  if (ws->close_pending) {
    ws_answer_close(ws);
    return;
  }
  ws_send_close(ws, code, reason, rlen);
  ws->state = WS_CLOSE_SENT;
  ws->close_deadline = ws_now(ws) + ws->close_ms;
}

/* ---- reading ---- */

static size_t queue_limit(wxd_ws_t *ws) { return ws->max_message > 65536 ? ws->max_message : 65536; }

static void queue_message(wxd_ws_t *ws) {
  ws_msg_t *m = malloc(sizeof *m);
  if (!m) {
    ws_fail(ws, 1011, "out of memory");
    return;
  }
  m->next = NULL;
  m->data = ws->msg.data;
  m->len = ws->msg.len;
  m->binary = ws->msg_opcode == 2;
  memset(&ws->msg, 0, sizeof ws->msg);
  if (ws->q_tail) ws->q_tail->next = m;
  else ws->q_head = m;
  ws->q_tail = m;
  ws->q_bytes += m->len + 1;
  if (ws->q_bytes > queue_limit(ws)) ws->read_paused = 1;
}

/* Answers the client's close (echoing its code) and ends. */
static void ws_answer_close(wxd_ws_t *ws) {
  ws->close_pending = 0;
  unsigned code = ws->close_code;
  if (ws->state == WS_OPEN) ws_send_close(ws, code == 1005 ? 0 : code, NULL, 0);
  ws_finish(ws);
}

static void on_close_frame(wxd_ws_t *ws) {
  unsigned code = 1005;
  if (ws->ctrl_len == 1) {
    ws_fail(ws, 1002, "close frame of 1 byte");
    return;
  }
  if (ws->ctrl_len >= 2) {
    code = (unsigned)ws->ctrl[0] << 8 | ws->ctrl[1];
    if (!close_code_ok(code)) {
      ws_fail(ws, 1002, "invalid close code");
      return;
    }
    if (!utf8_valid((const char *)ws->ctrl + 2, ws->ctrl_len - 2u)) {
      ws_fail(ws, 1007, "invalid utf-8 in close reason");
      return;
    }
  }
  ws->close_code = (uint16_t)code;
  if (ws->state == WS_OPEN && ws->q_head && ws->handler) {
    /* Messages the client sent before its close are the handler's still,
     * and so are its answers to them: the close is answered once it has
     * received them (or after close_timeout). */
    ws->close_pending = 1;
    ws->close_deadline = ws_now(ws) + ws->close_ms;
    return;
  }
  ws_answer_close(ws);
}

/* The last payload byte of a frame arrived (or it had none). */
static void frame_end(wxd_ws_t *ws) {
  ws->in_payload = 0;
  ws->hdr_have = 0;
  int op = ws->opcode;
  if (op == 0x8) {
    on_close_frame(ws);
  } else if (op == 0x9) {
    if (ws->state == WS_OPEN) ws_write_frame(ws, 0xA, (const char *)ws->ctrl, ws->ctrl_len);
  } else if (op == 0xA) {
    /* A pong: ws->last_rx already counts it. */
  } else if (ws->fin) {
    if (ws->msg_opcode == 1 && !wxd_utf8_complete(&ws->utf8)) {
      ws_fail(ws, 1007, "invalid utf-8");
      return;
    }
    if (ws->state == WS_OPEN) queue_message(ws);
    else wxd_buf_free(&ws->msg);
    ws->msg_opcode = 0;
    memset(&ws->utf8, 0, sizeof ws->utf8);
  }
}

/* The first two header bytes: everything that can be refused this early. */
static int header_start(wxd_ws_t *ws) {
  uint8_t b0 = ws->hdr[0], b1 = ws->hdr[1];
  int op = b0 & 0x0f;
  ws->fin = b0 >> 7;
  ws->opcode = (uint8_t)op;
  if (b0 & 0x70) return ws_fail(ws, 1002, "reserved bits set"), -1;
  if ((op >= 3 && op <= 7) || op >= 0xB) return ws_fail(ws, 1002, "reserved opcode"), -1;
  if (!(b1 & 0x80)) return ws_fail(ws, 1002, "unmasked frame"), -1;
  unsigned len7 = b1 & 0x7f;
  if (op >= 8) {
    if (!ws->fin) return ws_fail(ws, 1002, "fragmented control frame"), -1;
    if (len7 > 125) return ws_fail(ws, 1002, "control frame too long"), -1;
  } else if (op == 0 && !ws->msg_opcode) {
    return ws_fail(ws, 1002, "continuation without a message"), -1;
  } else if (op != 0 && ws->msg_opcode) {
    return ws_fail(ws, 1002, "new message inside a fragmented one"), -1;
  }
  ws->hdr_need = (uint8_t)(2 + (len7 == 126 ? 2 : len7 == 127 ? 8 : 0) + 4);
  return 0;
}

/* The whole header: length and mask. Limits are decided here, before any
 * payload byte is kept. */
static int header_done(wxd_ws_t *ws) {
  unsigned len7 = ws->hdr[1] & 0x7f;
  uint64_t len = len7;
  size_t off = 2;
  if (len7 == 126) {
    len = (uint64_t)ws->hdr[2] << 8 | ws->hdr[3];
    off = 4;
  } else if (len7 == 127) {
    len = 0;
    for (int i = 0; i < 8; i++) len = len << 8 | ws->hdr[2 + i];
    off = 10;
    if (len >> 63) return ws_fail(ws, 1002, "frame length with the high bit set"), -1;
  }
  memcpy(ws->mask, ws->hdr + off, 4);
  ws->mask_pos = 0;
  ws->left = len;
  ws->in_payload = 1;
  int op = ws->opcode;
  if (op >= 8) {
    ws->ctrl_len = 0;
    return 0;
  }
  if (op != 0) {
    ws->msg_opcode = (uint8_t)op;
    memset(&ws->utf8, 0, sizeof ws->utf8);
  }
  if (len > ws->max_frame) return ws_fail(ws, 1009, "frame too large"), -1;
  if (ws->msg.len + len > ws->max_message) return ws_fail(ws, 1009, "message too large"), -1;
  if (ws->state == WS_OPEN && len && wxd_buf_reserve(&ws->msg, (size_t)len) != 0)
    return ws_fail(ws, 1011, "out of memory"), -1;
  return 0;
}

static int payload(wxd_ws_t *ws, const uint8_t *p, size_t n) {
  uint8_t *dst;
  if (ws->opcode >= 8) {
    dst = ws->ctrl + ws->ctrl_len;
    ws->ctrl_len = (uint8_t)(ws->ctrl_len + n);
  } else if (ws->state == WS_OPEN) {
    dst = (uint8_t *)ws->msg.data + ws->msg.len;
    ws->msg.len += n;
  } else {
    return 0; /* closing: data is thrown away */
  }
  unsigned mp = ws->mask_pos;
  for (size_t i = 0; i < n; i++) dst[i] = p[i] ^ ws->mask[(mp + i) & 3];
  ws->mask_pos = (uint8_t)((mp + n) & 3);
  if (ws->opcode < 8 && ws->msg_opcode == 1 && wxd_utf8_feed(&ws->utf8, dst, n) != 0)
    return ws_fail(ws, 1007, "invalid utf-8"), -1;
  return 0;
}

/* Parses what it can; returns the bytes consumed (fewer than len when the
 * queue of messages is full). */
static size_t ws_feed(wxd_ws_t *ws, const uint8_t *p, size_t len) {
  size_t i = 0;
  wxd_conn_t *c = ws->conn;
  while (i < len) {
    if (c->closing || ws->state == WS_CLOSED || ws->close_pending) return len;
    if (ws->read_paused) return i;
    if (!ws->in_payload) {
      ws->hdr[ws->hdr_have++] = p[i++];
      if (ws->hdr_have == 2 && header_start(ws) != 0) continue;
      if (ws->hdr_have < 2 || ws->hdr_have < ws->hdr_need) continue;
      if (header_done(ws) != 0) continue;
      if (ws->left == 0) frame_end(ws);
      continue;
    }
    size_t n = len - i < ws->left ? len - i : (size_t)ws->left;
    if (payload(ws, p + i, n) != 0) continue;
    i += n;
    ws->left -= n;
    if (ws->left == 0) frame_end(ws);
  }
  return i;
}

void wxd__ws_input(wxd_conn_t *c, const char *data, size_t len) {
  wxd_ws_t *ws = c->ws;
  ws->last_rx = uv_now(&c->w->loop);
  ws->ping_out = 0;
  if (c->in.len > 0 || ws->read_paused) {
    if (wxd_buf_append(&c->in, data, len) != 0) wxd__http_conn_close(c);
    else wxd__http_conn_stop_reading(c);
    return;
  }
  size_t used = ws_feed(ws, (const uint8_t *)data, len);
  if (used < len && !c->closing) {
    if (wxd_buf_append(&c->in, data + used, len - used) != 0) wxd__http_conn_close(c);
    else wxd__http_conn_stop_reading(c);
  }
  ws_wake_reader(ws);
}

void wxd__ws_input_end(wxd_conn_t *c) {
  wxd_ws_t *ws = c->ws;
  c->peer_eof = 1;
  /* Queued input is left unparsed: the client will read nothing more. */
  if (ws->state != WS_CLOSED && !ws->close_code) ws->close_code = 1006;
  ws->state = WS_CLOSED;
  wxd__http_conn_close(c);
}

/* The handler took messages: parse what waited, then read again. */
static void ws_resume_input(wxd_ws_t *ws) {
  wxd_conn_t *c = ws->conn;
  if (!ws->read_paused || ws->q_bytes > queue_limit(ws) / 2 || !c || c->closing) return;
  ws->read_paused = 0;
  if (c->in.len) {
    wxd_buf_t q = c->in;
    memset(&c->in, 0, sizeof c->in);
    size_t used = ws_feed(ws, (const uint8_t *)q.data, q.len);
    if (used < q.len && !c->closing) wxd_buf_append(&c->in, q.data + used, q.len - used);
    wxd_buf_free(&q);
  }
  if (!ws->read_paused && !c->closing) wxd__http_conn_start_reading(c);
}

/* ---- the connection's end, timeouts, shutdown ---- */

void wxd__ws_conn_closing(wxd_conn_t *c) {
  wxd_ws_t *ws = c->ws;
  if (ws->state != WS_CLOSED && !ws->close_code) ws->close_code = 1006;
  ws->state = WS_CLOSED;
  if (ws->topics && wxd__ws_defer_wake(ws->topics, ws->worker, ws)) return;
  wxd__ws_wake_closed(ws);
}

void wxd__ws_wake_closed(wxd_ws_t *ws) {
  ws_wake_reader(ws);
  ws_wake_writer(ws, 0);
}

void wxd__ws_conn_closed(wxd_conn_t *c) {
  wxd_ws_t *ws = c->ws;
  c->ws = NULL;
  ws->conn = NULL;
  if (ws->topics) wxd__ws_unsubscribe_all(ws->topics, ws->worker, ws);
  if (!ws->handler) ws_free(ws);
}

void wxd__ws_sweep(wxd_conn_t *c, uint64_t now) {
  wxd_ws_t *ws = c->ws;
  if (ws->close_pending && now >= ws->close_deadline) {
    ws_answer_close(ws);
    ws_wake_reader(ws);
    return;
  }
  if (ws->state != WS_OPEN) {
    if (ws->close_deadline && now >= ws->close_deadline) wxd__http_conn_close(c);
    return;
  }
  if (ws->reader && ws->recv_deadline && now >= ws->recv_deadline) {
    wxd_co_t *co = ws->reader;
    ws->reader = NULL;
    ws->recv_deadline = 0;
    lua_pushnil(co->T);
    lua_pushliteral(co->T, "timeout");
    wxd_co_resume(co, 2);
    if (c->closing || ws->state != WS_OPEN) return;
  }
  if (ws->idle_ms && now - ws->last_rx >= ws->idle_ms) {
    ws_start_close(ws, 1001, "idle timeout", 12);
    ws_wake_reader(ws);
  } else if (ws->ping_ms && !ws->ping_out && now - ws->last_rx >= ws->ping_ms) {
    ws->ping_out = 1;
    ws_write_frame(ws, 0x9, NULL, 0);
  }
}

void wxd__ws_drain(wxd_conn_t *c) {
  wxd_ws_t *ws = c->ws;
  ws_start_close(ws, 1001, "server shutting down", 20);
  ws_wake_reader(ws);
}

void wxd__ws_on_drain(wxd_conn_t *c) {
  wxd_ws_t *ws = c->ws;
  if (ws->writer && conn_unsent(c) <= ws->max_unsent / 2) ws_wake_writer(ws, 1);
}

void wxd__ws_deliver(wxd_ws_t *ws, const char *frame, size_t len) {
  wxd_conn_t *c = ws->conn;
  if (!c || c->closing || ws->state != WS_OPEN) return;
  if (conn_unsent(c) + len > ws->max_unsent) {
    /* A subscriber that does not read: let it go rather than queue more. */
    wxd_logf(WXD_LOG_INFO, c->w->id, "websocket: %s:%d does not read its messages; disconnected", c->remote,
             c->remote_port);
    wxd__http_conn_close(c);
    return;
  }
  conn_write(c, frame, len);
}

/* ---- waking coroutines ---- */

static void ws_wake_reader(wxd_ws_t *ws) {
  wxd_co_t *co = ws->reader;
  if (!co) return;
  lua_State *T = co->T;
  ws_msg_t *m = ws->q_head;
  if (m) {
    ws->q_head = m->next;
    if (!m->next) ws->q_tail = NULL;
    ws->q_bytes -= m->len + 1;
    lua_pushlstring(T, m->data ? m->data : "", m->len);
    lua_pushstring(T, m->binary ? "binary" : "text");
    free(m->data);
    free(m);
  } else if (ws->close_pending || ws->state != WS_OPEN || !ws->conn || ws->conn->closing) {
    if (ws->close_pending) ws_answer_close(ws);
    lua_pushnil(T);
    lua_pushliteral(T, "closed");
  } else {
    return;
  }
  ws->reader = NULL;
  ws->recv_deadline = 0;
  ws_resume_input(ws);
  wxd_co_resume(co, 2);
}

static void ws_wake_writer(wxd_ws_t *ws, int ok) {
  wxd_co_t *co = ws->writer;
  if (!co) return;
  ws->writer = NULL;
  if (ok) {
    lua_pushboolean(co->T, 1);
    wxd_co_resume(co, 1);
  } else {
    lua_pushnil(co->T);
    lua_pushliteral(co->T, "closed");
    wxd_co_resume(co, 2);
  }
}

static void cancel_reader(void *p) { ((wxd_ws_t *)p)->reader = NULL; }
static void cancel_writer(void *p) { ((wxd_ws_t *)p)->writer = NULL; }

/* ---- the handler's coroutine ---- */

static void on_handler_done(wxd_co_t *co, int status) {
  wxd_ws_t *ws = co->data;
  ws->handler = NULL;
  if (status != 0) wxd_co_log_error(co, "websocket handler failed");
  if (ws->conn) {
    if (status != 0) ws_start_close(ws, 1011, "handler error", 13);
    else ws_start_close(ws, 1000, NULL, 0);
  } else {
    ws_free(ws);
  }
}

static void on_handler_abandoned(wxd_co_t *co) {
  wxd_ws_t *ws = co->data;
  ws->handler = NULL;
  if (!ws->conn) ws_free(ws);
}

/* ---- Lua ---- */

static wxd_ws_t *check_ws(lua_State *L) {
  ws_box_t *b = luaL_checkudata(L, 1, WS_MT);
  return b->ws;
}

static int push_closed(lua_State *L, wxd_ws_t *ws) {
  lua_pushnil(L);
  lua_pushliteral(L, "closed");
  if (ws && ws->close_code) {
    lua_pushinteger(L, ws->close_code);
    return 3;
  }
  return 2;
}

static int usable(wxd_ws_t *ws) { return ws && ws->conn && !ws->conn->closing && ws->state == WS_OPEN; }

/* ws:receive([timeout_ms]) -> data, "text"|"binary" | nil, "closed" [, code] | nil, "timeout" */
static int ws_receive(lua_State *L) {
  wxd_ws_t *ws = check_ws(L);
  lua_Integer timeout = luaL_optinteger(L, 2, 0);
  if (timeout < 0) return luaL_argerror(L, 2, "timeout must be >= 0 (ms)");
  if (ws && ws->close_pending && !ws->q_head) ws_answer_close(ws);
  if (ws && ws->q_head) {
    ws_msg_t *m = ws->q_head;
    ws->q_head = m->next;
    if (!m->next) ws->q_tail = NULL;
    ws->q_bytes -= m->len + 1;
    lua_pushlstring(L, m->data ? m->data : "", m->len);
    lua_pushstring(L, m->binary ? "binary" : "text");
    free(m->data);
    free(m);
    ws_resume_input(ws);
    return 2;
  }
  if (!usable(ws)) return push_closed(L, ws);
  if (ws->reader) return luaL_error(L, "ws:receive: another coroutine is already receiving on this websocket");
  wxd_co_t *co = wxd_co_current(L, "ws:receive");
  ws->reader = co;
  ws->recv_deadline = timeout ? ws_now(ws) + (uint64_t)timeout : 0;
  return wxd_co_yield_cancellable(co, L, cancel_reader, ws);
}

static int ws_send(lua_State *L) {
  wxd_ws_t *ws = check_ws(L);
  size_t len;
  const char *p = luaL_checklstring(L, 2, &len);
  const char *kind = luaL_optstring(L, 3, "text");
  int op;
  if (strcmp(kind, "text") == 0) op = 0x1;
  else if (strcmp(kind, "binary") == 0) op = 0x2;
  else return luaL_argerror(L, 3, "expected \"text\" or \"binary\"");
  if (!usable(ws)) return push_closed(L, ws);
  if (op == 0x1 && !utf8_valid(p, len)) {
    lua_pushnil(L);
    lua_pushliteral(L, "invalid utf-8");
    return 2;
  }
  if (ws_write_frame(ws, op, p, len) != 0) return push_closed(L, ws);
  if (conn_unsent(ws->conn) > ws->max_unsent && lua_isyieldable(L)) {
    if (ws->writer) {
      lua_pushnil(L);
      lua_pushliteral(L, "busy");
      return 2;
    }
    wxd_co_t *co = wxd_co_lookup(L);
    if (co) {
      ws->writer = co;
      return wxd_co_yield_cancellable(co, L, cancel_writer, ws);
    }
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* ws:close([code [, reason]]): starts the close handshake. */
static int ws_close(lua_State *L) {
  wxd_ws_t *ws = check_ws(L);
  lua_Integer code = luaL_optinteger(L, 2, 1000);
  size_t rlen = 0;
  const char *reason = luaL_optlstring(L, 3, "", &rlen);
  if (!(code == 1000 || (code >= 3000 && code <= 4999) || (code >= 1001 && code <= 1003) ||
        (code >= 1007 && code <= 1014)))
    return luaL_argerror(L, 2, "close code must be 1000..1003, 1007..1014 or 3000..4999");
  if (rlen > CLOSE_REASON_MAX) return luaL_argerror(L, 3, "close reason longer than 123 bytes");
  if (!utf8_valid(reason, rlen)) return luaL_argerror(L, 3, "close reason is not valid utf-8");
  if (!usable(ws)) return push_closed(L, ws);
  ws_start_close(ws, (unsigned)code, reason, rlen);
  ws_wake_reader(ws);
  lua_pushboolean(L, 1);
  return 1;
}

static int ws_ping(lua_State *L) {
  wxd_ws_t *ws = check_ws(L);
  size_t len = 0;
  const char *p = luaL_optlstring(L, 2, "", &len);
  if (len > 125) return luaL_argerror(L, 2, "ping payload longer than 125 bytes");
  if (!usable(ws) || ws_write_frame(ws, 0x9, p, len) != 0) return push_closed(L, ws);
  lua_pushboolean(L, 1);
  return 1;
}

static const char *check_topic(lua_State *L, int idx, size_t *n) {
  const char *t = luaL_checklstring(L, idx, n);
  if (*n == 0 || *n > 1024) luaL_argerror(L, idx, "topic must be 1..1024 bytes");
  return t;
}

static int ws_subscribe(lua_State *L) {
  wxd_ws_t *ws = check_ws(L);
  size_t n;
  const char *t = check_topic(L, 2, &n);
  if (!usable(ws)) return push_closed(L, ws);
  if (!ws->topics) {
    lua_pushnil(L);
    lua_pushliteral(L, "no topics outside a server");
    return 2;
  }
  if (wxd__ws_subscribe(ws->topics, ws->worker, ws, t, n) != 0) {
    lua_pushnil(L);
    lua_pushliteral(L, "out of memory");
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

static int ws_unsubscribe(lua_State *L) {
  wxd_ws_t *ws = check_ws(L);
  size_t n;
  const char *t = check_topic(L, 2, &n);
  lua_pushboolean(L, ws && ws->topics && wxd__ws_unsubscribe(ws->topics, ws->worker, ws, t, n));
  return 1;
}

static int ws_gc(lua_State *L) {
  ws_box_t *b = luaL_checkudata(L, 1, WS_MT);
  if (b->ws) b->ws->box = NULL;
  b->ws = NULL;
  return 0;
}

static int ws_tostring(lua_State *L) {
  ws_box_t *b = luaL_checkudata(L, 1, WS_MT);
  lua_pushfstring(L, "websocket (%s)", usable(b->ws) ? "open" : "closed");
  return 1;
}

/* Finds a field's values, all of them (repeated fields), and tells whether
 * a comma-separated token is among them (any case). */
static int header_has_token(wxd_req_t *r, const char *name, const char *token) {
  size_t nl = strlen(name), tl = strlen(token);
  for (unsigned i = 0; i < r->hdrs.n; i++) {
    wxd_hdr_t *h = &r->hdrs.v[i];
    if (h->name_len != nl || memcmp(r->head.data + h->name_off, name, nl) != 0) continue;
    const char *v = r->head.data + h->value_off;
    size_t n = h->value_len, j = 0;
    while (j < n) {
      while (j < n && (v[j] == ' ' || v[j] == '\t' || v[j] == ',')) j++;
      size_t s = j;
      while (j < n && v[j] != ',') j++;
      size_t e = j;
      while (e > s && (v[e - 1] == ' ' || v[e - 1] == '\t')) e--;
      if (e - s == tl && strncasecmp(v + s, token, tl) == 0) return 1;
    }
  }
  return 0;
}

static const char *header_value(wxd_req_t *r, const char *name, size_t *len) {
  int i = wxd_hdrs_find(&r->hdrs, &r->head, name, strlen(name));
  if (i < 0) return NULL;
  *len = r->hdrs.v[i].value_len;
  return r->head.data + r->hdrs.v[i].value_off;
}

static int refuse(lua_State *L, const char *why, int status) {
  lua_pushnil(L);
  lua_pushstring(L, why);
  lua_pushinteger(L, status);
  return 3;
}

static uint32_t opt_u32(lua_State *L, int t, const char *k, uint32_t def) {
  lua_getfield(L, t, k);
  lua_Number v = lua_isnumber(L, -1) ? lua_tonumber(L, -1) : -1;
  lua_pop(L, 1);
  if (v < 0) return def;
  return v > 4294967295.0 ? 4294967295u : (uint32_t)v;
}

/* upgrade(opts) -> ws | nil, why, status. Called by the route's handler in
 * the request's coroutine, which becomes the WebSocket's handler. */
static int ws_upgrade(lua_State *L) {
  wxd_co_t *co = wxd_co_lookup(L);
  if (!co || co->kind != WXD_CO_REQUEST) return luaL_error(L, "websocket upgrade: not in a request handler");
  if (!lua_isnoneornil(L, 1)) luaL_checktype(L, 1, LUA_TTABLE);
  else {
    lua_settop(L, 0);
    lua_newtable(L);
  }
  wxd_req_t *r = co->data;
  wxd_conn_t *c = r->conn;
  if (!c || c->closing) return refuse(L, "closed", 400);
  if (r->streaming) return luaL_error(L, "websocket upgrade: the response has started");
  if (r->method != HTTP_GET) return refuse(L, "websocket handshake must be a GET", 405);
  if (r->http_major != 1 || r->http_minor != 1) return refuse(L, "websocket handshake needs HTTP/1.1", 400);
  if (!header_has_token(r, "upgrade", "websocket")) return refuse(L, "not a websocket handshake", 426);
  if (!header_has_token(r, "connection", "upgrade")) return refuse(L, "not a websocket handshake", 400);
  size_t vl = 0, kl = 0;
  const char *ver = header_value(r, "sec-websocket-version", &vl);
  if (!ver || vl != 2 || memcmp(ver, "13", 2) != 0) return refuse(L, "unsupported websocket version", 426);
  const char *key = header_value(r, "sec-websocket-key", &kl);
  unsigned char raw[24];
  if (!key || kl != 24 || key[22] != '=' || key[23] != '=' ||
      EVP_DecodeBlock(raw, (const unsigned char *)key, 24) != 18)
    return refuse(L, "bad Sec-WebSocket-Key", 400);
  if (r->body.len || r->has_te) return refuse(L, "websocket handshake with a body", 400);
  if (c->w->draining) return refuse(L, "server shutting down", 503);
  size_t plen = 0;
  lua_getfield(L, 1, "protocol");
  const char *proto = lua_tolstring(L, -1, &plen);
  lua_pop(L, 1); /* the options table keeps it alive */
  if (proto && (plen == 0 || plen > 128 || strpbrk(proto, "\r\n"))) return luaL_error(L, "websocket upgrade: bad protocol");

  wxd_ws_t *ws = calloc(1, sizeof *ws);
  if (!ws) return refuse(L, "out of memory", 500);
  ws_box_t *box = lua_newuserdata(L, sizeof *box);
  box->ws = ws;
  luaL_getmetatable(L, WS_MT);
  lua_setmetatable(L, -2);
  ws->box = box;
  ws->max_frame = opt_u32(L, 1, "max_frame_bytes", 1048576);
  ws->max_message = opt_u32(L, 1, "max_message_bytes", 1048576);
  ws->max_unsent = opt_u32(L, 1, "max_unsent_bytes", 1048576);
  ws->ping_ms = opt_u32(L, 1, "ping_interval_ms", 30000);
  ws->idle_ms = opt_u32(L, 1, "idle_timeout_ms", 120000);
  ws->close_ms = opt_u32(L, 1, "close_timeout_ms", 5000);

  /* The accept key: base64(SHA-1(key ++ GUID)). */
  char cat[24 + 36];
  memcpy(cat, key, 24);
  memcpy(cat + 24, "258EAFA5-E914-47DA-95CA-C5AB0DC85B11", 36);
  unsigned char digest[SHA_DIGEST_LENGTH];
  SHA1((const unsigned char *)cat, sizeof cat, digest);
  char accept[32];
  EVP_EncodeBlock((unsigned char *)accept, digest, SHA_DIGEST_LENGTH);
  wxd_buf_t *o = &c->w->out;
  o->len = 0;
  static const char head[] = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             "Sec-WebSocket-Accept: ";
  wxd_buf_append(o, head, sizeof head - 1);
  wxd_buf_append(o, accept, 28);
  wxd_buf_append(o, "\r\n", 2);
  if (proto) {
    wxd_buf_append(o, "Sec-WebSocket-Protocol: ", 24);
    wxd_buf_append(o, proto, plen);
    wxd_buf_append(o, "\r\n", 2);
  }
  wxd_buf_append(o, "Server: wxd\r\n\r\n", 15);
  r->status = 101;
  r->bytes_out = o->len;
  /* The request's coroutine does not end here, which is where a response
   * learns its route pattern (for metrics): lua/wxd/ws.lua passes it. */
  lua_getfield(L, 1, "route");
  size_t rl = 0;
  const char *route = lua_tolstring(L, -1, &rl);
  if (route && rl < sizeof r->route) {
    memcpy(r->route, route, rl);
    r->route_len = rl;
  }
  lua_pop(L, 1);
  if (conn_write(c, o->data, o->len) != 0) {
    box->ws = NULL;
    free(ws);
    return refuse(L, "closed", 400);
  }
  wxd__http_access_log(c->w, r, "GET", 101, c->remote);
  /* Answered: the request leaves the in-flight gauge like any other (its
   * coroutine lives on as the connection's handler). */
  wxd__http_in_flight(c->w, -1);

  /* The request ends here; its coroutine is the WebSocket's from now on. */
  ws->conn = c;
  ws->handler = co;
  ws->worker = c->w->id;
  ws->topics = c->w->srv ? c->w->srv->ws_topics : NULL;
  ws->last_rx = uv_now(&c->w->loop);
  c->ws = ws;
  c->state = CONN_WS;
  c->req = NULL;
  c->discard_input = 0;
  wxd__http_conn_stop_timer(c);
  co->data = ws;
  co->done = on_handler_done;
  co->abandon = on_handler_abandoned;
  co->kind = WXD_CO_WS;
  r->co = NULL;
  r->in_handler = 0;
  r->conn = NULL;
  wxd__http_req_free(r);
  /* Frames the client sent right behind its handshake. */
  if (c->in.len) {
    wxd_buf_t q = c->in;
    memset(&c->in, 0, sizeof c->in);
    wxd__ws_input(c, q.data, q.len);
    wxd_buf_free(&q);
  }
  if (c->peer_eof && !c->closing) wxd__ws_input_end(c);
  else if (!c->closing && !ws->read_paused) wxd__http_conn_start_reading(c);
  return 1;
}

/* publish(topic, text) -> workers queued to (0: no subscriber here). */
static int ws_publish(lua_State *L) {
  size_t tn, n;
  const char *topic = check_topic(L, 1, &tn);
  const char *text = luaL_checklstring(L, 2, &n);
  if (!utf8_valid(text, n)) {
    lua_pushnil(L);
    lua_pushliteral(L, "invalid utf-8");
    return 2;
  }
  wxd_vm_t *vm = wxd_vm_get(L);
  lua_pushinteger(L, wxd_ws_publish(vm->ws_topics, topic, tn, text, n));
  return 1;
}

static int ws_utf8_valid(lua_State *L) {
  size_t n;
  const char *s = luaL_checklstring(L, 1, &n);
  lua_pushboolean(L, utf8_valid(s, n));
  return 1;
}

int wxd_open_ws(lua_State *L) {
  static const luaL_Reg methods[] = {{"receive", ws_receive},         {"send", ws_send},
                                     {"close", ws_close},             {"ping", ws_ping},
                                     {"subscribe", ws_subscribe},     {"unsubscribe", ws_unsubscribe},
                                     {NULL, NULL}};
  if (luaL_newmetatable(L, WS_MT)) {
    lua_createtable(L, 0, 6);
    luaL_register(L, NULL, methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, ws_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, ws_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
  static const luaL_Reg fns[] = {
      {"upgrade", ws_upgrade}, {"publish", ws_publish}, {"utf8_valid", ws_utf8_valid}, {NULL, NULL}};
  lua_createtable(L, 0, 3);
  luaL_register(L, NULL, fns);
  return 1;
}
