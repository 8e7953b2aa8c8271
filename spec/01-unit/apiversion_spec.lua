-- Unit specs for version routing: route groups selected by host, header or
-- a function (wxd.app), and wxd.apiversion on top of them.
local wxd_app = require("wxd.app")
local apiversion = require("wxd.apiversion")
local cjson = require("cjson")

local function call(app, method, path, headers)
  local status, hdrs, body = app:handle({
    method = method, path = path, query = "", version = "1.1", headers = headers or {},
    body = "", remote_addr = "127.0.0.1", remote_port = 1, id = "req-1",
  })
  local h = {}
  for k, v in pairs(hdrs or {}) do h[k:lower()] = v end
  local ok, json = pcall(cjson.decode, body or "")
  return { status = status, headers = h, body = body, json = ok and json or nil }
end

describe("route groups selected by host or header", function()
  local function two_hosts()
    local app = wxd_app.new()
    app:get("/orders", function() return "app" end)
    app:group({ host = "v2.example.com" }, function(g)
      g:get("/orders", function() return "v2" end)
      g:on_error(404, function() return 404, { code = 4004 } end)
    end)
    app:group({ host = { "v3.example.com", "api.example.com" } }, function(g)
      g:get("/orders", function() return "v3" end)
      g:post("/orders/:id", function(req) return "v3 " .. req.params.id end)
      g:on_error(404, function(_, res)
        res.headers["content-type"] = "application/problem+json"
        return 404, { type = "about:blank", title = "Not Found", status = 404 }
      end)
    end)
    return app
  end

  it("routes the same path to the group of the Host (port and case ignored)", function()
    local app = two_hosts()
    assert.equal("v2", call(app, "GET", "/orders", { host = "v2.example.com" }).body)
    assert.equal("v3", call(app, "GET", "/orders", { host = "V3.Example.com:8443" }).body)
    assert.equal("v3", call(app, "GET", "/orders", { host = "api.example.com" }).body)
    assert.equal("app", call(app, "GET", "/orders", { host = "other.example.com" }).body)
    assert.equal("app", call(app, "GET", "/orders").body)
  end)

  it("gives each group its own 404 and 405 (Allow from its own routes)", function()
    local app = two_hosts()
    assert.same({ code = 4004 }, call(app, "GET", "/nope", { host = "v2.example.com" }).json)
    local r = call(app, "GET", "/nope", { host = "v3.example.com" })
    assert.equal(404, r.status)
    assert.equal("application/problem+json", r.headers["content-type"])
    assert.equal("Not Found", r.json.title)
    -- /orders/1 exists for POST in v3 only
    r = call(app, "GET", "/orders/1", { host = "v3.example.com" })
    assert.equal(405, r.status)
    assert.equal("POST", r.headers.allow)
    assert.equal(404, call(app, "GET", "/orders/1", { host = "v2.example.com" }).status)
    assert.equal(404, call(app, "GET", "/orders/1").status)
  end)

  it("selects by a header value or function, with the group's own middleware", function()
    local app = wxd_app.new()
    local seen = {}
    app:group("/api", { header = { "X-Gen", "new" } }, function(g)
      g:before(function() seen[#seen + 1] = "new-mw" end)
      g:get("/x", function() return "new" end)
    end)
    app:group("/api", { header = { "x-gen", function(v) return v and v:match("^old") end } }, function(g)
      g:before(function() seen[#seen + 1] = "old-mw" end)
      g:get("/x", function() return "old" end)
    end)
    app:group({ select = function(req) return req.headers["x-beta"] == "1" end }, function(g)
      g:get("/api/x", function() return "beta" end)
    end)
    app:group("/api", function(g) g:get("/x", function() return "plain" end) end)
    assert.equal("new", call(app, "GET", "/api/x", { ["x-gen"] = "new" }).body)
    assert.equal("old", call(app, "GET", "/api/x", { ["x-gen"] = "old-2" }).body)
    assert.equal("beta", call(app, "GET", "/api/x", { ["x-beta"] = "1" }).body)
    assert.equal("plain", call(app, "GET", "/api/x", { ["x-gen"] = "other" }).body)
    assert.same({ "new-mw", "old-mw" }, seen)
    -- the prefix bounds the selector: outside /api the header selects nothing
    assert.equal(404, call(app, "GET", "/x", { ["x-gen"] = "new" }).status)
  end)

  it("nests plain groups inside a selected one, in its router", function()
    local app = wxd_app.new()
    app:group({ host = "a.test" }, function(g)
      g:group("/admin", function(admin)
        admin:before(function(req) if not req.headers.authorization then return 401, "no" end end)
        admin:get("/stats", function() return "stats" end)
      end)
    end)
    assert.equal(401, call(app, "GET", "/admin/stats", { host = "a.test" }).status)
    assert.equal(401, call(app, "GET", "/admin/other", { host = "a.test" }).status)
    assert.equal("stats", call(app, "GET", "/admin/stats", { host = "a.test", authorization = "x" }).body)
    assert.equal(404, call(app, "GET", "/admin/stats").status)
    assert.is_nil(app:match("GET", "/admin/stats"))
  end)

  it("refuses bad selectors and per-route body limits in selected groups", function()
    local app = wxd_app.new()
    assert.has_error(function() app:group({ hots = "x" }) end)
    assert.has_error(function() app:group({}) end)
    assert.has_error(function() app:group({ header = { "x" } }) end)
    local g = app:group({ host = "a.test" })
    assert.has_error(function() g:post("/up", { max_body = "1m" }, function() end) end)
  end)
end)

describe("wxd.apiversion", function()
  local function gens(opts)
    local app = wxd_app.new()
    opts.versions = {
      v2 = function(g)
        g:get("/orders/:id", function(req) return { data = { id = req.params.id }, gen = req.ctx.api_version } end)
      end,
      v3 = function(g)
        g:get("/orders/:id", function(req) return { id = req.params.id, gen = req.ctx.api_version } end)
      end,
    }
    apiversion.mount(app, opts)
    return app
  end

  it("parses the version a request names", function()
    local opts = { path = "/api", vendor = "shop", header = "X-API-Version" }
    local lower = { __index = function(t, k) return rawget(t, k:lower()) end }
    local function req(path, h) return { path = path, headers = setmetatable(h or {}, lower) } end
    assert.same({ "v3", "path" }, { apiversion.requested(req("/api/v3/x"), opts) })
    local accept = "text/html, application/vnd.Shop.v3+json; q=1"
    assert.same({ "v3", "accept" }, { apiversion.requested(req("/x", { accept = accept }), opts) })
    assert.same({ "v2", "header" }, { apiversion.requested(req("/x", { ["x-api-version"] = "2" }), opts) })
    assert.same({ "beta", "header" }, { apiversion.requested(req("/x", { ["x-api-version"] = "beta" }), opts) })
    assert.same({}, { apiversion.requested(req("/x", { accept = "application/json" }), opts) })
  end)

  it("sends the same path to each generation by Accept or header, default for none", function()
    local app = gens({ vendor = "shop", header = "X-API-Version", default = "v2", prefix = "/api" })
    local r = call(app, "GET", "/api/orders/7", { accept = "application/vnd.shop.v3+json" })
    assert.same({ id = "7", gen = "v3" }, r.json)
    r = call(app, "GET", "/api/orders/7", { ["x-api-version"] = "v2" })
    assert.same({ data = { id = "7" }, gen = "v2" }, r.json)
    assert.same({ data = { id = "7" }, gen = "v2" }, call(app, "GET", "/api/orders/7").json)
  end)

  it("answers a version nobody serves with a clear 4xx", function()
    local app = gens({ vendor = "shop", header = "X-API-Version", prefix = "/api" })
    local r = call(app, "GET", "/api/orders/7", { accept = "application/vnd.shop.v9+json" })
    assert.equal(406, r.status)
    assert.same({ error = "unknown api version", version = "v9", supported = { "v2", "v3" } }, r.json)
    r = call(app, "GET", "/api/orders/7", { ["x-api-version"] = "beta" })
    assert.equal(400, r.status)
    assert.equal("beta", r.json.version)
    -- no default: naming nothing reaches no generation
    assert.equal(404, call(app, "GET", "/api/orders/7").status)
  end)

  it("routes by path prefix, unknown path versions included", function()
    local app = gens({ path = "/api" })
    assert.same({ data = { id = "1" }, gen = "v2" }, call(app, "GET", "/api/v2/orders/1").json)
    assert.same({ id = "1", gen = "v3" }, call(app, "GET", "/api/v3/orders/1").json)
    local r = call(app, "GET", "/api/v4/orders/1")
    assert.equal(404, r.status)
    assert.equal("unknown api version", r.json.error)
    assert.equal(404, call(app, "GET", "/api/orders/1").status)
    assert.is_nil(call(app, "GET", "/api/orders/1").json.version)
  end)

  it("combines path versions with Accept and header versions on one prefix", function()
    local app = gens({ path = "/api", vendor = "shop", header = "X-API-Version", default = "v2" })
    assert.equal("v2", call(app, "GET", "/api/v2/orders/1").json.gen)
    assert.equal("v3", call(app, "GET", "/api/v3/orders/1").json.gen)
    -- the path wins over Accept
    assert.equal("v2", call(app, "GET", "/api/v2/orders/1", { accept = "application/vnd.shop.v3+json" }).json.gen)
    assert.equal("v3", call(app, "GET", "/api/orders/1", { accept = "application/vnd.shop.v3+json" }).json.gen)
    assert.equal("v3", call(app, "GET", "/api/orders/1", { ["x-api-version"] = "3" }).json.gen)
    assert.equal("v2", call(app, "GET", "/api/orders/1").json.gen)
    assert.equal(404, call(app, "GET", "/api/v7/orders/1").status)
    assert.equal(406, call(app, "GET", "/api/orders/1", { accept = "application/vnd.shop.v7+json" }).status)
  end)
end)
