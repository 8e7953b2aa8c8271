/* modules: every native module a VM can require, in one table (as Lua's
 * linit.c lists its libraries). Each is preloaded, so it is opened only by
 * the first require. A new native module adds its header and one line. */
#include <lua.h>

#include "breaker.h"
#include "crypto.h"
#include "fetch.h"
#include "fs.h"
#include "http.h"
#include "json.h"
#include "limit.h"
#include "metrics.h"
#include "otlp.h"
#include "paystate.h"
#include "queue.h"
#include "redis.h"
#include "shdict.h"
#include "task.h"
#include "timer.h"
#include "vm.h"
#include "ws.h"
#include "xml.h"

/* lua-cjson, linked statically; it ships no header. */
int luaopen_cjson(lua_State *L);
int luaopen_cjson_safe(lua_State *L);

static const struct {
  const char *name;
  lua_CFunction open;
} modules[] = {
    {"wxd.core", wxd_open_core},
    {"wxd.core.http", wxd_open_http_lua},
    {"wxd.core.timer", wxd_open_timer},
    {"wxd.core.crypto", wxd_open_crypto},
    {"wxd.core.shdict", wxd_open_shdict},
    {"wxd.core.xml", wxd_open_xml},
    {"wxd.core.json", wxd_open_json},
    {"wxd.core.fetch", wxd_open_fetch},
    {"wxd.core.redis", wxd_open_redis},
    {"wxd.core.task", wxd_open_task},
    {"wxd.core.order", wxd_open_order},
    {"wxd.core.queue", wxd_open_queue},
    {"wxd.core.ws", wxd_open_ws},
    {"wxd.core.limit", wxd_open_limit},
    {"wxd.core.breaker", wxd_open_breaker},
    {"wxd.core.fs", wxd_open_fs},
    {"wxd.core.metrics", wxd_open_metrics},
    {"wxd.core.otlp", wxd_open_otlp},
    {"cjson", luaopen_cjson},
    {"cjson.safe", luaopen_cjson_safe},
};

void wxd_vm_preload_modules(lua_State *L) {
  for (size_t i = 0; i < sizeof modules / sizeof modules[0]; i++)
    wxd_vm_preload(L, modules[i].name, modules[i].open);
}
