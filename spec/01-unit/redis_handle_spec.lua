-- wxd.core.redis connection handles: checked full userdata. A wrong value
-- given to the native functions (a table, a number, nil, a light userdata
-- from elsewhere, another kind of userdata, the other kind of connection)
-- raises a Lua error; a handle used after its pool closed gets an error;
-- nothing crashes. Each case runs in a child `wxd script`, so that a crash
-- fails its case instead of the whole run.
local H = require "helpers"

local dir
local n = 0

-- Runs `body` in a child wxd script (core is wxd.core.redis, conn and sub
-- handles of a connection and a subscriber connection that never connect)
-- and returns what it printed and its exit code.
local function child(body)
  n = n + 1
  local path = dir .. "/case" .. n .. ".lua"
  H.write_file(path, [[
local core = require "wxd.core.redis"
local spec = { key = "k", label = "127.0.0.1:1", host = "127.0.0.1", port = 1, db = 0, connect_ms = 1000 }
local conn = core.connection(spec)
local sub = core.connection(spec, true)
assert(conn and sub)
]] .. body)
  return H.sh(H.WXD .. " script " .. path)
end

-- The child calls core[fname](bad, ...) in a pcall and prints the outcome.
local function outcome(fname, bad_expr, rest)
  return child(([[
local bad = %s
local ok, err = pcall(core.%s, bad%s)
print(ok and "returned" or ("raised: " .. tostring(err)))
]]):format(bad_expr, fname, rest or ""))
end

local ARGS = {
  call = ", 1000, 'PING'",
  pipeline = ", 1000, { { 'PING' } }",
  subscribe = ", false, 'ch', function() end",
  info = "",
}

local BAD = {
  ["a table"] = "{}",
  ["a number"] = "42",
  ["nil"] = "nil",
  ["redis.null (a NULL light userdata)"] = "core.null",
  ["a light userdata from elsewhere"] = "debug.upvalueid(function() return spec end, 1)",
  ["another kind of userdata"] = "io.stdout",
  ["a subscription handle"] = "core.subscribe(sub, false, 'ch', function() end)",
}

describe("wxd.core.redis handles", function()
  setup(function() dir = H.tmpdir() end)
  teardown(function() if dir then H.sh("rm -rf " .. dir) end end)

  for _, fname in ipairs({ "call", "pipeline", "subscribe", "info" }) do
    for what, expr in pairs(BAD) do
      it(fname .. " raises on " .. what, function()
        local out, code = outcome(fname, expr, ARGS[fname])
        assert.equal(0, code, out)
        assert.matches("raised: [^\n]*bad argument #1", out)
      end)
    end
  end

  it("call and pipeline refuse a subscriber connection; subscribe refuses a plain one", function()
    local out, code = outcome("call", "sub", ARGS.call)
    assert.equal(0, code, out)
    assert.matches("raised: [^\n]*expected a connection", out)
    out, code = outcome("pipeline", "sub", ARGS.pipeline)
    assert.equal(0, code, out)
    assert.matches("raised: [^\n]*expected a connection", out)
    out, code = outcome("subscribe", "conn", ARGS.subscribe)
    assert.equal(0, code, out)
    assert.matches("raised: [^\n]*expected a subscriber connection", out)
  end)

  it("hides the handle's metatable", function()
    local out, code = child("print(getmetatable(conn), type(conn))\n")
    assert.equal(0, code, out)
    assert.equal("wxd.redis.connection\tuserdata\n", out)
  end)

  it("a handle that outlives its pool gets an error, and its memory is freed", function()
    -- The module's state (its first upvalue) closes the pool from its __gc,
    -- as when a script's Lua state closes. Under the ASan build (make asan)
    -- a struct never freed fails the child's exit code.
    local out, code = child([[
local _, state = debug.getupvalue(core.call, 1)
getmetatable(state).__gc(state)
print(core.call(conn, 1000, "PING"))
print(core.pipeline(conn, 1000, { { "PING" } }))
print(core.info(conn).state)
print(pcall(core.subscribe, sub, false, "ch", function() end))
conn, sub = nil, nil
collectgarbage()
collectgarbage()
print("done")
]])
    assert.equal(0, code, out)
    assert.equal(table.concat({
      "nil\tconnect\tthe connection pool is closed",
      "nil\tconnect\tthe connection pool is closed",
      "down",
      "false\twxd.redis: the connection pool is closed",
      "done",
    }, "\n") .. "\n", out)
  end)
end)
