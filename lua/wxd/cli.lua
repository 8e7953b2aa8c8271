--- wxd.cli: command-line commands written in Lua (`wxd reload`, `wxd restart`).
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

--- `wxd reload [--pid FILE] [--timeout SECONDS]`: sends SIGHUP to the server
-- and waits for the outcome it writes to FILE.status. Exit 0 when the new
-- generation serves, 1 when the reload was refused (the error is printed) or
-- no outcome came in time, 2 on usage errors.
function _M.reload(...)
  local args = { ... }
  local pidfile, timeout = "wxd.pid", 60
  local i = 1
  while i <= #args do
    local a = args[i]
    if a == "--pid" then pidfile = args[i + 1]; i = i + 2
    elseif a:match("^%-%-pid=") then pidfile = a:sub(7); i = i + 1
    elseif a == "--timeout" then timeout = tonumber(args[i + 1]); i = i + 2
    else
      io.stderr:write("wxd reload: unknown argument ", a, " (usage: wxd reload [--pid FILE] [--timeout SECONDS])\n")
      return 2
    end
    if not pidfile or not timeout then
      io.stderr:write("wxd reload: ", a, " needs a value\n")
      return 2
    end
  end
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
  local args = { ... }
  local pidfile, timeout = "wxd.pid", 60
  local i = 1
  while i <= #args do
    local a = args[i]
    if a == "--pid" then pidfile = args[i + 1]; i = i + 2
    elseif a:match("^%-%-pid=") then pidfile = a:sub(7); i = i + 1
    elseif a == "--timeout" then timeout = tonumber(args[i + 1]); i = i + 2
    else
      io.stderr:write("wxd restart: unknown argument ", a, " (usage: wxd restart [--pid FILE] [--timeout SECONDS])\n")
      return 2
    end
    if not pidfile or not timeout then
      io.stderr:write("wxd restart: ", a, " needs a value\n")
      return 2
    end
  end
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

return _M
