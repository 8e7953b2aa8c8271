-- Waiting where a coroutine cannot yield, and signals at awkward moments.
local H = require "helpers"
local socket = require "socket"
local wxd = require "wxd"

describe("waiting where it cannot", function()
  local srv
  setup(function() srv = H.start(H.app("edge"), { workers = 1 }) end)
  teardown(function() srv:stop(); srv:cleanup() end)

  it("gives a 500 with a clear error, and later waits are not cut short", function()
    for _, path in ipairs({ "/lazy", "/gsub" }) do
      for _ = 1, 3 do assert.equal(500, srv:get(path).status) end
    end
    assert.truthy(srv:log_text():find("cannot wait here", 1, true))
    -- Before the fix, a stray timer resumed a reused coroutine: a sleep
    -- ended early, then the worker crashed.
    for _ = 1, 3 do
      local t0 = socket.gettime()
      assert.equal("slept 100", srv:get("/sleep?ms=100").body)
      assert.is_true(socket.gettime() - t0 >= 0.09)
    end
    assert.is_nil(srv:exit_code(), "the server is still running")
  end)
end)

describe("signals at awkward moments", function()
  it("handles SIGHUP during a slow start-up instead of dying", function()
    local srv = H.start(H.app("edge"), { workers = 1, env = "WXD_SPEC_SLOW_START_MS=800", expect_failure = true })
    wxd.sleep(200)
    srv:signal("HUP")
    H.wait_until(function()
      return srv:log_text():find('"msg":"listening"', 1, true) or srv:exit_code()
    end, 10, "start-up")
    assert.is_nil(srv:exit_code(), "still running after SIGHUP at start-up")
    H.wait_until(function() return srv:log_text():find('"msg":"reloaded"', 1, true) end, 10, "the reload")
    assert.equal(0, srv:stop())
    srv:cleanup()
  end)

  it("stops within the deadline when a handler starts a timer while draining", function()
    local srv = H.start(H.app("edge"), { workers = 1 })
    local c = srv:connect()
    c:send("GET /start-timer HTTP/1.1\r\nHost: x\r\n\r\n")
    wxd.sleep(100)
    local t0 = socket.gettime()
    srv:signal("TERM")
    local out = H.read_all(c, 5)
    c:close()
    assert.equal("started", H.parse_responses(out)[1].body)
    assert.equal(0, srv:stop(10))
    assert.is_true(socket.gettime() - t0 < 3, "exited within shutdown_timeout_ms (2 s)")
    srv:cleanup()
  end)

  it("closes an idle status connection at shutdown", function()
    local admin = H.free_port()
    local srv = H.start(H.app("edge"), { workers = 1, args = "--admin 127.0.0.1:" .. admin })
    local idle = assert(socket.connect("127.0.0.1", admin))
    local t0 = socket.gettime()
    assert.equal(0, srv:stop(10))
    assert.is_true(socket.gettime() - t0 < 3)
    idle:close()
    srv:cleanup()
  end)
end)
