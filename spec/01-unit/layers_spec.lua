-- The Lua library is layered: every module requires only modules below it
-- in LAYERS, at load time or inside a function (no lazy require left to
-- break a cycle). The one exception is the facade `wxd` (lua/wxd/init.lua),
-- which loads the library modules on first use by name (a table, not a
-- `require "..."` in its code); modules below it may read its runtime
-- state (wxd.config, wxd.generation).
local H = require "helpers"

-- Bottom first. A new module goes where its requires allow.
local LAYERS = {
  "wxd", "wxd.util", "wxd.metrics", "wxd.trace", "wxd.gray", "wxd.cookie", "wxd.static", "wxd.multipart", "wxd.cors",
  "wxd.apiversion", "wxd.json", "wxd.respond",
  "wxd.xml", "wxd.crypto", "wxd.timer", "wxd.task", "wxd.shdict",
  "wxd.log", "wxd.lock", "wxd.redis", "wxd.limit", "wxd.retry", "wxd.breaker", "wxd.http", "wxd.otlp", "wxd.jwt",
  "wxd.ws",
  "wxd.config", "wxd.store", "wxd.alert", "wxd.session", "wxd.internal", "wxd.order", "wxd.queue", "wxd.degrade",
  "wxd.miniprogram", "wxd.wechat", "wxd.cloudbase", "wxd.mp", "wxd.pay.orders", "wxd.pay.notify", "wxd.pay.v2", "wxd.pay",
  "wxd.app", "wxd.testing", "wxd.server", "wxd.cli",
}

local function module_name(path)
  local rel = path:match("lua/(wxd/.-)%.lua$")
  if rel == "wxd/init" then return "wxd" end
  return (rel:gsub("/", "."))
end

-- Every required module name in a file (string literals only), without
-- comments and the contents of other strings.
local function requires(src)
  src = src:gsub("%-%-%[(=*)%[.-%]%1%]", ""):gsub("%-%-[^\n]*", "")
  local out = {}
  for _, pat in ipairs({ 'require%s*%(?%s*"([%w%._]+)"', "require%s*%(?%s*'([%w%._]+)'" }) do
    for name in src:gmatch(pat) do out[#out + 1] = name end
  end
  return out
end

describe("the Lua library's layers", function()
  local rank, files = {}, {}
  for i, m in ipairs(LAYERS) do rank[m] = i end
  for path in H.sh("ls lua/wxd/*.lua lua/wxd/*/*.lua 2>/dev/null"):gmatch("[^\n]+") do files[#files + 1] = path end

  it("places every module of lua/wxd", function()
    assert.is_true(#files >= 15)
    for _, path in ipairs(files) do
      assert.truthy(rank[module_name(path)], module_name(path) .. " (" .. path .. ") is not in LAYERS")
    end
  end)

  it("has every require point down", function()
    local wrong = {}
    for _, path in ipairs(files) do
      local me = module_name(path)
      for _, dep in ipairs(requires(H.read_file(path))) do
        if dep:match("^wxd") and not dep:match("^wxd%.core") then
          if not rank[dep] then
            wrong[#wrong + 1] = me .. " requires " .. dep .. ", which is not in LAYERS"
          elseif rank[dep] >= rank[me] and me ~= "wxd" then
            wrong[#wrong + 1] = me .. " requires " .. dep .. ", which is not below it"
          end
        end
      end
    end
    assert.same({}, wrong)
  end)

  it("is checked by a parser that sees requires", function()
    -- The check itself: a file that reaches up is caught.
    local found = requires('local app = require "wxd.app"\nlocal x = require("wxd.log") -- require "wxd.mp"')
    assert.same({ "wxd.app", "wxd.log" }, found)
  end)
end)
