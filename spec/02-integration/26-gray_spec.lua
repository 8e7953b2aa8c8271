-- Gray release (wxd.gray) on a real server: 10,000 distinct openids at 5%
-- give 5% +- 1%, the same openid always the same colour, also after a
-- reload that leaves its rule alone; header rules route exactly; a reload
-- that changes the percentage applies to the next request, under HTTP load,
-- with no failed request; the colour goes out on calls (header and baggage)
-- and is counted in wxd_gray_requests_total.
local H = require "helpers"
local cjson = require "cjson"
local socket = require "socket"
local gray = require "wxd.gray"

local CONFIG = [[
return {
  shdict = { results = "1m" },
  gray = {
    rules = {
%s
      { name = "scene", colour = "v2", header = { "X-Wechat-Scene", "miniapp_v3" } },
      { name = "region", colour = "sh", header = { "X-User-Region", "shanghai" } },
      { name = "canary", colour = "v2", percent = %s },
    },
  },
}
]]

local function write_config(dir, percent, first_rule)
  H.write_file(dir .. "/config.lua", string.format(CONFIG, first_rule or "", tostring(percent)))
end

local function openid(i) return string.format("oGray%07dQx", i) end

-- The colour /who reports ("-" for none), for the requests of `list`
-- (each { path =, headers = {} }), over 8 pipelined connections.
local function colours(srv, list)
  local batches, per = {}, math.ceil(#list / 8)
  for i, r in ipairs(list) do
    local b = math.floor((i - 1) / per) + 1
    batches[b] = batches[b] or {}
    local lines = { "GET " .. (r.path or "/who") .. " HTTP/1.1", "Host: x" }
    for k, v in pairs(r.headers or {}) do lines[#lines + 1] = k .. ": " .. v end
    batches[b][#batches[b] + 1] = table.concat(lines, "\r\n") .. "\r\n\r\n"
  end
  local out = {}
  for _, resps in ipairs(H.pipelined(srv, batches)) do
    for _, r in ipairs(resps) do
      assert.equal(200, r.status, r.body)
      out[#out + 1] = r.body
    end
  end
  assert.equal(#list, #out)
  return out
end

local function by_openid(from, to)
  local list = {}
  for i = from, to do list[#list + 1] = { headers = { ["X-OpenID"] = openid(i) } } end
  return list
end

local function metric(port, colour)
  local c = assert(socket.connect("127.0.0.1", port))
  c:send("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
  local raw = H.read_all(c, 5)
  local ok, rs = pcall(H.parse_responses, raw)
  if not ok then error(rs .. "\nRAW(" .. #raw .. "): " .. raw:sub(1, 400)) end
  local body = rs[1].body
  c:close()
  return tonumber(body:match('wxd_gray_requests_total{colour="' .. colour .. '"} (%d+)')) or 0
end

-- What the upstream `up` received from a task that a request with
-- `headers` spawned (/later), once the task has called it.
local function task_call(srv, id, up, headers)
  assert.equal("spawned", srv:get("/later?id=" .. id .. "&url=" .. up, headers).body)
  local res = H.wait_until(function()
    local b = srv:get("/result?id=" .. id).body
    return b ~= "" and b
  end, 5, "the task's call")
  return cjson.decode(res)
end

local function reload(srv)
  local out, code = H.sh(H.WXD .. " reload --pid " .. srv.dir .. "/wxd.pid")
  assert.equal(0, code, out)
  return out
end

describe("gray release", function()
  local dir, srv, admin

  setup(function()
    dir = H.tmpdir()
    os.execute("cp -r " .. H.app("gray") .. "/. " .. dir)
    write_config(dir, 5)
    admin = H.free_port()
    srv = H.start(dir, { workers = 2, pid = true, args = "--admin 127.0.0.1:" .. admin })
    H.wait_until(function()
      local c = socket.connect("127.0.0.1", admin)
      if c then c:close() end
      return c ~= nil
    end, 10, "the admin listener")
  end)

  teardown(function()
    if srv then srv:stop(); srv:cleanup() end
    os.execute("rm -rf " .. dir)
  end)

  it("puts 5% +- 1% of 10,000 openids in v2, each openid always on its side, also after a reload", function()
    local v2_before, none_before = metric(admin, "v2"), metric(admin, "none")
    local first = colours(srv, by_openid(1, 10000))
    local n = 0
    for i, body in ipairs(first) do
      local want = gray.bucket("v2", openid(i)) < 500 and "v2 v2" or "v1 -"
      assert.equal(want, body, openid(i))
      if body == "v2 v2" then n = n + 1 end
    end
    print(string.format("\n    share at 5%%: %d of 10000 (%.2f%%)", n, n / 100))
    assert.is_true(n >= 400 and n <= 600, "share " .. n .. " of 10000")
    -- Counted by colour, every request once.
    H.wait_until(function()
      return metric(admin, "v2") - v2_before == n and metric(admin, "none") - none_before == 10000 - n
    end, 5, "the gray counters")

    -- Asked again: the same answer for each.
    local again = colours(srv, by_openid(1, 10000))
    for i = 1, 10000 do assert.equal(first[i], again[i], openid(i)) end

    -- A reload that adds a rule in front but leaves the canary alone.
    write_config(dir, 5, '{ name = "beta", colour = "beta", header = { "X-Beta", "1" } },')
    reload(srv)
    local after = colours(srv, by_openid(1, 10000))
    for i = 1, 10000 do assert.equal(first[i], after[i], openid(i)) end
    assert.same({ "v1 beta" }, colours(srv, { { headers = { ["X-Beta"] = "1", ["X-OpenID"] = openid(1) } } }))
  end)

  it("routes header rules exactly", function()
    write_config(dir, 5)
    reload(srv)
    local cases = {
      { { ["X-Wechat-Scene"] = "miniapp_v3" }, "v2 v2" },
      { { ["x-wechat-scene"] = "miniapp_v3" }, "v2 v2" },
      { { ["X-Wechat-Scene"] = "miniapp_v3 " }, "v2 v2" }, -- trailing whitespace is not part of a value
      { { ["X-Wechat-Scene"] = "MINIAPP_V3" }, "v1 -" },
      { { ["X-Wechat-Scene"] = "miniapp_v31" }, "v1 -" },
      { { ["X-Wechat-Scene"] = "miniapp_v2" }, "v1 -" },
      { { ["X-User-Region"] = "shanghai" }, "v1 sh" },
      { { ["X-User-Region"] = "Shanghai" }, "v1 -" },
      { { ["X-User-Region"] = "shanghai", ["X-Wechat-Scene"] = "miniapp_v3" }, "v2 v2" }, -- first rule wins
      { {}, "v1 -" },
    }
    -- 100 rounds of every case, mixed on the same connections.
    local list, want = {}, {}
    for round = 1, 100 do
      for j, c in ipairs(cases) do
        local h = {}
        for k, v in pairs(c[1]) do h[k] = v end
        -- An openid outside the 5% keeps the canary out of it.
        local id
        repeat
          id = string.format("oHdr%d_%d_%d", round, j, math.random(1e6))
        until gray.bucket("v2", id) >= 500
        h["X-OpenID"] = id
        list[#list + 1] = { headers = h }
        want[#want + 1] = c[2]
      end
    end
    local got = colours(srv, list)
    local wrong = {}
    for i = 1, #got do
      if got[i] ~= want[i] then
        local c = cases[(i - 1) % #cases + 1]
        wrong[#wrong + 1] = cjson.encode(c[1]) .. ": " .. got[i] .. ", expected " .. want[i]
      end
    end
    assert.equal(0, #wrong, wrong[1])
    -- Other paths see the colour without a v2 route of their own.
    assert.equal("http://orders-v2.internal", srv:get("/pick", { ["X-Wechat-Scene"] = "miniapp_v3" }).body)
    assert.equal("http://orders-v1.internal", srv:get("/pick").body)
    assert.truthy(#srv:log_lines('"gray":"v2"') > 0, "the access line names the colour")
  end)

  it("refuses a reload with a bad rule, naming it, and keeps serving the old rules", function()
    write_config(dir, 5)
    reload(srv)
    local inside
    for i = 1, 1000 do
      if gray.bucket("v2", openid(i)) < 500 then inside = openid(i); break end
    end
    write_config(dir, 500)
    local out, code = H.sh(H.WXD .. " reload --pid " .. srv.dir .. "/wxd.pid")
    assert.not_equal(0, code)
    assert.truthy(out:find("config.gray.rules[3] (canary): percent must be a number in 0..100, got 500", 1, true), out)
    assert.same({ "v2 v2" }, colours(srv, { { headers = { ["X-OpenID"] = inside } } }))
    write_config(dir, 5)
    reload(srv)
  end)

  it("sends the colour on outbound calls, as X-Wxd-Gray and in baggage, keeping the caller's entries", function()
    write_config(dir, 5)
    reload(srv)
    local up = "http://127.0.0.1:" .. srv.port .. "/echo"
    local function call(q, h)
      local r = srv:get("/call?url=" .. up .. (q or ""), h)
      assert.equal(200, r.status, r.body)
      local b = cjson.decode(r.body)
      return b.gray, cjson.decode(b.upstream)
    end
    local scene = { ["X-Wechat-Scene"] = "miniapp_v3" }
    local _, g, got
    g, got = call(nil, scene)
    assert.equal("v2", g)
    assert.equal("v2", got.gray)
    assert.equal("wxd-gray=v2", got.baggage)
    _, got = call("&bag=tenant%3Dacme,region%3Dsh", scene)
    assert.equal("tenant=acme,region=sh,wxd-gray=v2", got.baggage)
    -- An entry of the caller's own wins.
    _, got = call("&bag=wxd-gray%3Dmine", scene)
    assert.equal("wxd-gray=mine", got.baggage)
    _, got = call("&bag=", scene)
    assert.equal("wxd-gray=v2", got.baggage)
    -- Two lines of the caller's: the member joins the last one.
    _, got = call("&bag=a%3D1&bag2=b%3D2", scene)
    assert.equal("a=1, b=2,wxd-gray=v2", got.baggage)
    _, got = call("&bag=a%3D1&bag2=wxd-gray%3Dmine", scene)
    assert.equal("a=1, wxd-gray=mine", got.baggage)
    -- Uncoloured: nothing added.
    g, got = call("&bag=tenant%3Dacme")
    assert.is_false(g)
    assert.is_false(got.gray)
    assert.equal("tenant=acme", got.baggage)
    -- A task spawned by a coloured request calls out with its colour.
    got = task_call(srv, "t1", up, { ["X-User-Region"] = "shanghai" })
    assert.equal("sh", got.gray)
    assert.equal("wxd-gray=sh", got.baggage)
  end)
end)

describe("gray release with trace = false", function()
  it("still colours requests, shows req.gray, logs the colour and sends it on (tasks too)", function()
    local dir = H.tmpdir()
    os.execute("cp -r " .. H.app("gray") .. "/. " .. dir)
    H.write_file(dir .. "/config.lua", string.format(CONFIG, "", "5"):gsub("^return {", "return {\n  trace = false,"))
    local srv = H.start(dir, { workers = 2 })
    finally(function() srv:stop() srv:cleanup() end)
    local scene = { ["X-Wechat-Scene"] = "miniapp_v3", ["X-OpenID"] = "oNoTrace2" } -- bucket 2193: outside the 5%
    for _ = 1, 20 do
      assert.equal("v2 v2", srv:get("/who", scene).body)
      assert.equal("v1 -", srv:get("/who", { ["X-OpenID"] = "oNoTrace2" }).body)
    end
    H.wait_until(function() return #srv:log_lines('"gray":"v2"') >= 20 end, 5, "access lines with the colour")
    assert.equal(0, #srv:log_lines('"trace_id"'))
    -- Its calls, and a task's it spawned, still carry the colour (no trace context).
    local up = "http://127.0.0.1:" .. srv.port .. "/echo"
    local r = srv:get("/call?url=" .. up, scene)
    assert.equal(200, r.status, r.body)
    local got = cjson.decode(cjson.decode(r.body).upstream)
    assert.same({ "v2", "wxd-gray=v2" }, { got.gray, got.baggage })
    got = cjson.decode(cjson.decode(srv:get("/call?url=" .. up, { ["X-OpenID"] = "oNoTrace2" }).body).upstream)
    assert.same({ false, false }, { got.gray, got.baggage })
    got = task_call(srv, "nt1", up, { ["X-User-Region"] = "shanghai" })
    assert.same({ "sh", "wxd-gray=sh" }, { got.gray, got.baggage })
  end)
end)

describe("gray release reload under load", function()
  it("applies a new percentage to the next request, with no failed request (wrk, 2 workers)", function()
    local dir = H.tmpdir()
    os.execute("cp -r " .. H.app("gray") .. "/. " .. dir)
    write_config(dir, 5)
    local srv = H.start(dir, { workers = 2, pid = true })
    local wrk_out = dir .. "/wrk.out"
    -- Load until told to stop (SIGINT makes wrk print its summary).
    local pid = tonumber((H.sh(string.format(
      "wrk -t2 -c16 -d300s -H 'X-OpenID: oLoad0001' http://127.0.0.1:%d/who >%s 2>&1 & echo $!", srv.port, wrk_out))))
    assert.truthy(pid)
    H.wait_until(function() return srv:get("/who").status == 200 end, 5)

    local before = colours(srv, by_openid(20001, 22000))
    local moved = 0
    for pct_round, pct in ipairs({ 50, 20, 5 }) do
      write_config(dir, pct)
      reload(srv)
      -- The very next requests follow the new percentage, each exactly.
      local got = colours(srv, by_openid(20001, 22000))
      local n = 0
      for i, body in ipairs(got) do
        local want = gray.bucket("v2", openid(20000 + i)) < pct * 100 and "v2 v2" or "v1 -"
        assert.equal(want, body, pct .. "% " .. openid(20000 + i))
        if body == "v2 v2" then n = n + 1 end
        if pct_round == 1 and before[i] == "v2 v2" then
          -- Raising the percentage keeps everyone who was in.
          assert.equal("v2 v2", body)
        end
        if before[i] ~= body then moved = moved + 1 end
      end
      print(string.format("\n    after the reload to %d%%: %d of 2000 in v2", pct, n))
      assert.is_true(math.abs(n - 20 * pct) <= 20 * pct * 0.25 + 20, pct .. "%: " .. n)
    end
    assert.is_true(moved > 0)

    os.execute("kill -INT " .. pid)
    local out = H.wait_until(function()
      local s = H.read_file(wrk_out) or ""
      return s:find("Requests/sec", 1, true) and s
    end, 15, "wrk's summary")
    print("\n" .. out)
    assert.truthy(out:find("requests in", 1, true), out)
    assert.falsy(out:find("Socket errors", 1, true), out)
    assert.falsy(out:find("Non%-2xx"), out)
    srv:stop()
    srv:cleanup()
    os.execute("rm -rf " .. dir)
  end)
end)

describe("examples/gray-release", function()
  it("serves v2 of one route to coloured requests and v1 of the rest", function()
    local out, code = H.sh(H.WXD .. " check examples/gray-release")
    assert.equal(0, code, out)
    local port = H.free_port()
    local srv = H.start(H.ROOT .. "/examples/gray-release",
      { workers = 2, port = port, env = "RECOMMEND_BASE=http://127.0.0.1:" .. port })
    finally(function() srv:stop(); srv:cleanup() end)
    local scene = { ["X-Wechat-Scene"] = "miniapp_v3" }
    assert.equal("v1", cjson.decode(srv:get("/api/orders/7").body).api)
    assert.equal("v2", cjson.decode(srv:get("/api/orders/7", scene).body).api)
    assert.equal("v1", cjson.decode(srv:request("POST", "/api/orders", scene, "").body).api)
    local staff = cjson.decode(srv:get("/whoami", { ["X-OpenID"] = "oStaff00000000000000000001" }).body)
    assert.equal("v2", staff.colour)
    local rec = cjson.decode(srv:get("/recommend", { ["X-User-Region"] = "shanghai" }).body)
    assert.same({ engine = "v1", colour_received = "sh", baggage = "wxd-gray=sh" }, rec)
    rec = cjson.decode(srv:get("/recommend", scene).body)
    assert.equal("v2", rec.engine)
    -- A bad percentage in the environment: the config does not load, naming the rule.
    out, code = H.sh("GRAY_PERCENT=abc " .. H.WXD .. " check examples/gray-release")
    assert.not_equal(0, code)
    assert.truthy(out:find("config.gray.rules[4] (canary): percent must be a number in 0..100", 1, true), out)
  end)
end)
