-- Reload latency: signal to new code serving, for an app of 50 handler
-- modules, on 2 workers. Run: build/wxd script spec/bench/reload.lua
-- (make bench runs it). Prints the median, p90 and max over RELOADS runs.
package.path = "./spec/?.lua;./lua/?.lua;./lua/?/init.lua;" .. package.path
local H = require "helpers"
local socket = require "socket"

local MODULES = tonumber(os.getenv("RELOAD_MODULES")) or 50
local RELOADS = tonumber(os.getenv("RELOADS")) or 20

local app = H.tmpdir()
os.execute("mkdir -p " .. app .. "/handlers")
local requires = {}
for i = 1, MODULES do
  -- Each module does a little work at load, as real handler modules do
  -- (tables of constants, string building), and registers two routes.
  H.write_file(string.format("%s/handlers/h%02d.lua", app, i), string.format([[
local M = { name = "h%02d", codes = {} }
for c = 1, 200 do M.codes[c] = string.format("E%%04d", c) end
return function(app)
  app:get("/h%02d", function() return M.name end)
  app:get("/h%02d/:id", function(req) return { module = M.name, id = req.params.id } end)
end
]], i, i, i))
  requires[#requires + 1] = string.format('require("handlers.h%02d")(app)', i)
end
H.write_file(app .. "/handlers/version.lua", 'return "v0"')
H.write_file(app .. "/app.lua", "local app = require('wxd.app').new()\n"
  .. table.concat(requires, "\n")
  .. "\nlocal version = require('handlers.version')\n"
  .. "app:get('/version', function() return version end)\nreturn app\n")

local srv = H.start(app, { workers = 2, env = "WXD_ACCESS_LOG=off" })
local lat = {}
for i = 1, RELOADS do
  local v = "v" .. i
  H.write_file(app .. "/handlers/version.lua", 'return "' .. v .. '"')
  local t0 = socket.gettime()
  srv:signal("HUP")
  H.wait_until(function()
    for _ = 1, 4 do if srv:get("/version").body ~= v then return false end end
    return true
  end, 10, v)
  lat[#lat + 1] = (socket.gettime() - t0) * 1000
end
srv:stop()
local reload_ms = {}
for ms in srv:log_text():gmatch('"msg":"reloaded","generation":%d+,"ms":([%d%.]+)') do
  reload_ms[#reload_ms + 1] = tonumber(ms)
end
srv:cleanup()
os.execute("rm -rf " .. app)

local function summary(t)
  table.sort(t)
  local function q(p) return t[math.max(1, math.ceil(#t * p))] end
  return string.format("median %.1f ms, p90 %.1f ms, max %.1f ms", q(0.5), q(0.9), t[#t])
end
print(string.format("reload of an app with %d handler modules on 2 workers, %d reloads:", MODULES, RELOADS))
print("  signal -> new code answering (measured by the client, polling): " .. summary(lat))
if #reload_ms > 0 then
  print("  signal -> every worker switched (server's own figure):          " .. summary(reload_ms))
end
return 0
