-- wxd.shdict and wxd.lock across the worker threads of a real server
-- (spec/fixtures/apps/shdict): exact counts under concurrency, the memory
-- cap, hot reload, a cross-worker critical section, shutdown while waiting.
local H = require "helpers"
local cjson = require "cjson"
local socket = require "socket"

local APP = H.app("shdict")

local post, pipelined = H.post_raw, H.pipelined
local function get_json(srv, path) return srv:get_json(path) end

describe("shdict across 2 workers", function()
  local srv
  setup(function() srv = H.start(APP, { workers = 2 }) end)
  teardown(function()
    if srv then
      assert.equal(0, srv:stop())
      srv:cleanup()
    end
  end)

  it("counts 20,000 concurrent incr exactly (200 connections x 100 pipelined)", function()
    local batches = {}
    for i = 1, 200 do
      local reqs = {}
      for j = 1, 100 do reqs[j] = post("/incr") end
      batches[i] = reqs
    end
    local t0 = socket.gettime()
    local results = pipelined(srv, batches)
    local elapsed = socket.gettime() - t0
    local seen, per_worker, n = {}, { [0] = 0, [1] = 0 }, 0
    for _, rs in ipairs(results) do
      assert.equal(100, #rs)
      for _, r in ipairs(rs) do
        assert.equal(200, r.status, r.body)
        local v, w = r.body:match("^(%d+) (%d)$")
        v, w = tonumber(v), tonumber(w)
        assert.is_nil(seen[v], "value " .. tostring(v) .. " returned twice")
        seen[v] = true
        per_worker[w] = per_worker[w] + 1
        n = n + 1
      end
    end
    assert.equal(20000, n)
    for v = 1, 20000 do assert.truthy(seen[v], "no response saw " .. v) end
    assert.equal(20000, get_json(srv, "/get/counters/hits").value)
    print(string.format("\n    20,000 incr over 200 connections: %.0f ms (%.0f req/s); worker 0: %d, worker 1: %d",
      elapsed * 1000, 20000 / elapsed, per_worker[0], per_worker[1]))
    assert.is_true(per_worker[0] > 0 and per_worker[1] > 0, "both workers counted")
  end)

  it("keeps the memory cap under concurrent writers on both workers, evicting the oldest", function()
    local value = string.rep("v", 1000)
    -- 400 writes over 20 connections: the kernel spreads connections by a
    -- hash, and with 8 all of them landed on one worker once in a while
    -- (1 in 128); with 20, one in half a million.
    local batches = {}
    for i = 1, 20 do
      local reqs = {}
      for j = 1, 20 do reqs[j] = post("/set/small/c" .. i .. "_" .. j, value) end
      batches[i] = reqs
    end
    local workers = {}
    for _, rs in ipairs(pipelined(srv, batches)) do
      assert.equal(20, #rs)
      for _, r in ipairs(rs) do
        local res = cjson.decode(r.body)
        assert.is_true(res.ok, r.body)
        workers[res.worker] = true
      end
    end
    assert.truthy(workers[0] and workers[1], "both workers wrote")
    local s = get_json(srv, "/stats/small")
    assert.equal(65536, s.capacity)
    assert.is_true(s.used <= s.capacity, s.used .. " bytes used")
    assert.is_true(s.count < 64 and s.count > 40, s.count .. " entries")
    assert.equal(400 - s.count, s.evictions)
    -- Then one writer in order: what remains is the newest, the first are gone.
    local seq = {}
    for j = 1, 100 do seq[j] = post("/set/small/s" .. j, value) end
    pipelined(srv, { seq })
    s = get_json(srv, "/stats/small")
    assert.is_true(s.used <= s.capacity)
    for j = 1, 100 - s.count do
      assert.equal("nil", get_json(srv, "/get/small/s" .. j).type, "s" .. j .. " was evicted")
    end
    for j = 100 - s.count + 1, 100 do
      assert.equal(value, get_json(srv, "/get/small/s" .. j).value)
    end
    local r = srv:request("POST", "/set/small/huge", nil, string.rep("x", 70000))
    assert.same({ ok = false, err = "no memory" }, { ok = cjson.decode(r.body).ok, err = cjson.decode(r.body).err })
  end)

  it("serialises a critical section across workers with wxd.lock", function()
    local function burst(path)
      local batches = {}
      for i = 1, 25 do batches[i] = { post(path), post(path), post(path), post(path) } end
      local workers, t0 = {}, socket.gettime()
      for _, rs in ipairs(pipelined(srv, batches)) do
        assert.equal(4, #rs)
        for _, r in ipairs(rs) do
          assert.equal(200, r.status, r.body)
          workers[tonumber(r.body:match("ok (%d)"))] = true
        end
      end
      return workers, socket.gettime() - t0
    end
    local workers, elapsed = burst("/locked-incr")
    assert.equal(100, get_json(srv, "/get/counters/locked").value)
    assert.truthy(workers[0] and workers[1], "both workers took the lock")
    -- 100 sections of >= 5 ms, one at a time.
    assert.is_true(elapsed >= 0.5, string.format("%.3f s", elapsed))
    print(string.format("\n    100 locked read-sleep(5 ms)-write sections: %.0f ms", elapsed * 1000))
    assert.is_nil(get_json(srv, "/get/locks/critical").value, "the lock was released")
    -- The same without the lock loses updates: the lock is what made it exact.
    burst("/unlocked-incr")
    assert.is_true(get_json(srv, "/get/counters/unlocked").value < 100)
  end)

  it("keeps its data across a hot reload", function()
    local r = srv:request("POST", "/set/counters/survivor", nil, "still here")
    assert.is_true(cjson.decode(r.body).ok)
    srv:signal("HUP")
    H.wait_until(function()
      for _ = 1, 6 do if srv:get("/generation").body ~= "2" then return false end end
      return true
    end, 5, "generation 2 on both workers")
    for _ = 1, 6 do
      assert.equal("still here", get_json(srv, "/get/counters/survivor").value)
    end
    assert.equal(20000, get_json(srv, "/get/counters/hits").value)
    assert.equal(100, get_json(srv, "/get/counters/locked").value)
  end)
end)

describe("shdict config in a server", function()
  it("reports a changed shdict section as needing a restart", function()
    local app = H.tmpdir()
    os.execute("cp -r " .. APP .. "/. " .. app)
    local srv = H.start(app, { workers = 1, pid = true })
    local cfg = H.read_file(app .. "/config.lua"):gsub('counters = "1m"', 'counters = "2m"')
    H.write_file(app .. "/config.lua", cfg)
    local out, code = H.sh(H.WXD .. " reload --pid " .. srv.dir .. "/wxd.pid")
    assert.equal(0, code, out)
    assert.truthy(out:find("shdict", 1, true), out)
    assert.equal(1048576, get_json(srv, "/stats/counters").capacity, "the running size stays")
    srv:stop()
    srv:cleanup()
    os.execute("rm -rf " .. app)
  end)

  it("refuses a bad shdict section at start-up, naming the key", function()
    local app = H.tmpdir()
    os.execute("cp -r " .. APP .. "/. " .. app)
    H.write_file(app .. "/config.lua", 'return { shdict = { cache = "1k" } }')
    local out, code = H.sh(H.WXD .. " check " .. app)
    assert.equal(1, code)
    assert.truthy(out:find("config.shdict.cache: must be at least 64k", 1, true), out)
    os.execute("rm -rf " .. app)
  end)

  it("lets `wxd check` load an app that uses its dictionaries at load time", function()
    local out, code = H.sh(H.WXD .. " check " .. APP)
    assert.equal(0, code, out)
  end)

  it("refuses declare() in a server", function()
    local app = H.tmpdir()
    os.execute("cp -r " .. APP .. "/. " .. app)
    H.write_file(app .. "/app.lua", 'require("wxd.shdict").declare("other", "1m")\n' .. H.read_file(app .. "/app.lua"))
    local srv = H.start(app, { workers = 1, expect_failure = true })
    H.wait_until(function() return srv:exit_code() end, 10, "wxd to exit")
    assert.equal(1, srv:exit_code())
    assert.truthy(srv:log_text():find("dictionaries come from config.lua", 1, true), srv:log_text())
    srv:check_sanitizers()
    srv:cleanup()
    os.execute("rm -rf " .. app)
  end)
end)

describe("wait_change across 2 workers", function()
  local srv
  setup(function() srv = H.start(APP, { workers = 2 }) end)
  teardown(function()
    if srv then
      assert.equal(0, srv:stop())
      srv:cleanup()
    end
  end)

  -- Opens n connections waiting on key; returns them once all wait.
  local function waiters(key, n, query)
    local base = get_json(srv, "/get/counters/change_waiting").value or 0
    local conns = {}
    for i = 1, n do
      conns[i] = srv:connect()
      conns[i]:send("GET /wait-change?key=" .. key .. (query or "") .. " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    end
    H.wait_until(function()
      return (get_json(srv, "/get/counters/change_waiting").value or 0) >= base + n
    end, 10, "the waiters")
    return conns
  end

  local function answers(conns)
    local out = {}
    for i, c in ipairs(conns) do
      -- read_all also returns whether the peer closed: not parse_responses' head_request.
      local r = H.parse_responses((H.read_all(c, 20)))[1]
      c:close()
      assert.equal(200, r.status, r.body)
      out[i] = cjson.decode(r.body)
    end
    return out
  end

  it("wakes waiters on both workers the moment one worker sets the key", function()
    local conns = waiters("cw1", 16, "&timeout=60")
    local r = srv:request("POST", "/set/counters/cw1", nil, "hello")
    assert.is_true(cjson.decode(r.body).ok)
    local workers = {}
    for _, a in ipairs(answers(conns)) do
      assert.equal("hello", a.value)
      assert.is_nil(a.err)
      workers[a.worker] = true
    end
    -- 16 connections spread over 2 SO_REUSEPORT sockets: both took some.
    assert.truthy(workers[0] and workers[1], "waiters on both workers")
  end)

  it("keeps waiting across a hot reload (the request runs on its generation) and is woken after it", function()
    srv:request("POST", "/set/counters/cw2", nil, "p")
    local conns = waiters("cw2", 4, "&old=p&timeout=60")
    local gen = tonumber(srv:get("/generation").body)
    srv:signal("HUP")
    H.wait_until(function()
      for _ = 1, 6 do if tonumber(srv:get("/generation").body) ~= gen + 1 then return false end end
      return true
    end, 10, "the next generation on both workers")
    assert.is_true(cjson.decode(srv:request("POST", "/set/counters/cw2", nil, "q").body).ok)
    for _, a in ipairs(answers(conns)) do
      assert.equal("q", a.value)
      assert.equal(gen, a.generation, "answered by the generation it started on")
    end
  end)
end)

describe("change waiters at shutdown", function()
  it("are cancelled at the shutdown deadline: the server exits cleanly", function()
    local srv = H.start(APP, { workers = 2 })
    local conns = {}
    for i = 1, 6 do
      conns[i] = srv:connect()
      conns[i]:send("GET /wait-change?key=never&timeout=60 HTTP/1.1\r\nHost: x\r\n\r\n")
    end
    H.wait_until(function()
      return (cjson.decode(srv:get("/get/counters/change_waiting").body).value or 0) >= 6
    end, 10, "the waiters")
    srv:signal("TERM")
    -- Exit 0 within 10 s (killed otherwise: not 0), while the waiters asked
    -- for 60 s: they were cancelled at the 1 s shutdown deadline. No
    -- wall-clock bound tighter than that (a loaded machine).
    assert.equal(0, srv:stop(10))
    for _, c in ipairs(conns) do c:close() end
    srv:cleanup()
  end)
end)

describe("lock waiters at shutdown", function()
  it("are cancelled at the shutdown deadline: the server exits cleanly", function()
    local srv = H.start(APP, { workers = 2 })
    local holder = srv:connect()
    holder:send("GET /hold?ms=20000 HTTP/1.1\r\nHost: x\r\n\r\n")
    local waiters = {}
    for i = 1, 6 do
      waiters[i] = srv:connect()
      waiters[i]:send("GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
    end
    H.wait_until(function()
      return cjson.decode(srv:get("/get/locks/held").body).type == "string"
    end, 5, "the lock to be held")
    srv:signal("TERM")
    -- Exit 0 within 10 s (killed otherwise: not 0), while the waiters asked
    -- for 60 s: they were cancelled at the 1 s shutdown deadline. No
    -- wall-clock bound tighter than that (a loaded machine).
    assert.equal(0, srv:stop(10))
    holder:close()
    for _, c in ipairs(waiters) do c:close() end
    srv:cleanup()
  end)
end)
