-- Topic publish to frame at the client, with 1,000 subscribers: on one
-- node (subscribers spread over 2 workers, publishes from either), and
-- across two nodes through Redis (subscribers on node A, publishes on node
-- B). Run: make bench-ws (builds build/bench/ws_latency_client from
-- spec/bench/ws_latency_client.c; needs redis-server).
--
-- The client is several processes (WS_PROCESSES, default 4) sharing the
-- subscribers. Each frame is timed twice against the wall-clock stamp the
-- server took just before publishing: at its arrival in the client's socket
-- (the kernel's receive timestamp) and when the client read it. The first
-- is the server's latency; the difference is the client's own queue.
-- Prints p50, p90, p99 and max in ms, overall and per client process.
package.path = "./spec/?.lua;./lua/?.lua;./lua/?/init.lua;" .. package.path
local H = require "helpers"
local cjson = require "cjson"

local SUBS = tonumber(os.getenv("WS_SUBSCRIBERS")) or 1000
local PUBS = tonumber(os.getenv("WS_PUBLISHES")) or 200
local PROCS = tonumber(os.getenv("WS_PROCESSES")) or 4
local CLIENT = os.getenv("WS_CLIENT") or (H.ROOT .. "/build/bench/ws_latency_client")

-- mode "publish": the route publishes (wxd.ws.publish); "order": it moves
-- an order (wxd.order.transition), whose store publishes the change.
local function run(sub_port, pub_port, procs, mode)
  local sub, pub, warm = "/sub?topic=lat", "/publish-now?topic=lat&tag=", ""
  if mode == "order" then
    sub = string.format("/sub-orders?topic=lat&prefix=lat-&n=%d", PUBS)
    pub, warm = "/order-now?tag=", "'/publish-now?topic=lat&tag='"
  end
  local out, code = H.sh(string.format("%s %d '%s' %d '%s' %d %d %d %s 2>&1",
    CLIENT, sub_port, sub, pub_port, pub, SUBS, procs, PUBS, warm))
  assert(code == 0, out)
  return cjson.decode(out:match("{.*}"))
end

local function line(what, d)
  return string.format("%-28s p50 %7.3f   p90 %7.3f   p99 %7.3f   max %7.3f ms", what, d.p50, d.p90, d.p99, d.max)
end

local function show(title, r)
  print(string.format("%s (%d frames, %d client processes):", title, r.arrival.n, r.processes))
  print("  " .. line("arrival at the client", r.arrival))
  print("  " .. line("read by the client", r.read))
  print("  " .. line("last arrival of a publish", r.round_last_arrival))
  if r.took then print("  " .. line("the transition call itself", r.took)) end
  for i, p in ipairs(r.per_process) do
    print(string.format("    process %d: arrival p50 %.3f p99 %.3f max %.3f | read p50 %.3f p99 %.3f max %.3f ms", i,
      p.arrival.p50, p.arrival.p99, p.arrival.max, p.read.p50, p.read.p99, p.read.max))
  end
end

local uptime = H.sh("uptime")
print(string.format("websocket topic latency, publish -> frame at the client, %d subscribers, %d publishes", SUBS, PUBS))
print("load: " .. uptime:gsub("%s+$", ""))
local journal_dir = H.tmpdir()
local env = "WXD_ACCESS_LOG=off"
local srv = H.start(H.app("ws"), { workers = 2, env = env .. " WS_BENCH_JOURNAL=" .. journal_dir .. "/orders.journal" })
local ok, err = pcall(function()
  show("one node, 2 workers: publish", run(srv.port, srv.port, PROCS, "publish"))
  show("one node, 2 workers: order transition (journal fsync'd)", run(srv.port, srv.port, PROCS, "order"))
  if os.getenv("WS_SINGLE") ~= "0" then
    show("one node, 2 workers: publish, ONE client process", run(srv.port, srv.port, 1, "publish"))
  end
end)
srv:stop(); srv:cleanup()
os.execute("rm -rf " .. journal_dir)
assert(ok, err)

local redis = H.redis_server()
env = env .. " WXD_TEST_REDIS_URL=" .. redis.url
local a = H.start(H.app("ws_cluster"), { workers = 2, env = env })
local b = H.start(H.app("ws_cluster"), { workers = 2, env = env })
ok, err = pcall(function()
  show("two nodes through Redis pub/sub: publish", run(a.port, b.port, PROCS, "publish"))
  show("two nodes through Redis: order transition (Redis script)", run(a.port, b.port, PROCS, "order"))
end)
a:stop(); a:cleanup(); b:stop(); b:cleanup()
redis:cleanup()
assert(ok, err)
