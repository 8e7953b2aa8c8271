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

-- The server's own view: wxd_ws_publish_delivery_seconds on the admin
-- listener (per publish and worker, from the publish to its last subscriber
-- written). Returns the cumulative bucket counts.
local function delivery_buckets(admin)
  if not admin then return nil end
  local socket = require "socket"
  local c = socket.connect("127.0.0.1", admin)
  if not c then return nil end
  c:settimeout(10)
  c:send("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
  local body = c:receive("*a") or ""
  c:close()
  local b = {}
  for le, n in body:gmatch('wxd_ws_publish_delivery_seconds_bucket{le="([^"]+)"} (%d+)') do
    b[#b + 1] = { le = le, n = tonumber(n) }
  end
  return b
end

-- "99% within <= 5 ms": the smallest bucket holding p of the observations
-- made between two scrapes.
local function server_side(before, after)
  if not (before and after and #after > 0) then return nil end
  local total = after[#after].n - (before[#before] and before[#before].n or 0)
  if total == 0 then return nil end
  local function within(p)
    for i, b in ipairs(after) do
      if b.n - (before[i] and before[i].n or 0) >= p * total then
        return b.le == "+Inf" and "> 1 s" or string.format("<= %g ms", tonumber(b.le) * 1000)
      end
    end
  end
  return string.format("%d deliveries (publish x worker): 50%% %s, 99%% %s", total, within(0.5), within(0.99))
end

-- CPU seconds (user + system) the process has used: /proc/PID/stat.
local CLK_TCK = tonumber((H.sh("getconf CLK_TCK"):match("%d+"))) or 100
local function cpu_seconds(pid)
  local stat = pid and H.read_file("/proc/" .. pid .. "/stat")
  if not stat then return nil end
  local fields = {}
  for x in stat:match("%) (.*)$"):gmatch("%S+") do fields[#fields + 1] = x end
  return (tonumber(fields[12]) + tonumber(fields[13])) / CLK_TCK -- utime, stime
end

-- mode "publish": the route publishes (wxd.ws.publish); "order": it moves
-- an order (wxd.order.transition), whose store publishes the change.
local function run(sub_port, pub_port, procs, mode, admin, sub_pid)
  local sub, pub, warm = "/sub?topic=lat", "/publish-now?topic=lat&tag=", ""
  if mode == "order" then
    sub = string.format("/sub-orders?topic=lat&prefix=lat-&n=%d", PUBS)
    pub, warm = "/order-now?tag=", "'/publish-now?topic=lat&tag='"
  end
  local before = delivery_buckets(admin)
  local cpu0 = cpu_seconds(sub_pid)
  local out, code = H.sh(string.format("%s %d '%s' %d '%s' %d %d %d %s 2>&1",
    CLIENT, sub_port, sub, pub_port, pub, SUBS, procs, PUBS, warm))
  assert(code == 0, out)
  local r = cjson.decode(out:match("{.*}"))
  r.server = server_side(before, delivery_buckets(admin))
  local cpu1 = cpu_seconds(sub_pid)
  if cpu0 and cpu1 then
    -- Per publish, warm-up and subscription set-up included: an upper bound.
    r.cpu = string.format("%.2f ms per publish, %.1f µs per subscriber", (cpu1 - cpu0) * 1e3 / PUBS,
      (cpu1 - cpu0) * 1e6 / PUBS / SUBS)
  end
  return r
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
  if r.cpu then print("  CPU of the subscribers' wxd (both workers, whole run / publishes): " .. r.cpu) end
  if r.server then print("  server side (wxd_ws_publish_delivery_seconds, warm-up included): " .. r.server) end
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
local admin = H.free_port()
local srv = H.start(H.app("ws"), { workers = 2, args = "--admin 127.0.0.1:" .. admin,
                                   env = env .. " WS_BENCH_JOURNAL=" .. journal_dir .. "/orders.journal" })
local ok, err = pcall(function()
  show("one node, 2 workers: publish", run(srv.port, srv.port, PROCS, "publish", admin, srv.pid))
  show("one node, 2 workers: order transition (journal fsync'd)", run(srv.port, srv.port, PROCS, "order", admin, srv.pid))
  if os.getenv("WS_SINGLE") ~= "0" then
    show("one node, 2 workers: publish, ONE client process", run(srv.port, srv.port, 1, "publish", admin, srv.pid))
  end
end)
srv:stop(); srv:cleanup()
os.execute("rm -rf " .. journal_dir)
assert(ok, err)

local redis = H.redis_server()
env = env .. " WXD_TEST_REDIS_URL=" .. redis.url
admin = H.free_port()
local a = H.start(H.app("ws_cluster"), { workers = 2, env = env, args = "--admin 127.0.0.1:" .. admin })
local b = H.start(H.app("ws_cluster"), { workers = 2, env = env })
ok, err = pcall(function()
  show("two nodes through Redis pub/sub: publish", run(a.port, b.port, PROCS, "publish", admin, a.pid))
  show("two nodes through Redis: order transition (Redis script)", run(a.port, b.port, PROCS, "order", admin, a.pid))
end)
a:stop(); a:cleanup(); b:stop(); b:cleanup()
redis:cleanup()
assert(ok, err)
