-- The rockspec installs every module of the Lua library, and only those.
local H = require "helpers"

describe("rockspec", function()
  it("lists every module under lua/ with the right file", function()
    local env = {}
    local chunk = assert(loadfile("rockspec/wxd-scm-1.rockspec"))
    setfenv(chunk, env)
    chunk()
    local listed = env.build.install.lua
    local on_disk = {}
    local files = H.sh("cd lua && find . -name '*.lua' | sort")
    for path in files:gmatch("[^\n]+") do
      local mod = path:gsub("^%./", ""):gsub("%.lua$", ""):gsub("/init$", ""):gsub("/", ".")
      on_disk[mod] = "lua/" .. path:gsub("^%./", "")
    end
    for mod, file in pairs(on_disk) do
      assert.equal(file, listed[mod], "module " .. mod .. " is not listed in the rockspec")
    end
    for mod in pairs(listed) do
      assert.truthy(on_disk[mod], "the rockspec lists " .. mod .. " which does not exist")
    end
    assert.equal("build/wxd", env.build.install.bin.wxd)
  end)
end)
