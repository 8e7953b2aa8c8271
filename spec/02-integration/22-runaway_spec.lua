-- Runaway handlers (docs/runaway.md): a worker stuck in a handler is
-- noticed, contained and replaced; interpreted loops, stack overflows and
-- memory bombs cost one request, not a worker.
local H = require "helpers"
local socket = require "socket"
local cjson = require "cjson"

local STALL_S = 1 -- limits.stall_timeout_ms of the fixture app

-- One request on a new connection: status (nil when it failed), body, seconds.
local function get(port, path, timeout)
  local t0 = socket.gettime()
  local c = socket.tcp()
  c:settimeout(timeout or 10)
  local ok = c:connect("127.0.0.1", port)
  if not ok then
    c:close()
    return nil, "connect failed", socket.gettime() - t0
  end
  c:send("GET " .. path .. " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
  local out = H.read_all(c, timeout or 10)
  c:close()
  local status = tonumber(out:match("^HTTP/1%.1 (%d+)"))
  return status, out:match("\r\n\r\n(.*)$") or out, socket.gettime() - t0
end

-- Sends a request and leaves its answer unread (the handler never ends).
local function send_only(port, path)
  local c = assert(socket.connect("127.0.0.1", port))
  c:settimeout(30)
  assert(c:send("GET " .. path .. " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
  return c
end

-- A legitimate client: /hello on a new connection, again and again, until
-- done() says so. Returns every latency and every failure.
local function keep_asking(port, done, limit_s)
  local res = { n = 0, max = 0, failures = {} }
  local t_end = socket.gettime() + (limit_s or 30)
  repeat
    local status, body, secs = get(port, "/hello", 10)
    res.n = res.n + 1
    if secs > res.max then res.max = secs end
    if status ~= 200 then
      res.failures[#res.failures + 1] = string.format("%s %s (%.3f s in, took %.3f s)", tostring(status),
                                                      tostring(body), socket.gettime() - t_end + (limit_s or 30), secs)
    end
    socket.sleep(0.02)
  until done() or socket.gettime() > t_end
  return res
end

local function report(what, res)
  print(string.format("\n    %s: %d requests, slowest %.0f ms, %d failed", what, res.n, res.max * 1000,
                      #res.failures))
end

local function json_line(srv, msg)
  local l = srv:log_lines('"msg":"' .. msg .. '"')[1]
  return l and cjson.decode(l)
end

local function alive(pid) return os.execute("kill -0 " .. pid .. " 2>/dev/null") == 0 end

local function copy_app()
  local dir = H.tmpdir()
  os.execute("cp " .. H.app("runaway") .. "/*.lua " .. dir)
  return dir
end

describe("a handler that never yields", function()
  local srv, app, successor
  after_each(function()
    if successor and alive(successor) then
      os.execute("kill -TERM " .. successor)
      pcall(H.wait_until, function() return not alive(successor) end, 10)
      if alive(successor) then os.execute("kill -KILL " .. successor) end
    end
    successor = nil
    if srv then srv:stop() srv:cleanup() end
    srv = nil
    if app then os.execute("rm -rf " .. app) end
    app = nil
  end)

  it("in the interpreter is stopped with a 503, logged with its route, and its worker serves again", function()
    local admin = H.free_port()
    srv = H.start(H.app("runaway"), { workers = 2, args = "--admin 127.0.0.1:" .. admin })
    local spin = send_only(srv.port, "/spin/interp?n=1")
    local t0 = socket.gettime()
    H.wait_until(function() return #srv:log_lines("spin started") > 0 end, 5, "the handler to start")
    local res = keep_asking(srv.port, function() return #srv:log_lines("worker recovered") > 0 end)
    report("interpreted loop", res)
    assert.same({}, res.failures)
    assert.is_true(res.max < STALL_S + 1 + 2, "a request waited " .. res.max .. " s") -- generous: a loaded machine
    local answer = H.read_all(spin, 10)
    spin:close()
    assert.truthy(answer:find("HTTP/1.1 503", 1, true), answer)
    local stuck = assert(json_line(srv, "worker stuck"))
    assert.equal("/spin/interp", stuck.path)
    assert.equal("GET", stuck.method)
    assert.equal("request", stuck.kind)
    assert.is_true(stuck.hook_armed)
    assert.is_true(stuck.stalled_ms >= STALL_S * 1000)
    local stopped = assert(json_line(srv, "runaway handler stopped"))
    assert.equal("/spin/interp", stopped.path)
    assert.equal(stuck.id, stopped.id)
    print(string.format("    stopped after %.0f ms; recovered %.0f ms after the request was sent", stopped.ms,
                        (socket.gettime() - t0) * 1000))
    local st = H.status(admin)
    assert.equal(1, st.watchdog.stalls)
    assert.equal(1, st.watchdog.recovered)
    assert.equal("/spin/interp", st.watchdog.last.path)
    assert.same({}, st.watchdog.stuck_now)
    -- No restart: the same process serves with both workers.
    assert.equal(srv.pid, st.pid)
    local seen = {}
    H.wait_until(function()
      local _, worker = get(srv.port, "/worker")
      seen[worker] = true
      return seen["0"] and seen["1"]
    end, 10, "both workers to serve")
  end)

  it("compiled by the JIT is contained, and the process is replaced without a failed request", function()
    app = copy_app()
    local admin = H.free_port()
    srv = H.start(app, { workers = 2, pid = true, args = "--admin 127.0.0.1:" .. admin })
    local pidfile = srv.dir .. "/wxd.pid"
    H.wait_until(function() return H.read_file(pidfile) end, 5, "pid file")
    local spin = send_only(srv.port, "/spin/jit")
    -- From here on the stuck worker accepts nothing. (A connection it had
    -- already accepted, in the loop turn that started the handler, is lost
    -- with it: docs/runaway.md.)
    H.wait_until(function() return #srv:log_lines("spin started") > 0 end, 5, "the handler to start")
    local replaced_at
    local res = keep_asking(srv.port, function()
      if not replaced_at and srv:exit_code() then replaced_at = socket.gettime() end
      return replaced_at and socket.gettime() - replaced_at > 1
    end)
    report("compiled loop, through the restart", res)
    spin:close()
    if #res.failures > 0 then print(srv:log_text()) end
    assert.same({}, res.failures)
    assert.is_true(res.max < STALL_S + 1 + 2, "a request waited " .. res.max .. " s")
    local stuck = assert(json_line(srv, "worker stuck"))
    assert.equal("/spin/jit", stuck.path)
    assert.truthy(#srv:log_lines("starting a successor") > 0)
    assert.truthy(#srv:log_lines("abandoning 1 stuck worker") > 0)
    assert.equal(0, srv:exit_code())
    successor = tonumber(H.read_file(pidfile):match("%d+"))
    assert.are_not.equal(srv.pid, successor)
    assert.is_true(alive(successor))
    local st = H.status(admin)
    assert.equal(successor, st.pid)
    assert.equal(0, st.watchdog.stalls)

    -- The fix is deployed by a reload of the successor.
    local src = H.read_file(app .. "/app.lua")
    H.write_file(app .. "/app.lua", (src:gsub('app:get%("/spin/jit", function%(%)',
      'app:get("/spin/jit", function() do return "fixed\\n" end', 1)))
    local out, code = H.sh(H.WXD .. " reload --pid " .. pidfile .. " --timeout 20")
    assert.equal(0, code, out)
    local status, body = get(srv.port, "/spin/jit")
    assert.equal(200, status)
    assert.equal("fixed\n", body)
  end)

  it("does not hold up SIGTERM: the stuck worker is abandoned within the shutdown deadline", function()
    srv = H.start(H.app("runaway"), { workers = 2 })
    local spin = send_only(srv.port, "/spin/jit")
    H.wait_until(function() return #srv:log_lines("spin started") > 0 end, 5, "the handler to start")
    local t0 = socket.gettime()
    srv:signal("TERM")
    H.wait_until(function() return srv:exit_code() end, 10, "wxd to exit")
    local took = socket.gettime() - t0
    print(string.format("\n    exited %.0f ms after SIGTERM (shutdown_timeout_ms = 2000)", took * 1000))
    spin:close()
    assert.equal(0, srv:exit_code())
    assert.is_true(took < 2 + 1, "exit took " .. took .. " s") -- the deadline, plus a loaded machine
    assert.truthy(#srv:log_lines("abandoning 1 stuck worker") > 0, srv:log_text())
  end)
end)

describe("wxd restart", function()
  local srv, successor
  after_each(function()
    if successor and alive(successor) then
      os.execute("kill -TERM " .. successor)
      pcall(H.wait_until, function() return not alive(successor) end, 10)
    end
    srv:stop()
    srv:cleanup()
  end)

  it("replaces the process in place: requests in flight finish, new ones never fail", function()
    srv = H.start(H.app("runaway"), { workers = 2, pid = true })
    local pidfile = srv.dir .. "/wxd.pid"
    H.wait_until(function() return H.read_file(pidfile) end, 5, "pid file")
    local slow = send_only(srv.port, "/sleep?ms=1500")
    local out, code
    local done = false
    local res = keep_asking(srv.port, function()
      if not done then
        out, code = H.sh(H.WXD .. " restart --pid " .. pidfile .. " --timeout 20")
        done = true
      end
      return srv:exit_code() ~= nil
    end)
    report("through wxd restart", res)
    assert.equal(0, code, out)
    assert.truthy(out:find("restarted: pid %d+ serves"), out)
    assert.same({}, res.failures)
    local answer = H.read_all(slow, 10)
    slow:close()
    assert.truthy(answer:find("HTTP/1.1 200", 1, true), answer)
    assert.equal(0, srv:exit_code())
    successor = tonumber(H.read_file(pidfile):match("%d+"))
    assert.are_not.equal(srv.pid, successor)
    assert.equal(200, (get(srv.port, "/hello")))
  end)
end)

describe("a handler that overflows", function()
  local srv, app
  before_each(function()
    -- A long stall timeout: on a loaded machine the watchdog must not be
    -- the one that stops a bomb.
    app = copy_app()
    H.write_file(app .. "/config.lua", "return { limits = { shutdown_timeout_ms = 2000, stall_timeout_ms = 30000, "
      .. "lua_memory_bytes = 64 * 1024 * 1024 } }")
    srv = H.start(app, { workers = 1 })
  end)
  after_each(function()
    srv:stop()
    srv:cleanup()
    os.execute("rm -rf " .. app)
  end)

  it("its stack gets a 500, and the worker lives on", function()
    local status = get(srv.port, "/recurse")
    assert.equal(500, status)
    assert.equal(200, (get(srv.port, "/hello")))
    assert.is_nil(srv:exit_code())
  end)

  it("the memory ceiling gets a 503, in the interpreter and in compiled code, and the state has room again", function()
    for _ = 1, 3 do
      for _, path in ipairs({ "/bomb", "/bomb/jit" }) do
        local status, body = get(srv.port, path)
        assert.equal(503, status, body)
        assert.truthy(body:find("used too much memory", 1, true), body)
        local ok, b2 = get(srv.port, "/alloc")
        assert.equal(200, ok)
        assert.equal("allocated 2048\n", b2)
      end
    end
    local stopped = srv:log_lines('"msg":"runaway handler stopped"')
    assert.equal(6, #stopped)
    local line = cjson.decode(stopped[1])
    assert.equal("memory", line.reason)
    assert.equal("/bomb", line.path)
    assert.equal(200, (get(srv.port, "/hello")))
    -- The same process: nothing was restarted (a slow machine may still see
    -- a full collection of the bomb's 64 MiB as a short stall).
    assert.is_nil(srv:exit_code())
  end)
end)
