-- wxd.redis and the store's redis backend in a real server with 2 workers
-- (spec/fixtures/apps/redis): exact counts under concurrency, one
-- connection per worker, a cross-worker lock, pub/sub and hot reload,
-- shutdown with a command in flight.
local H = require "helpers"
local cjson = require "cjson"
local redis = require "wxd.redis"
local wxd = require "wxd"

local APP = H.app("redis")
local DB = 9

local post = H.post_raw
local function get_json(srv, path) return srv:get_json(path) end

-- n_conns connections at once, each with per_conn pipelined copies of req;
-- every response in one list.
local function burst(srv, n_conns, per_conn, req)
  local batches = {}
  for i = 1, n_conns do
    batches[i] = {}
    for j = 1, per_conn do batches[i][j] = req end
  end
  local out = {}
  for _, resps in ipairs(H.pipelined(srv, batches)) do
    for _, resp in ipairs(resps) do out[#out + 1] = resp end
  end
  return out
end

describe("wxd.redis in a server", function()
  local srv, r, url

  -- The server's connections to database DB: command and subscriber ones.
  local function server_clients()
    local cmd, sub = {}, {}
    local mine = tostring(redis.new(url):client("ID")) -- this spec's own connection to DB
    for line in assert(r:client("LIST")):gmatch("[^\n]+") do
      local id, db, flags = line:match("id=(%d+)"), line:match(" db=(%d+)"), line:match(" flags=(%S+)")
      if db == tostring(DB) and id ~= mine then
        if flags:find("P", 1, true) then sub[#sub + 1] = id else cmd[#cmd + 1] = id end
      end
    end
    table.sort(cmd)
    table.sort(sub)
    return cmd, sub
  end

  setup(function()
    url = H.redis_url():gsub("/%d+$", "/" .. DB)
    r = redis.new(H.redis_url()) -- database 0: not counted among the server's
    local db = redis.new(url)
    assert.equal("OK", db:flushdb())
    srv = H.start(APP, { workers = 2, pid = true, env = "WXD_TEST_REDIS_URL=" .. url })
  end)

  teardown(function()
    if srv then srv:cleanup() end
  end)

  it("counts exactly from many concurrent requests, on one connection per worker", function()
    local resps = burst(srv, 20, 25, post("/incr"))
    assert.equal(500, #resps)
    local workers, seen = {}, {}
    for _, resp in ipairs(resps) do
      assert.equal(200, resp.status, resp.body)
      local n, w = resp.body:match("^(%d+) (%d+)$")
      assert.is_nil(seen[n], "each count once")
      seen[n] = true
      workers[w] = true
    end
    assert.truthy(workers["0"] and workers["1"], "both workers served")
    assert.equal("500", redis.new(url):get("it:hits"))
    local cmd, sub = server_clients()
    assert.equal(2, #cmd, "one command connection per worker")
    assert.equal(2, #sub, "one subscriber connection per worker")
  end)

  it("uses the redis store from handlers, with types kept", function()
    assert.is_true(cjson.decode(srv:request("POST", "/store/n?type=number", nil, "42").body).ok)
    assert.is_true(cjson.decode(srv:request("POST", "/store/b?type=boolean", nil, "true").body).ok)
    assert.is_true(cjson.decode(srv:request("POST", "/store/s", nil, "42").body).ok)
    for _ = 1, 4 do -- whichever worker answers
      assert.same({ value = 42, type = "number" }, get_json(srv, "/store/n"))
      assert.same({ value = true, type = "boolean" }, get_json(srv, "/store/b"))
      assert.same({ value = "42", type = "string" }, get_json(srv, "/store/s"))
    end
    assert.equal("n42", redis.new(url):get("it:n"), "the prefix and the type tag")
    local first = cjson.decode(srv:request("POST", "/add/once", nil, "x").body)
    local second = cjson.decode(srv:request("POST", "/add/once", nil, "y").body)
    assert.is_true(first.ok)
    assert.same({ ok = false, err = "exists" }, second)
  end)

  it("serialises a critical section across workers with a store lock", function()
    local resps = burst(srv, 10, 5, post("/locked-incr"))
    for _, resp in ipairs(resps) do assert.equal(200, resp.status, resp.body) end
    assert.same({ value = 50, type = "number" }, get_json(srv, "/store/locked"))
  end)

  it("delivers pub/sub messages once per worker, also after a hot reload", function()
    local c = redis.new(url)
    H.wait_until(function() return c:publish("it:events", "m1") == 2 end, 5, "both workers subscribed")
    H.wait_until(function() return c:get("it:seen:m1") == "2" end, 5, "both workers' callbacks")
    local cmd_before, sub_before = server_clients()

    srv:signal("HUP")
    H.wait_until(function()
      for _ = 1, 6 do if srv:get("/generation").body ~= "2" then return false end end
      return true
    end, 10, "generation 2 on both workers")
    -- The retired generation's subscriptions are gone; the new one's
    -- arrived on the same subscriber connection.
    H.wait_until(function() return c:publish("it:events", "m2") >= 1 end, 5, "the subscription")
    H.wait_until(function() return c:get("it:seen:m2") == "2" end, 5, "both workers' callbacks")
    wxd.sleep(100)
    assert.equal("2", c:get("it:seen:m2"), "delivered once per worker, not once per generation")
    assert.equal("2", c:get("it:seen:m2:g2"))
    assert.equal(redis.null, c:get("it:seen:m2:g1"))
    local cmd_after, sub_after = server_clients()
    assert.same(cmd_before, cmd_after, "connections survive the reload")
    assert.same(sub_before, sub_after)
    assert.equal("ready", get_json(srv, "/status").state)
  end)

  it("times out a command and keeps serving", function()
    assert.equal("nil timeout", srv:get("/timeout").body)
    local resp = srv:request("POST", "/incr")
    assert.equal(200, resp.status, resp.body)
  end)

  it("cancels a command still waiting at the shutdown deadline", function()
    local c = srv:connect(5)
    assert(c:send("GET /block HTTP/1.1\r\nHost: x\r\n\r\n"))
    H.wait_until(function()
      return redis.new(url):client("LIST"):find("cmd=blpop", 1, true)
    end, 5, "the BLPOP to reach Redis")
    local t0 = wxd.monotonic_ms()
    assert.equal(0, srv:stop())
    assert.is_true(wxd.monotonic_ms() - t0 < 5000)
    c:close()
    assert.falsy(srv:log_text():find("unblocked", 1, true))
  end)
end)

describe("wxd.redis config in a server", function()
  it("lets `wxd check` load an app that subscribes, without connecting", function()
    local t0 = wxd.monotonic_ms()
    local out, code = H.sh("WXD_TEST_REDIS_URL=redis://127.0.0.1:" .. H.free_port() .. "/0 " .. H.WXD .. " check " .. APP)
    assert.equal(0, code, out)
    assert.falsy(out:find("redis:", 1, true), out)
    assert.is_true(wxd.monotonic_ms() - t0 < 3000)
  end)

  it("refuses a literal password in the URL at start-up, naming the key", function()
    local app = H.tmpdir()
    os.execute("cp -r " .. APP .. "/. " .. app)
    H.write_file(app .. "/config.lua", 'return { redis = "redis://:hunter2@127.0.0.1:6379/0" }')
    local out, code = H.sh(H.WXD .. " check " .. app)
    assert.equal(1, code)
    assert.truthy(out:find("config.redis: a password in the URL must come from the environment", 1, true), out)
    assert.falsy(out:find("hunter2", 1, true), out)
    os.execute("rm -rf " .. app)
  end)
end)
