-- wxd.testing.app: an app loaded as the server loads it (config.lua, env()
-- values given by the spec, modules of the app found in its directory),
-- and requests sent through it with status, headers and decoded body back.
local H = require "helpers"
local testing = require "wxd.testing"
local env = require("wxd.config").env

local APP = [[
local wxd = require "wxd"
local app = require("wxd.app").new()
require("handlers.echo")(app)
app:get("/config", function()
  return { greeting = wxd.config.app.greeting, secret_len = #wxd.config.app.secret }
end)
app:post("/orders", function(req)
  local body = req:json()
  return 201, { sku = body.sku, qty = body.qty }
end)
app:post("/form", function(req)
  local f = req:form()
  return f.name .. ":" .. f.note
end)
app:get("/tags", function(req)
  return table.concat(req:query_all("tag"), ",") .. "|" .. tostring(req.query.one)
end)
app:get("/slow", function()
  wxd.sleep(5)
  return "late"
end)
return app
]]

local HANDLER = [[
return function(app)
  app:get("/echo/:word", function(req, res)
    res:set_header("x-echo", req.params.word)
    return req.params.word .. " " .. (req.headers["x-from"] or "-")
  end)
end
]]

local CONFIG = [[
return {
  app = { greeting = "hi", secret = env("SHOP_SECRET") },
}
]]

describe("wxd.testing.app", function()
  local dir

  setup(function()
    dir = H.tmpdir()
    os.execute("mkdir -p " .. dir .. "/handlers")
    H.write_file(dir .. "/app.lua", APP)
    H.write_file(dir .. "/handlers/echo.lua", HANDLER)
    H.write_file(dir .. "/config.lua", CONFIG)
  end)

  teardown(function() os.execute("rm -rf " .. dir) end)

  it("loads the app with its config and the env given, and finds its modules", function()
    local client = testing.app(dir, { env = { SHOP_SECRET = "s3cr3t-value" } })
    local res = client:get("/config")
    assert.equal(200, res.status)
    assert.same({ greeting = "hi", secret_len = 12 }, res.json)
    assert.equal("s3cr3t-value", client.config.app.secret)
    res = client:get("/echo/ping", { headers = { ["X-From"] = "spec" } })
    assert.equal("ping spec", res.body)
    assert.equal("ping", res.headers["x-echo"])
  end)

  it("takes a config instead of config.lua", function()
    local client = testing.app(dir, { config = { app = { greeting = "yo", secret = env("MY_SECRET") } },
                                      env = { MY_SECRET = "x" } })
    assert.same({ greeting = "yo", secret_len = 1 }, client:get("/config").json)
  end)

  it("raises with the config's error when it does not validate", function()
    local ok, err = pcall(testing.app, dir, { config = { workers = "many" } })
    assert.is_false(ok)
    assert.matches("wxd.testing.app: .*config.workers", err)
    -- env() with nothing set: config.lua itself fails, naming the file.
    ok, err = pcall(testing.app, dir, { env = {} })
    if os.getenv("SHOP_SECRET") == nil then
      assert.is_false(ok)
      assert.matches("config.lua", err, 1, true)
      assert.matches("SHOP_SECRET", err, 1, true)
    end
  end)

  it("sends JSON, forms and query arrays, and decodes JSON answers", function()
    local client = testing.app(dir, { env = { SHOP_SECRET = "x" } })
    local res = client:post("/orders", { json = { sku = "A1", qty = 2 } })
    assert.equal(201, res.status)
    assert.same({ sku = "A1", qty = 2 }, res.json)
    assert.matches("application/json", res.headers["content-type"], 1, true)
    res = client:post("/form", { form = { name = "Ann & Bo", note = "a=b" } })
    assert.equal("Ann & Bo:a=b", res.body)
    res = client:get("/tags?one=1", { query = { tag = { "x", "y z" } } })
    assert.equal("x,y z|1", res.body)
    assert.equal(404, client:get("/nope").status)
    assert.equal(405, client:delete("/orders").status)
    assert.is_nil(client:get("/echo/a").json)
  end)

  it("runs handlers that wait", function()
    local client = testing.app(dir, { env = { SHOP_SECRET = "x" } })
    assert.equal("late", client:get("/slow").body)
  end)

  it("sends WeChat messages through a client", function()
    local wdir = H.tmpdir()
    H.write_file(wdir .. "/app.lua", [[
local wxd = require "wxd"
local app = require("wxd.app").new()
app:mp("/wx", { token = wxd.config.mp.token }, {
  text = function(msg, ctx) return ctx.reply.text("echo: " .. msg.Content) end,
})
return app
]])
    H.write_file(wdir .. "/config.lua", 'return { mp = { token = env("MP_TOKEN") } }\n')
    local client = testing.app(wdir, { env = { MP_TOKEN = "t0ken" } })
    local wx = testing.wechat({ token = "t0ken" })
    local reply, status, body = wx:send(client, { MsgType = "text", Content = "hi" })
    os.execute("rm -rf " .. wdir)
    assert.equal(200, status, body)
    assert.equal("echo: hi", reply.Content)
  end)
end)
