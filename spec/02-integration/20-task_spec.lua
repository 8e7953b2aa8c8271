-- wxd.task in a server: requests that spawn tasks and wait for them with a
-- deadline (the WeChat 5-second rule), hot reloads while they wait, 10,000
-- tasks on one worker, and shutdown with tasks still waiting.
local H = require "helpers"

local status = H.status

-- Sends a GET on its own connection and returns the connection, to read
-- the answer later (the request is in flight meanwhile).
local function send_get(srv, path)
  local c = srv:connect(30)
  assert(c:send("GET " .. path .. " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
  return c
end

local function read_body(c)
  local out = H.read_all(c, 30)
  c:close()
  local r = H.parse_responses(out)[1]
  assert(r, "no response")
  assert.equal(200, r.status, r.body)
  return r.body
end

describe("wxd.task in a server", function()
  local app, srv, admin_port
  before_each(function()
    app = H.tmpdir()
    os.execute("cp -r " .. H.app("task") .. "/. " .. app)
    admin_port = H.free_port()
    srv = H.start(app, { workers = 1, pid = true, args = "--admin 127.0.0.1:" .. admin_port })
  end)
  after_each(function()
    if srv then srv:stop(); srv:cleanup(); srv = nil end
    os.execute("rm -rf " .. app)
  end)

  it("answers with the task's reply when it comes before the deadline", function()
    assert.equal("reply quick from v1", srv:get("/message?id=quick&work=0&deadline=4500").body)
    assert.equal("reply slow from v1", srv:get("/message?id=slow&work=30&deadline=30000").body)
  end)

  it("answers at the deadline while the task goes on and records its late reply", function()
    local r = srv:get("/message?id=late&work=400&deadline=20")
    assert.equal("success", r.body)
    -- No timing assertion: the handler's reply shows up once it ends.
    H.wait_until(function() return srv:get("/record?id=late").body == "reply late from v1" end, 10,
      "the late reply to be recorded")
  end)

  it("runs 10,000 concurrent tasks on one worker inside a request", function()
    local r = srv:get_json("/many?n=10000")
    assert.equal(10000, r.n)
    assert.equal(10000 * 10001 / 2, r.sum)
    -- And again: the coroutine pool and the waiters are reused cleanly.
    assert.equal(10000 * 10001 / 2, srv:get_json("/many?n=10000").sum)
  end)

  it("finishes waiting requests and late tasks on the old generation across a reload, then frees it", function()
    -- In flight during the reload: three requests waiting for their tasks,
    -- and one already answered whose task runs until the spec releases it.
    local waiting = {}
    for i = 1, 3 do waiting[i] = send_get(srv, "/message?id=w" .. i .. "&work=800&deadline=30000") end
    assert.equal("success", srv:get("/message?id=bg&gated=1&deadline=1").body)
    H.wait_until(function() return status(admin_port).workers[1].requests >= 4 end, 5, "the requests to start")
    H.write_file(app .. "/handlers/version.lua", 'return { name = "v2" }')
    local out, code = H.sh(H.WXD .. " reload --pid " .. srv.dir .. "/wxd.pid")
    assert.equal(0, code, out)
    assert.equal("v2", srv:get("/version").body)
    for i = 1, 3 do assert.equal("reply w" .. i .. " from v1", read_body(waiting[i])) end
    -- Every request of generation 1 has ended: its task alone keeps it.
    assert.equal(1, status(admin_port).workers[1].retired_generations, "the task keeps the old generation")
    assert.equal("", srv:get("/record?id=bg").body)
    assert.equal("released", srv:get("/release?id=bg").body)
    H.wait_until(function() return srv:get("/record?id=bg").body == "reply bg from v1" end, 10,
      "the answered request's task to end on its old code")
    H.wait_until(function() return status(admin_port).workers[1].retired_generations == 0 end, 10,
      "the old generation to be freed")
    assert.equal("reply new from v2", srv:get("/message?id=new&work=1").body)
    srv:check_sanitizers()
  end)

  it("cancels a task in the middle of an outbound HTTP request; the client goes on working", function()
    local http = require "wxd.http"
    local task = require "wxd.task"
    local base = "http://127.0.0.1:" .. srv.port
    local h = task.spawn(function() return http.get(base .. "/message?id=c&work=600000&deadline=600000") end)
    assert.same({ nil, "timeout" }, { h:wait(50) })
    assert.equal(1, http.stats().requests, "in flight")
    assert.is_true(h:cancel())
    -- The request is failed at once and its connection closed; the pool
    -- counts it out when the close completes, a loop turn later.
    H.wait_until(function() return http.stats().requests == 0 end, 5, "the request to be released")
    for _ = 1, 3 do
      local res, err = http.get(base .. "/version")
      assert.equal(nil, err)
      assert.equal("v1", res.body)
    end
  end)

  it("cancels a task in the middle of a Redis command; the connection stays in step", function()
    local redis = require "wxd.redis"
    local task = require "wxd.task"
    local r = redis.new(H.redis_url())
    assert.equal("PONG", r:ping())
    -- BLPOP holds the connection until its reply (nil after 0.3 s): the
    -- cancelled command's reply must not go to the next one.
    local h = task.spawn(function() return r:blpop("wxd:task_spec:nothing", 0.3) end)
    assert.same({ nil, "timeout" }, { h:wait(30) })
    assert.is_true(h:cancel())
    assert.equal("PONG", r:ping())
    assert.equal("OK", r:set("wxd:task_spec:k", "v"))
    assert.equal("v", r:get("wxd:task_spec:k"))
    r:del("wxd:task_spec:k")
  end)

  it("stops at the shutdown deadline with requests and tasks still waiting", function()
    local c = send_get(srv, "/message?id=stuck&work=600000&deadline=600000")
    assert.equal("started", srv:get("/background?ms=600000").body)
    H.wait_until(function() return status(admin_port).workers[1].requests >= 2 end, 5, "the requests to start")
    local code = srv:stop(30) -- raises on a sanitizer report in the log
    assert.equal(0, code, srv:log_text())
    assert.truthy(srv:log_text():find("shutdown deadline reached", 1, true), srv:log_text())
    H.read_all(c, 5)
    c:close()
    srv:cleanup()
    srv = nil
  end)
end)
