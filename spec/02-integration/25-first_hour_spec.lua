-- A new app writer's first hour: wxd installed with LuaRocks into a tree of
-- its own runs from anywhere without WXD_LUA_DIR; `wxd new` makes an app
-- whose spec `wxd test` passes; the installed binary serves it.
local H = require "helpers"

-- Runs a command with no WXD_LUA_DIR, from directory `dir`.
local function sh_in(dir, cmd)
  return H.sh("cd " .. dir .. " && env -u WXD_LUA_DIR " .. cmd)
end

describe("wxd installed with luarocks", function()
  local tree, work, bin

  setup(function()
    tree = H.tmpdir()
    work = H.tmpdir()
    bin = tree .. "/bin/wxd"
  end)

  teardown(function()
    os.execute("rm -rf " .. tree .. " " .. work)
  end)

  it("installs into a tree, makes an app, tests it and serves it from another directory", function()
    local out, rc = H.sh("command -v luarocks")
    assert(rc == 0, "luarocks is not installed (make deps installs it): " .. out)
    -- Debian's luarocks defaults to Lua 5.2: the rock is for 5.1 (LuaJIT).
    out, rc = H.sh("luarocks --lua-version=5.1 make --tree " .. tree .. " rockspec/wxd-scm-1.rockspec")
    assert(rc == 0, "luarocks make failed:\n" .. out)
    assert.truthy(H.read_file(tree .. "/share/lua/5.1/wxd/server.lua"), "the Lua library is not in the tree")

    out, rc = sh_in(work, bin .. " new shop")
    assert(rc == 0, "wxd new failed:\n" .. out)
    for _, f in ipairs({ "app.lua", "config.lua", "handlers/hello.lua", "spec/hello_spec.lua", ".gitignore" }) do
      assert.truthy(H.read_file(work .. "/shop/" .. f), "wxd new did not write " .. f)
    end
    assert.matches("%*%.pid", H.read_file(work .. "/shop/.gitignore"))

    out, rc = sh_in(work .. "/shop", bin .. " check")
    assert(rc == 0, "wxd check failed:\n" .. out)
    out, rc = sh_in(work .. "/shop", bin .. " test")
    assert(rc == 0, "wxd test failed:\n" .. out)
    assert.matches("2 successes / 0 failures", out)

    -- A failing spec fails `wxd test`.
    H.write_file(work .. "/shop/spec/broken_spec.lua",
      'describe("x", function() it("fails", function() assert.equal(1, 2) end) end)\n')
    out, rc = sh_in(work .. "/shop", bin .. " test")
    assert.equal(1, rc, out)
    assert.matches("1 failure", out)
    -- Paths select the specs.
    out, rc = sh_in(work .. "/shop", bin .. " test spec/hello_spec.lua")
    assert(rc == 0, out)

    -- Served by the installed binary, started from another directory.
    local saved = H.WXD
    H.WXD = bin
    local ok, srv = pcall(H.start, work .. "/shop", { env = "env -u WXD_LUA_DIR -C " .. tree })
    H.WXD = saved
    assert(ok, srv)
    local r = srv:get("/hello/installed")
    local r2 = srv:get("/")
    srv:stop()
    srv:cleanup()
    assert.equal(200, r.status)
    assert.equal('{"hello":"installed"}', r.body)
    assert.equal("hello from wxd\n", r2.body)
  end)

  it("refuses to overwrite an app", function()
    local dir = H.tmpdir()
    H.write_file(dir .. "/app.lua", "return 1\n")
    local out, rc = H.sh(H.WXD .. " new " .. dir)
    os.execute("rm -rf " .. dir)
    assert.equal(1, rc)
    assert.matches("already has an app.lua", out)
  end)
end)

describe("load-time messages", function()
  local dir
  before_each(function() dir = H.tmpdir() end)
  after_each(function() os.execute("rm -rf " .. dir) end)

  it("says the app is still loading when app.lua waits at its top level", function()
    H.write_file(dir .. "/app.lua", 'require("wxd").sleep(1)\nreturn require("wxd.app").new()\n')
    local out, rc = H.sh(H.WXD .. " check " .. dir)
    assert.equal(1, rc)
    assert.matches("wxd.sleep: cannot wait while the app is still loading", out, 1, true)
    assert.matches("app.lua:1", out, 1, true)
  end)

  it("lets a timer started at load wait", function()
    H.write_file(dir .. "/app.lua", [[
local wxd = require "wxd"
local app = require("wxd.app").new()
local state = "loading"
wxd.timer.after(0, function() wxd.sleep(1) state = "slept" end)
app:get("/state", function() return state end)
return app
]])
    local srv = H.start(dir)
    local got = H.wait_until(function()
      local r = srv:get("/state")
      return r.body == "slept" and r.body
    end, 10, "the timer to sleep")
    srv:stop()
    srv:cleanup()
    assert.equal("slept", got)
  end)

  it("says config files are sandboxed when config.lua requires a module", function()
    H.write_file(dir .. "/app.lua", 'return require("wxd.app").new()\n')
    H.write_file(dir .. "/config.lua", 'local x = require "socket"\nreturn {}\n')
    local out, rc = H.sh(H.WXD .. " check " .. dir)
    assert.equal(1, rc)
    assert.matches('config.lua:1: require("socket"): config files are sandboxed', out, 1, true)
  end)
end)

describe("wxd dev", function()
  local dir, srv
  before_each(function() dir = H.tmpdir() end)
  after_each(function()
    if srv then srv:stop() srv:cleanup() srv = nil end
    os.execute("rm -rf " .. dir)
  end)

  local GOOD = 'local app = require("wxd.app").new()\napp:get("/", function() return "fixed" end)\n'
    .. 'app:get("/boom", function() error("boom at " .. "handler") end)\nreturn app\n'

  it("keeps watching after a start-up error and serves once the code is fixed", function()
    H.write_file(dir .. "/app.lua", 'local app = require("wxd.app").new(\nreturn app\n')
    srv = H.start(dir, { mode = "dev", expect_failure = true })
    H.wait_until(function() return srv:log_text():find("not serving", 1, true) end, 10, "the start-up error")
    assert.is_nil(srv:exit_code())
    local log = srv:log_text()
    -- Text for people: time, level, message.
    assert.matches("%d%d:%d%d:%d%d%.%d%d%d ERROR cannot load app [^\n]*app.lua:2:", log)
    -- A broken config.lua is waited out too.
    H.write_file(dir .. "/config.lua", "return { workers = 'many' }\n")
    H.write_file(dir .. "/app.lua", GOOD)
    H.wait_until(function() return srv:log_text():find("config.workers", 1, true) end, 10, "the config error")
    H.write_file(dir .. "/config.lua", "return {}\n")
    H.wait_until(function()
      local ok, c = pcall(srv.connect, srv, 1)
      if ok then c:close() end
      return ok
    end, 15, "wxd to serve the fixed app")
    assert.equal("fixed", srv:get("/").body)
  end)

  it("logs handler errors as text with the traceback on lines of its own", function()
    H.write_file(dir .. "/app.lua", GOOD)
    srv = H.start(dir, { mode = "dev" })
    assert.equal(500, srv:get("/boom").status)
    local log = H.wait_until(function()
      local l = srv:log_text()
      return l:find("stack traceback", 1, true) and l
    end, 10, "the handler error")
    assert.matches("\n[%d:.]+ ERROR w0 handler error [^\n]*path=/boom[^\n]*\n  error:\n    [^\n]*app.lua:3: boom at handler\n"
      .. "    stack traceback:\n", log)
  end)

  it("logs JSON lines under wxd dev with WXD_LOG_FORMAT=json, and text under run with text", function()
    H.write_file(dir .. "/app.lua", GOOD)
    srv = H.start(dir, { mode = "dev", env = "WXD_LOG_FORMAT=json" })
    assert.matches('^{"ts":"[^"]+","level":"info","msg":"listening"', srv:log_text())
    srv:stop()
    srv:cleanup()
    srv = H.start(dir, { env = "WXD_LOG_FORMAT=text" })
    assert.matches("^[%d:.]+ INFO  listening listen=127%.0%.0%.1:", srv:log_text())
    srv:stop()
    srv:cleanup()
    srv = nil
    local out, rc = H.sh("WXD_LOG_FORMAT=yaml " .. H.WXD .. " run " .. dir)
    assert.equal(2, rc)
    assert.matches("WXD_LOG_FORMAT: expected text or json", out, 1, true)
  end)
end)

describe("the README's spec of the shop example", function()
  it("passes under wxd test", function()
    local readme = assert(H.read_file(H.ROOT .. "/README.md"))
    local dir = H.tmpdir()
    os.execute("mkdir -p " .. dir .. "/shop/handlers " .. dir .. "/shop/lib " .. dir .. "/shop/spec")
    for _, name in ipairs({ "app.lua", "handlers/orders.lua", "lib/orders.lua", "config.lua", "spec/orders_spec.lua" }) do
      local code = readme:match("`shop/" .. (name:gsub("%p", "%%%0")) .. "`[^\n]*\n\n```lua\n(.-\n)```")
      assert(code, "README.md has no block for shop/" .. name)
      H.write_file(dir .. "/shop/" .. name, code)
    end
    local wxd_bin = H.WXD:sub(1, 1) == "/" and H.WXD or H.ROOT .. "/" .. H.WXD
    local out, rc = H.sh("cd " .. dir .. "/shop && " .. wxd_bin .. " test")
    os.execute("rm -rf " .. dir)
    assert(rc == 0, "wxd test failed:\n" .. out)
    assert.matches("2 successes / 0 failures / 0 errors", out)
  end)
end)

describe("text log lines", function()
  it("are written for every line the JSON log spec provokes, one access line per request", function()
    local targets = { "/caf\233", "/\255\254", "/a\"b\\c\"", "/x\1y", "/" .. string.rep("\255", 300) }
    local srv = H.start(H.app("logjson"), { env = "WXD_LOG_FORMAT=text" })
    for _, target in ipairs(targets) do
      srv:raw("GET " .. target .. " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    end
    assert.equal("logged\n", srv:get("/log/samples").body)
    for _, v in ipairs({ "caf\233", "q\"uo\\te", "tab\there", "a\\nb" }) do
      assert.equal("logged\n", srv:get("/log/header", { ["X-Msg"] = v }).body)
      assert.equal(500, srv:get("/boom", { ["X-Msg"] = v }).status)
    end
    local want = #targets + 1 + 8
    local log = H.wait_until(function()
      local l = srv:log_text()
      local _, n = l:gsub("\n[%d:.]+ INFO  w0 access ", "")
      return n == want and l
    end, 10, "an access line per request")
    srv:stop()
    srv:cleanup()
    -- Every line is text: none is left as JSON (a line the converter did
    -- not take would be).
    for line in log:gmatch("[^\n]+") do
      assert.is_nil(line:match("^{"), line)
    end
  end)
end)
