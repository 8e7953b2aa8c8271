/* fetch: the response side of a request (see fetch.h): llhttp callbacks
 * that collect the status, header fields and body within their bounds,
 * the scanner run before llhttp on the raw bytes, and the response table
 * handed to Lua. */
#include "fetch_internal.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- parser callbacks ---- */

#define CB_FAIL(r, k, m) \
  do {                   \
    (r)->cb_kind = (k);  \
    (r)->cb_err = (m);   \
    return -1;           \
  } while (0)

void wxd__fetch_resp_reset(fetch_req_t *r) {
  r->head.len = 0;
  r->body.len = 0;
  wxd_hdrs_reset(&r->hdrs, SIZE_MAX);
  r->in_trailers = 0;
  r->interim = 0;
  r->status = 0;
}

static int on_message_begin(llhttp_t *p) {
  wxd__fetch_resp_reset(p->data);
  return 0;
}

/* Header bytes are counted by the scanner, which sees the whole head. */
static int on_header_field(llhttp_t *p, const char *at, size_t len) {
  fetch_req_t *r = p->data;
  if (r->in_trailers) return 0; /* checked and counted by the scanner, never kept */
  int e = wxd_hdrs_name(&r->hdrs, &r->head, at, len);
  if (e == WXD_HDRS_TOO_MANY) CB_FAIL(r, K_TOO_LARGE, "too many response header fields");
  if (e) CB_FAIL(r, K_PROTOCOL, "out of memory");
  return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len) {
  fetch_req_t *r = p->data;
  if (r->in_trailers) return 0;
  if (wxd_hdrs_value(&r->hdrs, &r->head, at, len)) CB_FAIL(r, K_PROTOCOL, "out of memory");
  return 0;
}

static int on_header_value_complete(llhttp_t *p) {
  fetch_req_t *r = p->data;
  wxd_hdrs_value_done(&r->hdrs, &r->head);
  return 0;
}

static int on_headers_complete(llhttp_t *p) {
  fetch_req_t *r = p->data;
  int status = llhttp_get_status_code(p);
  r->status = status;
  if (llhttp_get_http_major(p) != 1) CB_FAIL(r, K_PROTOCOL, "unsupported HTTP version");
  if (status == 101) CB_FAIL(r, K_PROTOCOL, "unexpected 101 Switching Protocols");
  if (status < 100 || status > 999) CB_FAIL(r, K_PROTOCOL, "bad status code");
  if (status < 200) {
    /* 100 Continue, 103 Early Hints: interim, followed by the answer. */
    r->interim = 1;
    return 0;
  }
  r->in_trailers = 1;
  int bodiless = r->is_head || status == 204 || status == 304;
  if ((p->flags & F_CONTENT_LENGTH) && p->content_length > r->max_body && !bodiless)
    CB_FAIL(r, K_TOO_LARGE, "response body larger than max_body");
  /* Chunk sizes over max_body are refused as soon as their line is read. */
  if (p->flags & F_CHUNKED) wxd_scan_chunked(&r->scan, bodiless ? UINT64_MAX : r->max_body);
  /* A response to HEAD has no body whatever its headers say. */
  return r->is_head ? 1 : 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len) {
  fetch_req_t *r = p->data;
  if (r->body.len + len > r->max_body) CB_FAIL(r, K_TOO_LARGE, "response body larger than max_body");
  if (wxd_buf_append(&r->body, at, len)) CB_FAIL(r, K_PROTOCOL, "out of memory");
  return 0;
}

static int on_message_complete(llhttp_t *p) {
  fetch_req_t *r = p->data;
  if (!r->interim) r->complete = 1;
  return HPE_PAUSED; /* one response per request: stop at its end */
}

const llhttp_settings_t wxd__fetch_parser_settings = {
    .on_message_begin = on_message_begin,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_header_value_complete = on_header_value_complete,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

void wxd__fetch_push_response(fetch_req_t *r, lua_State *T) {
  lua_createtable(T, 0, 3);
  lua_pushinteger(T, r->status);
  lua_setfield(T, -2, "status");
  lua_createtable(T, 0, (int)r->hdrs.n);
  for (unsigned i = 0; i < r->hdrs.n; i++) {
    wxd_hdr_t *h = &r->hdrs.v[i];
    const char *name = r->head.data + h->name_off;
    const char *value = h->value_len ? r->head.data + h->value_off : "";
    int cookie = h->name_len == 10 && memcmp(name, "set-cookie", 10) == 0;
    lua_pushlstring(T, name, h->name_len);
    lua_pushvalue(T, -1);
    lua_rawget(T, -3);
    if (cookie) {
      /* Set-Cookie values may hold commas: always a list. */
      if (lua_isnil(T, -1)) {
        lua_pop(T, 1);
        lua_newtable(T);
        lua_pushvalue(T, -2);
        lua_pushvalue(T, -2);
        lua_rawset(T, -5);
      }
      lua_pushlstring(T, value, h->value_len);
      lua_rawseti(T, -2, (int)lua_objlen(T, -2) + 1);
      lua_pop(T, 2);
      continue;
    }
    if (lua_isnil(T, -1)) {
      lua_pop(T, 1);
      lua_pushlstring(T, value, h->value_len);
    } else {
      /* Repeated fields join with ", " (RFC 9110 section 5.3). */
      lua_pushliteral(T, ", ");
      lua_pushlstring(T, value, h->value_len);
      lua_concat(T, 3);
    }
    lua_rawset(T, -3);
  }
  lua_setfield(T, -2, "headers");
  lua_pushlstring(T, r->body.data ? r->body.data : "", r->body.len);
  lua_setfield(T, -2, "body");
}

/* Feeds response bytes. Returns 0 for more, 1 when the response is
 * complete (r->leftover tells whether bytes followed it), -1 on failure. */
int wxd__fetch_req_parse(fetch_req_t *r, const char *data, size_t len) {
  if (len > 0) r->got_bytes = 1;
  while (len > 0) {
    size_t chunk = len;
    if (r->scan.mode != WXD_SCAN_OFF) {
      int head = r->scan.mode == WXD_SCAN_HEAD;
      switch (wxd_scan(&r->scan, data, len, r->max_header, &chunk)) {
        case WXD_SCAN_OK: break;
        case WXD_SCAN_HEAD_TOO_LARGE:
          wxd__fetch_req_fail(r, K_TOO_LARGE, "%s", head ? "response headers too large" : "response trailers too large");
          return -1;
        case WXD_SCAN_BODY_TOO_LARGE:
          wxd__fetch_req_fail(r, K_TOO_LARGE, "%s", "response body larger than max_body");
          return -1;
        case WXD_SCAN_MALFORMED:
          wxd__fetch_req_fail(r, K_PROTOCOL, "%s", head ? "malformed response head (bare LF, obs-fold or a space in a field name)"
                                             : "malformed chunked body");
          return -1;
        default:
          wxd__fetch_req_fail(r, K_PROTOCOL, "%s", "malformed chunked body");
          return -1;
      }
    }
    llhttp_errno_t e = llhttp_execute(&r->parser, data, chunk);
    if (e == HPE_PAUSED) {
      size_t used = (size_t)(llhttp_get_error_pos(&r->parser) - data);
      data += used;
      len -= used;
      llhttp_resume(&r->parser);
      if (r->complete) {
        r->leftover = len > 0;
        return 1;
      }
      /* An interim 1xx: its head is done, the real response follows. */
      r->interim = 0;
      r->in_trailers = 0;
      wxd_scan_head(&r->scan, 0);
      continue;
    }
    if (e != HPE_OK) {
      if (r->cb_kind) wxd__fetch_req_fail(r, r->cb_kind, "%s", r->cb_err);
      else wxd__fetch_req_fail(r, K_PROTOCOL, "malformed response: %s", llhttp_get_error_reason(&r->parser));
      return -1;
    }
    data += chunk;
    len -= chunk;
  }
  return 0;
}
