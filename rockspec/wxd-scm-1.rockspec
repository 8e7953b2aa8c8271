-- LuaRocks: `luarocks make rockspec/wxd-scm-1.rockspec` builds build/wxd with
-- the Makefile and installs it with the Lua library. Every module under lua/
-- must be listed below (spec/01-unit/rockspec_spec.lua checks it).
rockspec_format = "3.0"
package = "wxd"
version = "scm-1"
source = {
  url = "git+file:///dev/null", -- replaced by the repository URL when published
}
description = {
  summary = "Lua-scriptable application server for WeChat backends",
  detailed = [[
wxd is an HTTP/1.1 application server in C (libuv, llhttp, LuaJIT, OpenSSL)
whose business handlers are Lua, for WeChat Official Account, Mini Program
and WeChat Pay backends.
]],
  license = "MIT",
}
dependencies = {
  "lua == 5.1",
}
build = {
  type = "command",
  build_command = "make",
  install_command = "true",
  install = {
    bin = {
      wxd = "build/wxd",
    },
    lua = {
      ["wxd"] = "lua/wxd/init.lua",
      ["wxd.app"] = "lua/wxd/app.lua",
      ["wxd.breaker"] = "lua/wxd/breaker.lua",
      ["wxd.cli"] = "lua/wxd/cli.lua",
      ["wxd.config"] = "lua/wxd/config.lua",
      ["wxd.cookie"] = "lua/wxd/cookie.lua",
      ["wxd.cors"] = "lua/wxd/cors.lua",
      ["wxd.alert"] = "lua/wxd/alert.lua",
      ["wxd.apiversion"] = "lua/wxd/apiversion.lua",
      ["wxd.jwt"] = "lua/wxd/jwt.lua",
      ["wxd.internal"] = "lua/wxd/internal.lua",
      ["wxd.cloudbase"] = "lua/wxd/cloudbase.lua",
      ["wxd.session"] = "lua/wxd/session.lua",
      ["wxd.respond"] = "lua/wxd/respond.lua",
      ["wxd.crypto"] = "lua/wxd/crypto.lua",
      ["wxd.http"] = "lua/wxd/http.lua",
      ["wxd.json"] = "lua/wxd/json.lua",
      ["wxd.limit"] = "lua/wxd/limit.lua",
      ["wxd.lock"] = "lua/wxd/lock.lua",
      ["wxd.log"] = "lua/wxd/log.lua",
      ["wxd.metrics"] = "lua/wxd/metrics.lua",
      ["wxd.gray"] = "lua/wxd/gray.lua",
      ["wxd.miniprogram"] = "lua/wxd/miniprogram.lua",
      ["wxd.mp"] = "lua/wxd/mp.lua",
      ["wxd.multipart"] = "lua/wxd/multipart.lua",
      ["wxd.order"] = "lua/wxd/order.lua",
      ["wxd.queue"] = "lua/wxd/queue.lua",
      ["wxd.degrade"] = "lua/wxd/degrade.lua",
      ["wxd.pay"] = "lua/wxd/pay.lua",
      ["wxd.pay.notify"] = "lua/wxd/pay/notify.lua",
      ["wxd.pay.orders"] = "lua/wxd/pay/orders.lua",
      ["wxd.pay.v2"] = "lua/wxd/pay/v2.lua",
      ["wxd.otlp"] = "lua/wxd/otlp.lua",
      ["wxd.redis"] = "lua/wxd/redis.lua",
      ["wxd.retry"] = "lua/wxd/retry.lua",
      ["wxd.server"] = "lua/wxd/server.lua",
      ["wxd.shdict"] = "lua/wxd/shdict.lua",
      ["wxd.static"] = "lua/wxd/static.lua",
      ["wxd.store"] = "lua/wxd/store.lua",
      ["wxd.task"] = "lua/wxd/task.lua",
      ["wxd.ws"] = "lua/wxd/ws.lua",
      ["wxd.testing"] = "lua/wxd/testing.lua",
      ["wxd.timer"] = "lua/wxd/timer.lua",
      ["wxd.trace"] = "lua/wxd/trace.lua",
      ["wxd.wechat"] = "lua/wxd/wechat.lua",
      ["wxd.xml"] = "lua/wxd/xml.lua",
      ["wxd.util"] = "lua/wxd/util.lua",
    },
  },
}
