-- Topic publish to frame at the client, with 1,000 subscribers: on one
-- node (subscribers spread over 2 workers, publishes from either), and
-- across two nodes through Redis (subscribers on node A, publishes on node
-- B). Run: build/wxd script spec/bench/ws_latency.lua (make bench-ws);
-- needs the npm ws package (make deps) and redis-server.
-- Prints p50, p99 and max in ms. The client is one Node.js process that
-- reads all 1,000 sockets: its own turn through them is part of the figure.
package.path = "./spec/?.lua;./lua/?.lua;./lua/?/init.lua;" .. package.path
local H = require "helpers"

local SUBS = tonumber(os.getenv("WS_SUBSCRIBERS")) or 1000
local PUBS = tonumber(os.getenv("WS_PUBLISHES")) or 200
local NODE_MODULES = H.ROOT .. "/build/spec/node/node_modules"

local function run(sub_port, pub_port)
  local out, code = H.sh(string.format("NODE_PATH=%s node %s/spec/bench/ws_latency.js "
    .. "'ws://127.0.0.1:%d/sub?topic=lat' 'http://127.0.0.1:%d/publish-now?topic=lat' %d %d",
    NODE_MODULES, H.ROOT, sub_port, pub_port, SUBS, PUBS))
  assert(code == 0, out)
  return require("cjson").decode(out:match("{.-}"))
end

local function show(what, r)
  print(string.format("  %-42s p50 %6.3f ms   p99 %6.3f ms   max %7.3f ms   (%d frames)", what, r.p50, r.p99, r.max, r.n))
end

print(string.format("websocket topic latency, publish -> frame at the client, %d subscribers, %d publishes:", SUBS, PUBS))
local env = "WXD_ACCESS_LOG=off"
local srv = H.start(H.app("ws"), { workers = 2, env = env })
local ok, err = pcall(function() show("one node, 2 workers", run(srv.port, srv.port)) end)
srv:stop(); srv:cleanup()
assert(ok, err)

local redis = H.redis_server()
env = env .. " WXD_TEST_REDIS_URL=" .. redis.url
local a = H.start(H.app("ws_cluster"), { workers = 2, env = env })
local b = H.start(H.app("ws_cluster"), { workers = 2, env = env })
ok, err = pcall(function()
  show("two nodes through Redis pub/sub", run(a.port, b.port))
end)
a:stop(); a:cleanup(); b:stop(); b:cleanup()
redis:cleanup()
assert(ok, err)
