/* httplua: the Lua side of a request.
 *
 * A parsed request becomes a coroutine running the app's entry with the raw
 * request table (lua/wxd/app.lua wraps it); what the handler returns, or
 * streams with wxd.core.http.write(), becomes the response.
 */
#include "http_internal.h"

#include <ctype.h>
#include <lauxlib.h>
#include <stdio.h>

#include "log.h"
#include "metrics.h"
#include "query.h"

static void fmt_hex(char *out, uint64_t v, int digits) {
  static const char hex[] = "0123456789abcdef";
  for (int i = digits - 1; i >= 0; i--) {
    out[i] = hex[v & 15];
    v >>= 4;
  }
}

static int tchar(unsigned char ch) {
  return isalnum(ch) || strchr("!#$%&'*+-.^_`|~", ch) != NULL;
}

static int header_name_ok(const char *s, size_t n) {
  if (n == 0) return 0;
  for (size_t i = 0; i < n; i++)
    if (!tchar((unsigned char)s[i])) return 0;
  return 1;
}

static int header_value_ok(const char *s, size_t n) {
  for (size_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)s[i];
    if (ch == '\r' || ch == '\n' || ch == 0) return 0;
  }
  return 1;
}

/* Appends one user header; returns 0, or -1 for an invalid one. */
static int append_header(wxd_buf_t *o, const char *name, size_t nl, const char *val, size_t vl) {
  if (!header_value_ok(val, vl)) return -1;
  if (wxd_buf_reserve(o, nl + vl + 4)) return -1;
  memcpy(o->data + o->len, name, nl);
  o->len += nl;
  o->data[o->len++] = ':';
  o->data[o->len++] = ' ';
  memcpy(o->data + o->len, val, vl);
  o->len += vl;
  o->data[o->len++] = '\r';
  o->data[o->len++] = '\n';
  return 0;
}

/* Framing headers belong to the server. */
static int reserved_header(const char *name, size_t nl) {
  return (nl == 14 && strncasecmp(name, "content-length", 14) == 0) ||
         (nl == 17 && strncasecmp(name, "transfer-encoding", 17) == 0) ||
         (nl == 10 && strncasecmp(name, "connection", 10) == 0);
}

/* A Content-Length value the app set: digits only, else -1. */
static int64_t parse_length(lua_State *T, int idx) {
  size_t n;
  const char *v = lua_type(T, idx) == LUA_TSTRING || lua_type(T, idx) == LUA_TNUMBER ? lua_tolstring(T, idx, &n) : NULL;
  if (!v || n == 0 || n > 15) return -1;
  int64_t x = 0;
  for (size_t i = 0; i < n; i++) {
    if (v[i] < '0' || v[i] > '9') return -1;
    x = x * 10 + (v[i] - '0');
  }
  return x;
}

/* Serialises the headers table at `idx` of T into o. Returns 0 or -1 with a
 * message in *why. Sets *has_date and *has_server when the app set them.
 * The framing headers are never copied. With `length`, a Content-Length the
 * app set is reported there (else -1; an invalid one is an error): a stream
 * uses it. Without, it is ignored like the other framing headers. */
static int append_lua_headers(lua_State *T, int idx, wxd_buf_t *o, int *has_date, int *has_server,
                              const char **why, int64_t *length) {
  if (length) *length = -1;
  if (lua_isnil(T, idx)) return 0;
  if (!lua_istable(T, idx)) {
    *why = "headers must be a table";
    return -1;
  }
  lua_pushnil(T);
  while (lua_next(T, idx) != 0) {
    if (lua_type(T, -2) != LUA_TSTRING) {
      lua_pop(T, 2);
      *why = "header names must be strings";
      return -1;
    }
    size_t nl;
    const char *name = lua_tolstring(T, -2, &nl);
    if (!header_name_ok(name, nl)) {
      lua_pop(T, 2);
      *why = "invalid header name";
      return -1;
    }
    if (reserved_header(name, nl)) {
      if (length && nl == 14 && (*length = parse_length(T, -1)) < 0) {
        lua_pop(T, 2);
        *why = "invalid Content-Length";
        return -1;
      }
      lua_pop(T, 1);
      continue;
    }
    if (nl == 4 && strncasecmp(name, "date", 4) == 0) *has_date = 1;
    if (nl == 6 && strncasecmp(name, "server", 6) == 0) *has_server = 1;
    int t = lua_type(T, -1);
    if (t == LUA_TSTRING || t == LUA_TNUMBER) {
      size_t vl;
      const char *v = lua_tolstring(T, -1, &vl);
      if (append_header(o, name, nl, v, vl)) {
        lua_pop(T, 2);
        *why = "invalid header value (CR, LF or NUL)";
        return -1;
      }
    } else if (t == LUA_TTABLE) {
      int n = (int)lua_objlen(T, -1);
      for (int i = 1; i <= n; i++) {
        lua_rawgeti(T, -1, i);
        size_t vl;
        const char *v = lua_tolstring(T, -1, &vl);
        if (!v || append_header(o, name, nl, v, vl)) {
          lua_pop(T, 3);
          *why = "invalid header value in list";
          return -1;
        }
        lua_pop(T, 1);
      }
    } else {
      lua_pop(T, 2);
      *why = "header values must be strings, numbers or lists of strings";
      return -1;
    }
    lua_pop(T, 1);
  }
  return 0;
}

static int status_has_body(int status) {
  return !(status < 200 || status == 204 || status == 304);
}

/* The field names and common values of the raw request table, interned once
 * per VM and fetched by index: profiles of /hello showed lua_setfield's
 * string interning among the top costs. */
enum {
  S_METHOD = 1, S_PATH, S_QUERY_STRING, S_VERSION, S_HEADERS, S_BODY, S_REMOTE_ADDR,
  S_REMOTE_PORT, S_ID, S_V11, S_V10, S_EMPTY, S_METHODS, S_COUNT = S_METHODS
};

static int push_http_strings(lua_State *T, wxd_vm_t *vm) {
  if (vm->http_strings_ref == LUA_NOREF) {
    static const char *const names[] = {"method", "path", "query_string", "version", "headers", "body",
                                        "remote_addr", "remote_port", "id", "1.1", "1.0", ""};
    lua_createtable(T, S_COUNT, 0);
    for (int i = 0; i < S_COUNT - 1; i++) {
      lua_pushstring(T, names[i]);
      lua_rawseti(T, -2, i + 1);
    }
    /* Method names by llhttp's method number + 1, filled as methods come
     * (llhttp_method_name aborts on numbers it does not know). */
    lua_createtable(T, 8, 0);
    lua_rawseti(T, -2, S_METHODS);
    lua_pushvalue(T, -1);
    vm->http_strings_ref = luaL_ref(T, LUA_REGISTRYINDEX);
  } else {
    lua_rawgeti(T, LUA_REGISTRYINDEX, vm->http_strings_ref);
  }
  return lua_gettop(T);
}

/* Sets tbl[strings[key]] = the value on top of the stack (popped). */
static void set_field(lua_State *T, int tbl, int strings, int key) {
  lua_rawgeti(T, strings, key);
  lua_insert(T, -2);
  lua_rawset(T, tbl);
}

/* raw.tls on HTTPS connections (wxd.app derives req.scheme from it). */
static void push_tls_info(lua_State *T, const wxd_tls_info_t *ti, int tbl) {
  lua_createtable(T, 0, 7);
  lua_pushstring(T, ti->version);
  lua_setfield(T, -2, "version");
  lua_pushstring(T, ti->cipher);
  lua_setfield(T, -2, "cipher");
  lua_pushboolean(T, ti->client_verified);
  lua_setfield(T, -2, "client_verified");
  const char *opt[4][2] = {{"server_name", ti->server_name},
                           {"client_subject", ti->client_subject},
                           {"client_issuer", ti->client_issuer},
                           {"client_serial", ti->client_serial}};
  for (int i = 0; i < 4; i++) {
    if (!opt[i][1]) continue;
    lua_pushstring(T, opt[i][1]);
    lua_setfield(T, -2, opt[i][0]);
  }
  lua_setfield(T, tbl, "tls");
}

/* Pushes the raw request table the Lua side wraps (lua/wxd/app.lua). */
static void push_raw_request(lua_State *T, wxd_req_t *r, wxd_vm_t *vm) {
  wxd_conn_t *c = r->conn;
  int st = push_http_strings(T, vm);
  /* Room for the fields below and the few wxd.app adds (params, query). */
  lua_createtable(T, 0, 16);
  int tbl = lua_gettop(T);
  lua_rawgeti(T, st, S_METHODS);
  lua_rawgeti(T, -1, r->method + 1);
  if (lua_isnil(T, -1)) {
    lua_pop(T, 1);
    lua_pushstring(T, llhttp_method_name(r->method));
    lua_pushvalue(T, -1);
    lua_rawseti(T, -3, r->method + 1);
  }
  lua_remove(T, -2);
  set_field(T, tbl, st, S_METHOD);
  const char *url = r->head.data;
  const char *q = memchr(url, '?', r->url_len);
  size_t plen = q ? (size_t)(q - url) : r->url_len;
  lua_pushlstring(T, url, plen);
  set_field(T, tbl, st, S_PATH);
  if (q) lua_pushlstring(T, q + 1, r->url_len - plen - 1);
  else lua_rawgeti(T, st, S_EMPTY);
  set_field(T, tbl, st, S_QUERY_STRING);
  lua_rawgeti(T, st, r->http_minor == 1 ? S_V11 : S_V10);
  set_field(T, tbl, st, S_VERSION);
  lua_createtable(T, 0, (int)r->hdrs.n);
  for (unsigned i = 0; i < r->hdrs.n; i++) {
    wxd_hdr_t *h = &r->hdrs.v[i];
    lua_pushlstring(T, r->head.data + h->name_off, h->name_len);
    lua_pushvalue(T, -1);
    lua_rawget(T, -3);
    if (lua_isnil(T, -1)) {
      lua_pop(T, 1);
      lua_pushlstring(T, r->head.data + h->value_off, h->value_len);
    } else {
      /* Repeated field: join as RFC 9110 5.3 allows. */
      lua_pushliteral(T, ", ");
      lua_pushlstring(T, r->head.data + h->value_off, h->value_len);
      lua_concat(T, 3);
    }
    lua_rawset(T, -3);
  }
  set_field(T, tbl, st, S_HEADERS);
  if (r->body.len) lua_pushlstring(T, r->body.data, r->body.len);
  else lua_rawgeti(T, st, S_EMPTY);
  set_field(T, tbl, st, S_BODY);
  lua_pushstring(T, c->remote);
  set_field(T, tbl, st, S_REMOTE_ADDR);
  lua_pushinteger(T, c->remote_port);
  set_field(T, tbl, st, S_REMOTE_PORT);
  lua_pushlstring(T, r->id, 18);
  set_field(T, tbl, st, S_ID);
  if (c->tls_info) push_tls_info(T, c->tls_info, tbl);
  lua_remove(T, st); /* the request table is left on top */
}

static const char *find_header_value(wxd_req_t *r, const char *name, size_t nl, size_t *len) {
  int i = wxd_hdrs_find(&r->hdrs, &r->head, name, nl);
  if (i < 0) return NULL;
  *len = r->hdrs.v[i].value_len;
  return r->head.data + r->hdrs.v[i].value_off;
}

/* The value of the field noted at index idx while parsing (-1: none). */
static const char *noted_header(wxd_req_t *r, int idx, size_t *len) {
  if (idx < 0) return NULL;
  *len = r->hdrs.v[idx].value_len;
  return r->head.data + r->hdrs.v[idx].value_off;
}

static void log_request_error(wxd_req_t *r, const char *what, const char *detail) {
  char extra[4096];
  char esc[3400];
  size_t el = wxd_json_escape(esc, sizeof esc, detail, strlen(detail));
  const wxd_trace_t *t = wxd__http_trace(r);
  if (t)
    snprintf(extra, sizeof extra,
             "\"id\":\"%s\",\"error\":\"%.*s\",\"trace_id\":\"%s\",\"span_id\":\"%s\",\"request_id\":\"%s\"",
             r->id, (int)el, esc, t->trace_id, t->span_id, t->request_id);
  else /* trace = false (or refused before dispatch): no trace context */
    snprintf(extra, sizeof extra, "\"id\":\"%s\",\"error\":\"%.*s\"", r->id, (int)el, esc);
  wxd_log(WXD_LOG_ERROR, r->w->id, what, extra);
}

/* Async-signal-safe appends (no stdio): the watchdog's signal handler
 * describes the running request with them. */
static size_t put(char *out, size_t n, size_t cap, const char *s, size_t len) {
  for (size_t i = 0; i < len && n + 1 < cap; i++) out[n++] = s[i];
  out[n < cap ? n : cap - 1] = 0;
  return n;
}

static size_t put_str(char *out, size_t n, size_t cap, const char *s) {
  size_t len = 0;
  while (s[len]) len++;
  return put(out, n, cap, s, len);
}

/* JSON-safe by construction: quotes, backslashes and control bytes become
 * '?' (a log line's route needs no exact escaping). */
static size_t put_json_safe(char *out, size_t n, size_t cap, const char *s, size_t len) {
  for (size_t i = 0; i < len && n + 1 < cap; i++) {
    unsigned char ch = (unsigned char)s[i];
    out[n++] = (ch < 0x20 || ch == '"' || ch == '\\' || ch == 0x7f) ? '?' : (char)ch;
  }
  out[n < cap ? n : cap - 1] = 0;
  return n;
}

/* The request's path (no query), JSON-safe, at most 256 bytes. */
static size_t wxd_req_describe_path(const wxd_req_t *r, char *out, size_t cap) {
  const char *url = r->head.data;
  size_t len = url ? r->url_len : 0;
  for (size_t i = 0; i < len; i++)
    if (url[i] == '?') len = i;
  if (len > 256) len = 256;
  out[0] = 0;
  return put_json_safe(out, 0, cap, url ? url : "", len);
}

void wxd_http_describe_co(wxd_co_t *co, char *out, size_t cap) {
  static const char *const kinds[] = {"?", "script", "request", "timer", "redis", "task"};
  size_t n = put_str(out, 0, cap, "\"kind\":\"");
  n = put_str(out, n, cap, co->kind >= 1 && co->kind <= 5 ? kinds[co->kind] : "?");
  n = put_str(out, n, cap, "\"");
  if (co->kind != WXD_CO_REQUEST || !co->data) return;
  wxd_req_t *r = co->data;
  n = put_str(out, n, cap, ",\"id\":\"");
  n = put_json_safe(out, n, cap, r->id, 18);
  n = put_str(out, n, cap, "\",\"method\":\"");
  n = put_str(out, n, cap, llhttp_method_name(r->method));
  n = put_str(out, n, cap, "\",\"path\":\"");
  char path[300];
  size_t pl = wxd_req_describe_path(r, path, sizeof path);
  n = put(out, n, cap, path, pl);
  put_str(out, n, cap, "\"");
}

/* A handler the watchdog stopped (watchdog.c): the route is what an
 * operator needs to find the loop. */
static void log_runaway(wxd_req_t *r, int why, const char *traceback) {
  char extra[4600], path[600], esc[3500];
  size_t plen = wxd_req_describe_path(r, path, sizeof path);
  size_t el = wxd_json_escape(esc, sizeof esc, traceback, strlen(traceback));
  snprintf(extra, sizeof extra,
           "\"id\":\"%s\",\"method\":\"%s\",\"path\":\"%.*s\",\"reason\":\"%s\",\"ms\":%.0f,\"error\":\"%.*s\"",
           r->id, llhttp_method_name(r->method), (int)plen, path, why == WXD_RUNAWAY_MEMORY ? "memory" : "time", (double)(uv_hrtime() - r->start_ns) / 1e6, (int)el, esc);
  wxd_log(WXD_LOG_ERROR, r->w->id, "runaway handler stopped", extra);
}

/* Sends the handler's results (status, headers, body on T). */
static void respond_from_lua(wxd_req_t *r, lua_State *T) {
  wxd_conn_t *c = r->conn;
  wxd_worker_t *w = r->w;
  int top = lua_gettop(T);
  if (r->streaming) {
    /* A handler that streamed may still return a last piece of body. */
    size_t bl = 0;
    const char *body = top >= 3 && lua_type(T, 3) == LUA_TSTRING ? lua_tolstring(T, 3, &bl) : NULL;
    if (top >= 4 && lua_toboolean(T, 4)) {
      /* The handler failed after its status went out: the only honest
       * signal left is to cut the response short. */
      r->keep_alive = 0;
      wxd__http_conn_close(c);
      return;
    }
    if (r->stream_nobody) return;
    if (r->stream_sized) {
      /* The promised length, no more and no less: a short body is cut
       * short (the client sees the connection end before it). */
      if (bl > r->stream_left) bl = (size_t)r->stream_left;
      if (bl) conn_write(c, body, bl);
      r->stream_left -= bl;
      r->bytes_out += bl;
      if (r->stream_left) {
        log_request_error(r, "response shorter than its Content-Length", "connection closed");
        r->keep_alive = 0;
        wxd__http_conn_close(c);
      }
      return;
    }
    if (r->stream_raw) {
      if (bl) conn_write(c, body, bl);
    } else {
      char sz[32];
      uv_buf_t b[3];
      unsigned nb = 0;
      int sl = 0;
      if (bl) {
        sl = snprintf(sz, sizeof sz, "%zx\r\n", bl);
        b[nb++] = uv_buf_init(sz, (unsigned)sl);
        b[nb++] = uv_buf_init((char *)body, (unsigned)bl);
        b[nb++] = uv_buf_init("\r\n0\r\n\r\n", 7);
      } else {
        b[nb++] = uv_buf_init("0\r\n\r\n", 5);
      }
      wxd__http_conn_writev(c, b, nb);
    }
    r->bytes_out += bl;
    return;
  }
  const char *why = NULL;
  if (top < 1 || !lua_isnumber(T, 1)) why = "handler returned no status";
  int status = why ? 500 : (int)lua_tointeger(T, 1);
  /* 1xx are interim responses, never the answer to a request. */
  if (!why && (status < 200 || status > 999)) why = "handler returned an invalid status (expected 200..999)";
  size_t bl = 0;
  const char *body = NULL;
  if (!why && top >= 3 && !lua_isnil(T, 3)) {
    if (lua_type(T, 3) != LUA_TSTRING) why = "handler returned a body that is not a string";
    else body = lua_tolstring(T, 3, &bl);
  }
  wxd_buf_t *o = &w->out;
  int has_date = 0, has_server = 0;
  if (!why) {
    wxd__http_start_head(o, status);
    /* A whole body's length is its own: a Content-Length set is ignored. */
    if (top >= 2) append_lua_headers(T, 2, o, &has_date, &has_server, &why, NULL);
  }
  if (why) {
    log_request_error(r, "bad handler result", why);
    wxd__http_respond_error_500(r);
    return;
  }
  r->status = status;
  if (status_has_body(status)) {
    char cl[48];
    memcpy(cl, "Content-Length: ", 16);
    size_t n = 16 + fmt_uint(cl + 16, bl);
    cl[n++] = '\r';
    cl[n++] = '\n';
    wxd_buf_append(o, cl, n);
  } else {
    bl = 0;
  }
  wxd__http_add_request_id(o, r);
  wxd__http_end_head(w, o, has_date, has_server, r->keep_alive);
  r->bytes_out = o->len + bl;
  if (r->is_head || bl == 0) {
    conn_write(c, o->data, o->len);
  } else if (bl <= 16384) {
    /* Small bodies go in the same buffer: one syscall, one packet. */
    wxd_buf_append(o, body, bl);
    conn_write(c, o->data, o->len);
  } else {
    uv_buf_t b[2] = {uv_buf_init(o->data, (unsigned)o->len), uv_buf_init((char *)body, (unsigned)bl)};
    wxd__http_conn_writev(c, b, 2);
  }
}

static void on_request_done(wxd_co_t *co, int status) {
  wxd_req_t *r = co->data;
  r->co = NULL;
  /* lua/wxd/server.lua returns the matched route pattern fifth (metrics). */
  if (status == 0 && lua_gettop(co->T) >= 5 && lua_type(co->T, 5) == LUA_TSTRING) {
    size_t rl;
    const char *route = lua_tolstring(co->T, 5, &rl);
    if (rl < sizeof r->route) {
      memcpy(r->route, route, rl);
      r->route_len = rl;
    }
  }
  if (status != 0) {
    /* lua/wxd/server.lua catches handler errors; reaching here means the
     * wrapper itself failed. */
    const char *msg = lua_tostring(co->T, -1);
    wxd_co_traceback(co, msg ? msg : "(error object is not a string)");
    if (co->runaway) log_runaway(r, co->runaway, lua_tostring(co->vm->L, -1));
    else log_request_error(r, "request failed", lua_tostring(co->vm->L, -1));
    lua_pop(co->vm->L, 1);
    if (r->conn && !r->streaming && co->runaway) {
      wxd__http_respond_error(r, 503, co->runaway == WXD_RUNAWAY_MEMORY
                                          ? "service unavailable: the handler used too much memory"
                                          : "service unavailable: the handler ran too long");
    } else if (r->conn && !r->streaming) {
      wxd__http_respond_error_500(r);
    } else if (r->conn) {
      /* Headers are out: cut the response short rather than end it. */
      r->keep_alive = 0;
      wxd__http_conn_close(r->conn);
    }
  } else if (r->conn) {
    respond_from_lua(r, co->T);
  }
  wxd__http_req_finish(r);
}

/* The worker stops while the handler still waits (shutdown deadline). */
static void on_request_abandoned(wxd_co_t *co) {
  wxd_req_t *r = co->data;
  wxd__http_in_flight(r->w, -1);
  if (r->conn) r->conn->req = NULL;
  wxd__http_req_free(r);
}

void wxd__http_dispatch(wxd_conn_t *c) {
  wxd_worker_t *w = c->w;
  wxd_req_t *r = c->req;
  c->state = CONN_HANDLING;
  wxd__http_conn_stop_timer(c);
  c->nreq++;
  r->keep_alive = r->wants_keep_alive && !w->draining && c->nreq < w->cfg->limits.max_requests;
  /* Bytes after a request that ends the connection are never parsed: a
   * request smuggled behind "Connection: close" reaches no handler. */
  if (!r->keep_alive) c->discard_input = 1;
  r->in_handler = 1;
  w->seq++;
  atomic_fetch_add_explicit(&w->stats.requests, 1, memory_order_relaxed);
  /* 18 hex digits: random per worker and run, worker index, sequence. */
  fmt_hex(r->id, w->id_prefix, 8);
  fmt_hex(r->id + 8, (uint64_t)(w->id & 0xff), 2);
  fmt_hex(r->id + 10, w->seq & 0xffffffffu, 8);
  r->id[18] = 0;
  if (w->cfg->trace) {
    /* The request id now (every response names it); the trace ids when
     * something first asks (wxd__http_trace). */
    size_t ridl = 0;
    const char *rid = noted_header(r, r->rid_idx, &ridl);
    wxd_trace_set_request_id(&r->trace, rid, ridl, r->id);
    r->trace.trace_id[0] = 0;
    r->trace.openid[0] = 0;
    r->trace.gray[0] = 0;
    r->trace_pending = 1;
  } else {
    wxd_trace_none(&r->trace, r->id);
  }
  wxd__http_in_flight(w, 1);
  wxd_co_t *co = wxd_co_new(w->vm, WXD_CO_REQUEST, on_request_done, r);
  if (!co) {
    wxd__http_respond_error_500(r);
    wxd__http_req_finish(r);
    return;
  }
  r->co = co;
  co->abandon = on_request_abandoned;
  lua_rawgeti(co->T, LUA_REGISTRYINDEX, w->vm->entry_ref);
  push_raw_request(co->T, r, w->vm);
  wxd_co_resume(co, 1);
}

/* ---- Lua: response streaming ---- */

void wxd__http_maybe_resume_streamer(wxd_conn_t *c) {
  if (c->ws) {
    wxd__ws_on_drain(c);
    return;
  }
  wxd_req_t *r = c->req;
  if (!r || !r->drain_wait || !r->co) return;
  if (r->file) {
    wxd__http_file_continue(r);
    return;
  }
  if (uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) > OUTPUT_LOW_WATER) return;
  r->drain_wait = 0;
  lua_pushboolean(r->co->T, 1);
  wxd_co_resume(r->co, 1);
}

/* wxd.core.http.write(chunk, status, headers): sends the status line and
 * headers on the first call, then chunk after chunk (chunked encoding, or
 * close-delimited for HTTP/1.0). Waits when the client reads slowly.
 * Returns true, or nil, "closed". */
static int http_write(lua_State *L) {
  size_t len;
  const char *chunk = luaL_checklstring(L, 1, &len);
  wxd_co_t *co = wxd_co_lookup(L);
  if (!co || co->kind != WXD_CO_REQUEST) return luaL_error(L, "response write: not in a request handler");
  wxd_req_t *r = co->data;
  wxd_conn_t *c = r->conn;
  if (!c || c->closing) {
    lua_pushnil(L);
    lua_pushliteral(L, "closed");
    return 2;
  }
  if (!r->streaming) {
    int status = (int)luaL_optinteger(L, 2, 200);
    if (status < 200 || status > 999) return luaL_argerror(L, 2, "status must be in 200..999");
    if (!lua_isnoneornil(L, 3)) luaL_checktype(L, 3, LUA_TTABLE);
    wxd_buf_t *o = &r->w->out;
    int has_date = 0, has_server = 0;
    const char *why = NULL;
    int64_t length;
    wxd__http_start_head(o, status);
    if (append_lua_headers(L, 3, o, &has_date, &has_server, &why, &length) != 0)
      return luaL_error(L, "response write: %s", why);
    r->stream_nobody = r->is_head || !status_has_body(status);
    if (length >= 0 && status_has_body(status)) {
      /* The app knows the length (a file): identity coding, and the
       * connection may stay open. HEAD gets the length too. */
      char cl[48];
      memcpy(cl, "Content-Length: ", 16);
      size_t n = 16 + fmt_uint(cl + 16, (uint64_t)length);
      cl[n++] = '\r';
      cl[n++] = '\n';
      wxd_buf_append(o, cl, n);
      r->stream_sized = !r->stream_nobody;
      r->stream_left = (uint64_t)length;
    }
    r->stream_raw = r->http_minor == 0 && !r->stream_nobody && !r->stream_sized;
    if (r->stream_raw) r->keep_alive = 0;
    else if (status_has_body(status) && !r->stream_sized && length < 0)
      wxd_buf_append(o, "Transfer-Encoding: chunked\r\n", 28);
    wxd__http_add_request_id(o, r);
    wxd__http_end_head(r->w, o, has_date, has_server, r->keep_alive);
    r->status = status;
    r->streaming = 1;
    r->bytes_out += o->len;
    if (conn_write(c, o->data, o->len) != 0) {
      lua_pushnil(L);
      lua_pushliteral(L, "closed");
      return 2;
    }
  }
  if (len > 0 && !r->stream_nobody) {
    int rc;
    if (r->stream_sized && len > r->stream_left)
      return luaL_error(L, "response write: more bytes than the Content-Length set");
    if (r->stream_sized) r->stream_left -= len;
    if (r->stream_raw || r->stream_sized) {
      rc = conn_write(c, chunk, len);
    } else {
      char sz[32];
      int sl = snprintf(sz, sizeof sz, "%zx\r\n", len);
      uv_buf_t b[3] = {uv_buf_init(sz, (unsigned)sl), uv_buf_init((char *)chunk, (unsigned)len),
                       uv_buf_init("\r\n", 2)};
      rc = wxd__http_conn_writev(c, b, 3);
    }
    if (rc != 0) {
      lua_pushnil(L);
      lua_pushliteral(L, "closed");
      return 2;
    }
    r->bytes_out += len;
  }
  /* Waits for the client only where the coroutine can yield (not inside a
   * string.gsub callback, say): the bytes are queued either way. */
  if (uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) > OUTPUT_HIGH_WATER && lua_isyieldable(L)) {
    r->drain_wait = 1;
    return wxd_co_yield(co, L, 0);
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* ---- per-route body limits ---- */

#define BODY_LIMIT_KEY "wxd.http.body_limit"

/* wxd.core.http.set_body_limit(fn): fn(method, path) -> bytes | nil, asked
 * by the core for each request with a body before it reads the body. One
 * per VM (generation): it lives in the VM's registry. */
static int http_set_body_limit(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_pushvalue(L, 1);
  lua_setfield(L, LUA_REGISTRYINDEX, BODY_LIMIT_KEY);
  return 0;
}

size_t wxd__http_body_limit(wxd_req_t *r, size_t dflt) {
  wxd_vm_t *vm = r->w->vm;
  if (!vm) return dflt;
  lua_State *L = vm->L;
  int top = lua_gettop(L);
  lua_getfield(L, LUA_REGISTRYINDEX, BODY_LIMIT_KEY);
  if (!lua_isfunction(L, -1)) {
    lua_settop(L, top);
    return dflt;
  }
  const char *url = r->head.data;
  const char *q = memchr(url, '?', r->url_len);
  lua_pushstring(L, llhttp_method_name(r->method));
  lua_pushlstring(L, url, q ? (size_t)(q - url) : r->url_len);
  if (lua_pcall(L, 2, 1, 0) != 0) {
    /* A router that fails here fails the request later too; the global
     * limit applies meanwhile. */
    log_request_error(r, "body limit lookup failed", lua_tostring(L, -1) ? lua_tostring(L, -1) : "?");
  } else if (lua_type(L, -1) == LUA_TNUMBER) {
    lua_Number n = lua_tonumber(L, -1);
    if (n >= 0 && n < 1e15) dflt = (size_t)n;
  }
  lua_settop(L, top);
  return dflt;
}

/* ---- Lua: the request's trace context ---- */

static wxd_req_t *current_request(lua_State *L) {
  wxd_co_t *co = wxd_co_lookup(L);
  return co && co->kind == WXD_CO_REQUEST ? co->data : NULL;
}

wxd_trace_t *wxd__http_trace(wxd_req_t *r) {
  if (r->trace_pending) {
    size_t tpl = 0;
    const char *tp = noted_header(r, r->tp_idx, &tpl);
    if (r->trace_drawn) wxd_trace_set_new(&r->trace, r->trace_draw);
    else wxd_trace_make_ids(&r->trace, tp, tpl);
    r->trace_pending = r->trace_drawn = 0;
  }
  return r->trace.trace_id[0] ? &r->trace : NULL;
}

wxd_trace_t *wxd_trace_of(wxd_co_t *co) {
  if (!co) return NULL;
  if (co->kind == WXD_CO_REQUEST) return wxd__http_trace(co->data);
  return wxd_task_trace(co);
}

/* wxd.core.http.trace_context([openid_header]) -> trace_id, span_id,
 * parent_id|nil, flags, request_id, tracestate|nil, openid|nil; nothing
 * outside a request handler. The openid is the one set_openid recorded, or
 * else the named request header's (lower-case name), when it is sane. */
static int http_trace_context(lua_State *L) {
  wxd_req_t *r = current_request(L);
  wxd_trace_t *t = r ? wxd__http_trace(r) : wxd_task_trace(wxd_co_lookup(L));
  if (!t || !t->trace_id[0]) return 0; /* trace = false: no context */
  size_t hl = 0, vl = 0;
  const char *hname = luaL_optlstring(L, 1, NULL, &hl);
  if (r && !t->openid[0] && hname) {
    const char *v = find_header_value(r, hname, hl, &vl);
    if (v && wxd_trace_id_ok(v, vl, WXD_TRACE_OPENID_MAX)) {
      memcpy(t->openid, v, vl);
      t->openid[vl] = 0;
    }
  }
  lua_pushstring(L, t->trace_id);
  lua_pushstring(L, t->span_id);
  if (t->parent_id[0]) lua_pushstring(L, t->parent_id);
  else lua_pushnil(L);
  lua_pushinteger(L, t->flags);
  lua_pushstring(L, t->request_id);
  /* tracestate belongs to a valid traceparent only (W3C 3.3). */
  const char *ts = r && t->parent_id[0] ? find_header_value(r, "tracestate", 10, &vl) : NULL;
  if (ts && vl <= 512 && header_value_ok(ts, vl)) lua_pushlstring(L, ts, vl);
  else lua_pushnil(L);
  if (t->openid[0]) lua_pushstring(L, t->openid);
  else lua_pushnil(L);
  return 7;
}

/* wxd.core.http.span_context(rate) -> trace_id, span_id, parent_id|nil,
 * seconds since the request's first byte, when its span is sampled, false when it is not, nothing
 * outside a request or with trace = false. Sampled: the caller's flag when
 * it sent a traceparent, else the trace id's digits 17..24 read as a share
 * of 2^32 below rate (wxd.trace's rule, the same on every node). The
 * exporter asks after each request: an unsampled one makes no strings. */
static int http_span_context(lua_State *L) {
  double rate = luaL_checknumber(L, 1);
  wxd_req_t *r = current_request(L);
  if (r && r->trace_pending && r->tp_idx < 0 && rate > 0 && rate < 1) {
    /* A new trace nothing has asked about yet: decide on the drawn ids,
     * and write them out only when sampled (or when asked later). */
    if (!r->trace_drawn) {
      wxd_trace_draw(r->trace_draw);
      r->trace_drawn = 1;
    }
    if (!((double)(r->trace_draw[1] >> 32) / 4294967296.0 < rate)) {
      lua_pushboolean(L, 0);
      return 1;
    }
  }
  wxd_trace_t *t = r ? wxd__http_trace(r) : NULL;
  if (!t) return 0;
  int sampled;
  if (t->parent_id[0]) {
    sampled = t->flags & 1;
  } else if (rate <= 0 || rate >= 1) {
    sampled = rate >= 1;
  } else {
    uint32_t v = 0;
    for (int i = 16; i < 24; i++) {
      char ch = t->trace_id[i];
      v = v << 4 | (uint32_t)(ch <= '9' ? ch - '0' : ch - 'a' + 10);
    }
    sampled = (double)v / 4294967296.0 < rate;
  }
  if (!sampled) {
    lua_pushboolean(L, 0);
    return 1;
  }
  lua_pushlstring(L, t->trace_id, 32);
  lua_pushlstring(L, t->span_id, 16);
  if (t->parent_id[0]) lua_pushlstring(L, t->parent_id, 16);
  else lua_pushnil(L);
  lua_pushnumber(L, (double)(uv_hrtime() - r->start_ns) / 1e9);
  return 4;
}

/* wxd.core.http.incoming_trace() -> traceparent|nil, tracestate|nil,
 * x-request-id|nil: what the caller sent, when valid (a traceparent under
 * the W3C rules, tracestate only with it, a sane request id); nothing
 * outside a request handler. With trace = false, outbound calls pass these
 * on unchanged instead of a context of wxd's own. */
static int http_incoming_trace(lua_State *L) {
  wxd_req_t *r = current_request(L);
  if (!r) return 0;
  size_t tpl = 0, tsl = 0, ridl = 0;
  char tid[33], pid[17];
  uint8_t flags;
  const char *tp = find_header_value(r, "traceparent", 11, &tpl);
  if (tp && wxd_trace_parse(tp, tpl, tid, pid, &flags)) {
    lua_pushfstring(L, "00-%s-%s-%c%c", tid, pid, "0123456789abcdef"[flags >> 4], "0123456789abcdef"[flags & 15]);
    const char *ts = find_header_value(r, "tracestate", 10, &tsl);
    if (ts && tsl <= 512 && header_value_ok(ts, tsl)) lua_pushlstring(L, ts, tsl);
    else lua_pushnil(L);
  } else {
    lua_pushnil(L);
    lua_pushnil(L);
  }
  const char *rid = find_header_value(r, "x-request-id", 12, &ridl);
  if (rid && wxd_trace_id_ok(rid, ridl, WXD_TRACE_REQUEST_ID_MAX)) lua_pushlstring(L, rid, ridl);
  else lua_pushnil(L);
  return 3;
}

/* wxd.core.http.set_openid(openid) -> true, or false when it is not sane
 * or outside a request. */
static int http_set_openid(lua_State *L) {
  size_t n;
  const char *v = luaL_checklstring(L, 1, &n);
  wxd_trace_t *t = wxd_trace_of(wxd_co_lookup(L));
  int ok = t && wxd_trace_id_ok(v, n, WXD_TRACE_OPENID_MAX);
  if (ok) {
    memcpy(t->openid, v, n);
    t->openid[n] = 0;
  }
  lua_pushboolean(L, ok);
  return 1;
}

/* The request's context even with trace = false or before its ids are
 * drawn (a colour draws none); a task's copy. */
wxd_trace_t *wxd_trace_slot(wxd_co_t *co) {
  if (co && co->kind == WXD_CO_REQUEST) return &((wxd_req_t *)co->data)->trace;
  return wxd_task_slot(co);
}

static wxd_trace_t *gray_slot(lua_State *L) { return wxd_trace_slot(wxd_co_lookup(L)); }

/* wxd.core.http.gray() -> the colour wxd.gray gave the running request (or
 * the request a task was spawned from), or nothing. */
static int http_gray(lua_State *L) {
  wxd_trace_t *t = gray_slot(L);
  if (!t || !t->gray[0]) return 0;
  lua_pushstring(L, t->gray);
  return 1;
}

/* wxd.core.http.set_gray(colour | nil) -> true, or false outside a request
 * or for a colour that is not 1..32 of letters, digits and -_. */
static int http_set_gray(lua_State *L) {
  size_t n = 0;
  const char *v = luaL_optlstring(L, 1, NULL, &n);
  wxd_trace_t *t = gray_slot(L);
  int ok = t && (!v || wxd_trace_gray_ok(v, n));
  if (ok) {
    if (v) memcpy(t->gray, v, n);
    t->gray[v ? n : 0] = 0;
  }
  lua_pushboolean(L, ok);
  return 1;
}

/* wxd.core.http.new_span_id(), new_trace_id(): random lowercase hex. */
static int http_new_span_id(lua_State *L) {
  char id[17];
  wxd_trace_new_span_id(id);
  lua_pushlstring(L, id, 16);
  return 1;
}

static int http_new_trace_id(lua_State *L) {
  char id[33];
  wxd_trace_new_trace_id(id);
  lua_pushlstring(L, id, 32);
  return 1;
}

/* wxd.core.http.parse_traceparent(v) -> trace_id, parent_id, flags | nil */
static int http_parse_traceparent(lua_State *L) {
  size_t n;
  const char *v = luaL_checklstring(L, 1, &n);
  char tid[33], pid[17];
  uint8_t flags;
  if (!wxd_trace_parse(v, n, tid, pid, &flags)) return 0;
  lua_pushstring(L, tid);
  lua_pushstring(L, pid);
  lua_pushinteger(L, flags);
  return 3;
}

int wxd_open_http_lua(lua_State *L) {
  static const luaL_Reg fns[] = {{"write", http_write},
                                 {"parse_query", wxd_query_parse},
                                 {"set_body_limit", http_set_body_limit},
                                 {"send_file", wxd__http_send_file},
                                 {"trace_context", http_trace_context},
                                 {"set_openid", http_set_openid},
                                 {"gray", http_gray},
                                 {"set_gray", http_set_gray},
                                 {"incoming_trace", http_incoming_trace},
                                 {"span_context", http_span_context},
                                 {"new_span_id", http_new_span_id},
                                 {"new_trace_id", http_new_trace_id},
                                 {"parse_traceparent", http_parse_traceparent},
                                 {NULL, NULL}};
  lua_createtable(L, 0, 11);
  luaL_register(L, NULL, fns);
  return 1;
}
