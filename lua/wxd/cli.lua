--- wxd.cli: command-line commands written in Lua (`wxd reload`, `wxd restart`,
-- `wxd new`, `wxd test`).
-- @module wxd.cli

local core = require "wxd.core"
local json = require "wxd.json"

local _M = {}

local function read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

local function status_of(pidfile)
  local s = read(pidfile .. ".status")
  return s and (json.decode(s))
end

local function fail(msg)
  io.stderr:write("wxd reload: ", msg, "\n")
  return 1
end

-- The options of reload and restart: --pid FILE (wxd.pid), --timeout
-- SECONDS (60). nil after saying what is wrong (the caller exits 2).
local function pid_args(cmd, ...)
  local args = { ... }
  local pidfile, timeout = "wxd.pid", 60
  local i = 1
  while i <= #args do
    local a = args[i]
    if a == "--pid" then pidfile = args[i + 1]; i = i + 2
    elseif a:match("^%-%-pid=") then pidfile = a:sub(7); i = i + 1
    elseif a == "--timeout" then timeout = tonumber(args[i + 1]); i = i + 2
    else
      io.stderr:write("wxd ", cmd, ": unknown argument ", a, " (usage: wxd ", cmd,
        " [--pid FILE] [--timeout SECONDS])\n")
      return nil
    end
    if not pidfile or not timeout then
      io.stderr:write("wxd ", cmd, ": ", a, " needs a value\n")
      return nil
    end
  end
  return pidfile, timeout
end

--- `wxd reload [--pid FILE] [--timeout SECONDS]`: sends SIGHUP to the server
-- and waits for the outcome it writes to FILE.status. Exit 0 when the new
-- generation serves, 1 when the reload was refused (the error is printed) or
-- no outcome came in time, 2 on usage errors.
function _M.reload(...)
  local pidfile, timeout = pid_args("reload", ...)
  if not pidfile then return 2 end
  local pid = tonumber((read(pidfile) or ""):match("^%s*(%d+)"))
  if not pid then
    return fail("no pid in " .. pidfile .. " (start the server with `wxd run --pid " .. pidfile .. "`)")
  end
  local before = status_of(pidfile)
  local attempts = before and before.reloads and before.reloads.attempts or 0
  local ok, err = core.kill(pid, "HUP")
  if not ok then return fail("cannot signal process " .. pid .. ": " .. err) end
  local t0 = core.monotonic_ms()
  while core.monotonic_ms() - t0 < timeout * 1000 do
    core.sleep(20)
    local st = status_of(pidfile)
    if st and st.reloads and st.reloads.attempts > attempts and not st.reloads.in_progress then
      local last = st.last_reload or {}
      if last.ok then
        local msg = string.format("reloaded: generation %d serves (%.1f ms)", st.generation, last.ms or 0)
        if st.restart_needed and st.restart_needed[1] then
          msg = msg .. "; changes to " .. table.concat(st.restart_needed, ", ")
            .. " apply only after a restart"
        end
        print(msg)
        return 0
      end
      return fail("refused, generation " .. tostring(st.generation) .. " keeps serving:\n"
        .. tostring(last.error))
    end
    if not core.kill(pid, "0") then return fail("process " .. pid .. " is gone") end
  end
  return fail("no outcome after " .. timeout .. " s")
end

--- `wxd restart [--pid FILE] [--timeout SECONDS]`: graceful restart in place
-- (SIGUSR2): a successor process with the same command line takes the ports,
-- the old one drains and exits. Waits until the pid file names the successor
-- and its status file is written. Exit 0 then, 1 when no successor took over
-- in time (the server's log says why; the old process keeps serving), 2 on
-- usage errors.
function _M.restart(...)
  local pidfile, timeout = pid_args("restart", ...)
  if not pidfile then return 2 end
  local function pid_in_file() return tonumber((read(pidfile) or ""):match("^%s*(%d+)")) end
  local old = pid_in_file()
  if not old then
    io.stderr:write("wxd restart: no pid in ", pidfile, " (start the server with `wxd run --pid ", pidfile, "`)\n")
    return 1
  end
  local ok, err = core.kill(old, "USR2")
  if not ok then
    io.stderr:write("wxd restart: cannot signal process ", old, ": ", err, "\n")
    return 1
  end
  local t0 = core.monotonic_ms()
  while core.monotonic_ms() - t0 < timeout * 1000 do
    core.sleep(20)
    local now = pid_in_file()
    local st = now and now ~= old and status_of(pidfile)
    if st and st.pid == now then
      print(string.format("restarted: pid %d serves; pid %d drains and exits", now, old))
      return 0
    end
    if not now and not core.kill(old, "0") then
      io.stderr:write("wxd restart: process ", old, " is gone and no successor wrote ", pidfile, "\n")
      return 1
    end
  end
  io.stderr:write("wxd restart: no successor took over within ", timeout, " s (see the server's log); pid ", old,
                  " keeps serving\n")
  return 1
end

-- The files of a new app (`wxd new DIR`): paths under DIR and contents.
local SKELETON = {
  { "app.lua", [[
-- The app: wxd loads this file, which returns the app. Routes live in
-- handlers/; this file wires them up. `wxd dev` reloads on every change.
local app = require("wxd.app").new()

require("handlers.hello")(app)

return app
]] },
  { "config.lua", [[
-- Server settings (plain data, read again at every reload). Secrets come
-- from the environment: secret = env("MY_SECRET"). See docs/config.md.
return {
  listen = "127.0.0.1:8080",
  -- workers = 4,  -- default: one per CPU
}
]] },
  { "handlers/hello.lua", [[
-- Your handlers. A handler returns a body (a string, or a table sent as
-- JSON), or a status and a body.
return function(app)
  app:get("/", function()
    return "hello from wxd\n"
  end)

  app:get("/hello/:name", function(req)
    return { hello = req.params.name }
  end)
end
]] },
  { "spec/hello_spec.lua", [[
-- Run with `wxd test`: busted specs, inside the wxd runtime.
local testing = require "wxd.testing"

describe("hello", function()
  local client = testing.app(".")

  it("answers /", function()
    local res = client:get("/")
    assert.equal(200, res.status)
    assert.equal("hello from wxd\n", res.body)
  end)

  it("greets by name in JSON", function()
    local res = client:get("/hello/world")
    assert.equal(200, res.status)
    assert.same({ hello = "world" }, res.json)
  end)
end)
]] },
  { ".gitignore", [[
# pid and status files of `wxd run --pid wxd.pid`
*.pid
*.pid.status
# journals of wxd.order and wxd.queue (data, not code)
*.journal
]] },
}

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

--- `wxd new DIR`: creates an app in DIR (created; must not hold an app
-- already). Exit 0, 1 when DIR has an app.lua or cannot be written, 2 on
-- usage errors.
function _M.new(...)
  local args = { ... }
  local dir = args[1]
  if not dir or args[2] or dir:sub(1, 1) == "-" then
    io.stderr:write("wxd new: usage: wxd new DIR\n")
    return 2
  end
  if exists(dir .. "/app.lua") then
    io.stderr:write("wxd new: ", dir, " already has an app.lua: nothing written\n")
    return 1
  end
  local quoted = "'" .. dir:gsub("'", "'\\''") .. "'"
  local rc = os.execute("mkdir -p -- " .. quoted .. " " .. quoted .. "/handlers " .. quoted .. "/spec")
  if rc ~= 0 and rc ~= true then
    io.stderr:write("wxd new: cannot create ", dir, "\n")
    return 1
  end
  for _, file in ipairs(SKELETON) do
    local path = dir .. "/" .. file[1]
    if not exists(path) then
      local f, err = io.open(path, "wb")
      if not f then
        io.stderr:write("wxd new: ", err, "\n")
        return 1
      end
      f:write(file[2])
      f:close()
    end
  end
  print("created an app in " .. dir .. ":")
  for _, file in ipairs(SKELETON) do print("  " .. file[1]) end
  print("next: cd " .. dir .. " && wxd dev   (serves http://127.0.0.1:8080/)")
  print("      wxd test                 (runs spec/)")
  return 0
end

--- `wxd test [PATHS] [busted options]`: runs busted (default: spec/ of the
-- current directory) inside this runtime, so that specs can require wxd
-- and its native modules, wait with wxd.sleep, and load the app with
-- wxd.testing.app. Exit 0 when every spec passed, 1 otherwise.
function _M.test(...)
  local has_busted, runner = pcall(require, "busted.runner")
  if not has_busted then
    io.stderr:write("wxd test: busted is not installed (apt-get install lua-busted, or",
      " luarocks --lua-version=5.1 install busted)\n")
    return 1
  end
  -- busted reads the global arg, as the busted command does.
  arg = { [0] = "wxd test", ... } -- luacheck: ignore 121
  -- busted ends with os.exit; make it a return, so that wxd closes the
  -- loop and the Lua state properly.
  local EXIT = {}
  local real_exit = os.exit
  os.exit = function(code) -- luacheck: ignore 122
    if code == true or code == nil then code = 0 elseif code == false then code = 1 end
    error({ [EXIT] = code }, 0)
  end
  local ok, err = pcall(runner, { standalone = false })
  os.exit = real_exit -- luacheck: ignore 122
  if ok then return 0 end
  if type(err) == "table" and err[EXIT] then return err[EXIT] ~= 0 and 1 or 0 end
  -- busted signals failed specs by raising nil.
  if err ~= nil then io.stderr:write("wxd test: ", tostring(err), "\n") end
  return 1
end

return _M
