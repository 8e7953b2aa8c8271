/* config: see config.h. */
#include "config.h"

#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "log.h"
#include "steer.h"
#include "vm.h"

/* Only what the file cannot say: every value config.lua can set comes from
 * the validated table, which carries lua/wxd/config.lua's defaults (their
 * one source), so none is repeated here. */
void wxd_config_defaults(wxd_config_t *cfg) {
  cfg->host[0] = 0;
  cfg->port = 0;
  cfg->admin_host[0] = 0;
  cfg->admin_port = 0;
  cfg->nshdicts = 0;
  cfg->plain = 1;
  cfg->metrics = cfg->trace = 1;
  memset(&cfg->https, 0, sizeof cfg->https);
}

int wxd_parse_listen(const char *listen, char *host_out, size_t hostcap, int *port_out, char *err,
                     size_t errlen) {
  const char *colon = strrchr(listen, ':');
  const char *host = listen;
  size_t hl;
  if (!colon) goto bad;
  if (listen[0] == '[') {
    const char *close = strchr(listen, ']');
    if (!close || close + 1 != colon) goto bad;
    host = listen + 1;
    hl = (size_t)(close - host);
  } else {
    hl = (size_t)(colon - listen);
  }
  if (hl == 0 || hl >= hostcap) goto bad;
  char *end;
  long port = strtol(colon + 1, &end, 10);
  if (*end || end == colon + 1 || port < 0 || port > 65535) goto bad;
  memcpy(host_out, host, hl);
  host_out[hl] = 0;
  *port_out = (int)port;
  return 0;
bad:
  snprintf(err, errlen, "expected HOST:PORT or [IPV6]:PORT, got \"%s\"", listen);
  return -1;
}

int wxd_config_set_listen(wxd_config_t *cfg, const char *listen, char *err, size_t errlen) {
  char e[400];
  if (wxd_parse_listen(listen, cfg->host, sizeof cfg->host, &cfg->port, e, sizeof e) == 0) {
    cfg->plain = 1;
    return 0;
  }
  snprintf(err, errlen, "listen: %s", e);
  return -1;
}

int wxd_config_set_https_listen(wxd_config_t *cfg, const char *listen, char *err, size_t errlen) {
  char e[400];
  wxd_https_conf_t *h = &cfg->https;
  if (wxd_parse_listen(listen, h->host, sizeof h->host, &h->port, e, sizeof e) == 0) return 0;
  snprintf(err, errlen, "https.listen: %s", e);
  return -1;
}

void wxd_config_apply_env(wxd_config_t *cfg) {
  const char *lv = getenv("WXD_LOG_LEVEL");
  if (lv && wxd_log_parse_level(lv) >= 0) cfg->log_level = wxd_log_parse_level(lv);
  else if (lv && *lv) fprintf(stderr, "wxd: WXD_LOG_LEVEL=%s ignored: expected debug, info, warn or error\n", lv);
  const char *st = getenv("WXD_STEERING");
  if (st && wxd_steer_parse(st) >= 0) cfg->steering = wxd_steer_parse(st);
  else if (st && *st) fprintf(stderr, "wxd: WXD_STEERING=%s ignored: expected auto, cpu or hash\n", st);
  const char *al = getenv("WXD_ACCESS_LOG");
  if (al && (strcmp(al, "off") == 0 || strcmp(al, "0") == 0 || strcmp(al, "false") == 0))
    cfg->access_log = 0;
}

/* Reads a key the validated table always has (config.defaults() fills in
 * what the file leaves out): one missing means config.lua's defaults and
 * this reader disagree, a bug reported by name rather than hidden by a
 * second copy of the default. */
static int missing(char *err, size_t errlen, const char *key) {
  snprintf(err, errlen, "config.%s: missing from the validated config (lua/wxd/config.lua defaults() lacks it)",
           key);
  return -1;
}

static int need_int(lua_State *L, int idx, const char *key, const char *name, lua_Integer *out, char *err,
                    size_t errlen) {
  lua_getfield(L, idx, name);
  int ok = lua_type(L, -1) == LUA_TNUMBER;
  if (ok) *out = lua_tointeger(L, -1);
  lua_pop(L, 1);
  return ok ? 0 : missing(err, errlen, key);
}

static int read_limits(lua_State *L, int l, wxd_limits_t *lim, char *err, size_t errlen) {
  lua_Integer v[11];
  if (need_int(L, l, "limits.max_header_bytes", "max_header_bytes", &v[0], err, errlen) != 0 ||
      need_int(L, l, "limits.max_body_bytes", "max_body_bytes", &v[1], err, errlen) != 0 ||
      need_int(L, l, "limits.max_uri_bytes", "max_uri_bytes", &v[2], err, errlen) != 0 ||
      need_int(L, l, "limits.header_timeout_ms", "header_timeout_ms", &v[3], err, errlen) != 0 ||
      need_int(L, l, "limits.body_timeout_ms", "body_timeout_ms", &v[4], err, errlen) != 0 ||
      need_int(L, l, "limits.keepalive_timeout_ms", "keepalive_timeout_ms", &v[5], err, errlen) != 0 ||
      need_int(L, l, "limits.shutdown_timeout_ms", "shutdown_timeout_ms", &v[6], err, errlen) != 0 ||
      need_int(L, l, "limits.send_timeout_ms", "send_timeout_ms", &v[7], err, errlen) != 0 ||
      need_int(L, l, "limits.max_requests_per_connection", "max_requests_per_connection", &v[8], err, errlen) != 0 ||
      need_int(L, l, "limits.stall_timeout_ms", "stall_timeout_ms", &v[9], err, errlen) != 0 ||
      need_int(L, l, "limits.lua_memory_bytes", "lua_memory_bytes", &v[10], err, errlen) != 0)
    return -1;
  lim->max_header_bytes = (size_t)v[0];
  lim->max_body_bytes = (size_t)v[1];
  lim->max_uri_bytes = (size_t)v[2];
  lim->header_timeout_ms = (uint64_t)v[3];
  lim->body_timeout_ms = (uint64_t)v[4];
  lim->keepalive_timeout_ms = (uint64_t)v[5];
  lim->shutdown_timeout_ms = (uint64_t)v[6];
  lim->send_timeout_ms = (uint64_t)v[7];
  lim->max_requests = (unsigned)v[8];
  lim->stall_timeout_ms = (uint64_t)v[9];
  lim->lua_memory_bytes = (size_t)v[10];
  return 0;
}

/* A string field of the table on top as a path: absolute ones as they
 * are, relative ones against the app directory. Returns 0, or -1 when it
 * does not fit. */
static int field_path(lua_State *L, const char *name, const char *app_dir, char *out, size_t cap) {
  lua_getfield(L, -1, name);
  const char *v = lua_tostring(L, -1);
  int n = 0;
  if (v && v[0] == '/') n = snprintf(out, cap, "%s", v);
  else if (v) n = snprintf(out, cap, "%s/%s", app_dir, v);
  else out[0] = 0;
  lua_pop(L, 1);
  return n < 0 || (size_t)n >= cap ? -1 : 0;
}

/* The validated `https` section, on top of the stack. */
static int read_https(lua_State *L, wxd_config_t *cfg, char *err, size_t errlen) {
  wxd_https_conf_t *h = &cfg->https;
  memset(h, 0, sizeof *h);
  h->enabled = 1;
  lua_getfield(L, -1, "listen");
  const char *listen = lua_tostring(L, -1);
  snprintf(h->file_listen, sizeof h->file_listen, "%s", listen ? listen : "");
  int rc = listen ? wxd_config_set_https_listen(cfg, listen, err, errlen) : -1;
  lua_pop(L, 1);
  if (rc != 0) return -1;
  if (field_path(L, "cert", cfg->app_dir, h->cert, sizeof h->cert) != 0 ||
      field_path(L, "key", cfg->app_dir, h->key, sizeof h->key) != 0 ||
      field_path(L, "client_ca", cfg->app_dir, h->client_ca, sizeof h->client_ca) != 0) {
    snprintf(err, errlen, "https: a file path is too long");
    return -1;
  }
  lua_getfield(L, -1, "key_passphrase");
  size_t pl;
  const char *pass = lua_tolstring(L, -1, &pl);
  if (pass && pl >= sizeof h->passphrase) {
    lua_pop(L, 1);
    snprintf(err, errlen, "https.key_passphrase: longer than %zu bytes", sizeof h->passphrase - 1);
    return -1;
  }
  if (pass) {
    memcpy(h->passphrase, pass, pl + 1);
    h->has_passphrase = 1;
  }
  lua_pop(L, 1);
  lua_getfield(L, -1, "client_verify");
  const char *cv = lua_tostring(L, -1);
  h->client_verify = !cv || strcmp(cv, "off") == 0 ? 0 : strcmp(cv, "optional") == 0 ? 1 : 2;
  lua_pop(L, 1);
  lua_getfield(L, -1, "min_version");
  const char *mv = lua_tostring(L, -1);
  h->min_version = mv && strcmp(mv, "1.3") == 0 ? 13 : 12;
  lua_pop(L, 1);
  return 0;
}

static int shdict_cmp(const void *a, const void *b) {
  return strcmp(((const wxd_shdict_conf_t *)a)->name, ((const wxd_shdict_conf_t *)b)->name);
}

/* wxd.store's memory backend needs a dictionary with zero setup: unless
 * config.lua declares "wxd_store", it gets 16 MiB (memory is taken only as
 * entries are written). */
static void add_store_dict(wxd_config_t *cfg) {
  for (int i = 0; i < cfg->nshdicts; i++)
    if (strcmp(cfg->shdicts[i].name, "wxd_store") == 0) return;
  if (cfg->nshdicts == WXD_SHDICT_MAX) return;
  wxd_shdict_conf_t *c = &cfg->shdicts[cfg->nshdicts++];
  snprintf(c->name, sizeof c->name, "wxd_store");
  c->bytes = (size_t)16 << 20;
  qsort(cfg->shdicts, (size_t)cfg->nshdicts, sizeof cfg->shdicts[0], shdict_cmp);
}

/* The validated `shdict` section at index s: { name = bytes, ... }. */
static int read_shdicts(lua_State *L, int s, wxd_config_t *cfg, char *err, size_t errlen) {
  memset(cfg->shdicts, 0, sizeof cfg->shdicts);
  cfg->nshdicts = 0;
  lua_pushnil(L);
  while (lua_next(L, s) != 0) {
    if (lua_type(L, -2) == LUA_TSTRING && lua_isnumber(L, -1)) {
      if (cfg->nshdicts == WXD_SHDICT_MAX) {
        lua_pop(L, 2);
        snprintf(err, errlen, "shdict: at most %d dictionaries", WXD_SHDICT_MAX);
        return -1;
      }
      wxd_shdict_conf_t *c = &cfg->shdicts[cfg->nshdicts++];
      snprintf(c->name, sizeof c->name, "%s", lua_tostring(L, -2));
      c->bytes = (size_t)lua_tonumber(L, -1);
    }
    lua_pop(L, 1);
  }
  qsort(cfg->shdicts, (size_t)cfg->nshdicts, sizeof cfg->shdicts[0], shdict_cmp);
  return 0;
}

/* Copies the validated table at index c into cfg. */
static int read_table(lua_State *L, int c, wxd_config_t *cfg, char *err, size_t errlen) {
  lua_getfield(L, c, "listen");
  if (lua_isboolean(L, -1) && !lua_toboolean(L, -1)) {
    cfg->plain = 0; /* listen = false: HTTPS only */
    snprintf(cfg->file_listen, sizeof cfg->file_listen, "false");
  } else if (lua_type(L, -1) == LUA_TSTRING) {
    snprintf(cfg->file_listen, sizeof cfg->file_listen, "%s", lua_tostring(L, -1));
    if (wxd_config_set_listen(cfg, lua_tostring(L, -1), err, errlen) != 0) return -1;
  } else {
    return missing(err, errlen, "listen");
  }
  lua_pop(L, 1);
  lua_getfield(L, c, "workers");
  if (lua_type(L, -1) == LUA_TNUMBER) cfg->workers = (int)lua_tointeger(L, -1);
  else if (lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), "auto") == 0) cfg->workers = 0;
  else return missing(err, errlen, "workers");
  cfg->file_workers = cfg->workers;
  lua_pop(L, 1);
  lua_getfield(L, c, "steering");
  int steering = lua_type(L, -1) == LUA_TSTRING ? wxd_steer_parse(lua_tostring(L, -1)) : -1;
  if (steering < 0) return missing(err, errlen, "steering");
  cfg->steering = cfg->file_steering = steering;
  lua_pop(L, 1);
  lua_getfield(L, c, "admin_listen");
  if (lua_isstring(L, -1)) {
    snprintf(cfg->file_admin, sizeof cfg->file_admin, "%s", lua_tostring(L, -1));
    char e[400];
    if (wxd_parse_listen(lua_tostring(L, -1), cfg->admin_host, sizeof cfg->admin_host, &cfg->admin_port,
                         e, sizeof e) != 0) {
      snprintf(err, errlen, "admin_listen: %s", e);
      return -1;
    }
  }
  lua_pop(L, 1);
  lua_getfield(L, c, "limits");
  if (!lua_istable(L, -1)) return missing(err, errlen, "limits");
  if (read_limits(L, lua_gettop(L), &cfg->limits, err, errlen) != 0) return -1;
  lua_pop(L, 1);
  lua_getfield(L, c, "log");
  if (!lua_istable(L, -1)) return missing(err, errlen, "log");
  lua_getfield(L, -1, "level");
  int level = lua_type(L, -1) == LUA_TSTRING ? wxd_log_parse_level(lua_tostring(L, -1)) : -1;
  if (level < 0) return missing(err, errlen, "log.level");
  cfg->log_level = level;
  lua_pop(L, 1);
  lua_getfield(L, -1, "access");
  if (!lua_isboolean(L, -1)) return missing(err, errlen, "log.access");
  cfg->access_log = lua_toboolean(L, -1);
  lua_pop(L, 2);
  lua_getfield(L, c, "metrics");
  if (!lua_isboolean(L, -1)) return missing(err, errlen, "metrics");
  cfg->metrics = lua_toboolean(L, -1);
  lua_pop(L, 1);
  /* A free section (wxd.trace reads it); only `trace = false` concerns the core. */
  lua_getfield(L, c, "trace");
  cfg->trace = !(lua_isboolean(L, -1) && !lua_toboolean(L, -1));
  lua_pop(L, 1);
  lua_getfield(L, c, "https");
  if (lua_istable(L, -1) && read_https(L, cfg, err, errlen) != 0) return -1;
  lua_pop(L, 1);
  lua_getfield(L, c, "shdict");
  if (lua_istable(L, -1) && read_shdicts(L, lua_gettop(L), cfg, err, errlen) != 0) return -1;
  add_store_dict(cfg);
  lua_pop(L, 1);
  return 0;
}

int wxd_config_load(wxd_config_t *cfg, char *err, size_t errlen) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  wxd_vm_options_t opts = {cfg->lua_dir[0] ? cfg->lua_dir : NULL, cfg->app_dir, -1, 0};
  wxd_vm_t *vm = wxd_vm_new(&loop, &opts);
  int rc = -1;
  if (!vm) {
    snprintf(err, errlen, "out of memory");
    goto out;
  }
  lua_State *L = vm->L;
  lua_getglobal(L, "require");
  lua_pushliteral(L, "wxd.server");
  if (lua_pcall(L, 1, 1, 0) != 0) {
    snprintf(err, errlen, "%s", lua_tostring(L, -1));
    goto out;
  }
  lua_getfield(L, -1, "read_config");
  lua_pushstring(L, cfg->app_dir);
  if (lua_pcall(L, 1, 2, 0) != 0) {
    snprintf(err, errlen, "%s", lua_tostring(L, -1));
    goto out;
  }
  if (lua_isnil(L, -2)) {
    snprintf(err, errlen, "%s", lua_tostring(L, -1));
    goto out;
  }
  lua_pop(L, 1);
  rc = read_table(L, lua_gettop(L), cfg, err, errlen);
out:
  wxd_vm_free(vm);
  uv_loop_close(&loop);
  return rc;
}
