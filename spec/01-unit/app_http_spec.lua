-- Unit specs for the HTTP layer of wxd.app beyond routing: route groups,
-- error handlers, cookies and query arrays (through app:handle).
local wxd_app = require("wxd.app")
local cookie = require("wxd.cookie")
local cjson = require("cjson")

local function raw(method, path, opts)
  opts = opts or {}
  return {
    method = method, path = path, query = opts.query or "", version = "1.1",
    headers = opts.headers or {}, body = opts.body or "", remote_addr = "127.0.0.1",
    remote_port = 1, id = opts.id or "req-1", tls = opts.tls,
  }
end

local function call(app, method, path, opts)
  local status, headers, body = app:handle(raw(method, path, opts))
  local h = {}
  for k, v in pairs(headers or {}) do h[k:lower()] = v end
  return { status = status, headers = h, body = body }
end

-- Set-Cookie values of a response, always as a list.
local function set_cookies(r)
  local v = r.headers["set-cookie"]
  if v == nil then return {} end
  if type(v) == "string" then return { v } end
  return v
end

describe("wxd.app route groups", function()
  it("prefixes routes and keeps params of prefix and pattern", function()
    local app = wxd_app.new()
    app:group("/api/v2", function(g)
      g:get("/orders/:id", function(req) return { id = req.params.id } end)
      g:get("", function() return "root" end)
      g:post("/", function() return "slash" end)
    end)
    local shops = app:group("/shops/:shop")
    shops:get("/items/:item", function(req) return req.params.shop .. "/" .. req.params.item end)
    assert.same({ id = "7" }, cjson.decode(call(app, "GET", "/api/v2/orders/7").body))
    assert.equal("root", call(app, "GET", "/api/v2").body)
    assert.equal("slash", call(app, "POST", "/api/v2/").body)
    assert.equal("s1/i2", call(app, "GET", "/shops/s1/items/i2").body)
    assert.equal(404, call(app, "GET", "/api/v3/orders/7").status)
    assert.equal("/api/v2/orders/:id", (app:match("GET", "/api/v2/orders/1")))
  end)

  it("runs a group's middleware for its routes only, app first, outer group first", function()
    local app = wxd_app.new()
    local trail
    app:before(function() trail[#trail + 1] = "app-before" end)
    app:after(function() trail[#trail + 1] = "app-after" end)
    app:get("/plain", function() trail[#trail + 1] = "plain" return "p" end)
    app:group("/api", function(api)
      api:before(function() trail[#trail + 1] = "api-before" end)
      api:after(function() trail[#trail + 1] = "api-after" end)
      api:get("/x", function() trail[#trail + 1] = "x" return "x" end)
      api:group("/admin", function(admin)
        admin:before(function() trail[#trail + 1] = "admin-before" end)
        admin:after(function() trail[#trail + 1] = "admin-after" end)
        admin:get("/y", function() trail[#trail + 1] = "y" return "y" end)
      end)
    end)
    trail = {}
    call(app, "GET", "/plain")
    assert.same({ "app-before", "plain", "app-after" }, trail)
    trail = {}
    call(app, "GET", "/api/x")
    assert.same({ "app-before", "api-before", "x", "api-after", "app-after" }, trail)
    trail = {}
    call(app, "GET", "/api/admin/y")
    assert.same({ "app-before", "api-before", "admin-before", "y", "admin-after", "api-after", "app-after" }, trail)
  end)

  it("a group's before may short-circuit; the app's middleware still wraps it", function()
    local app = wxd_app.new()
    local reached = false
    app:after(function(_, res) res.headers["X-App"] = "1" end)
    app:group("/secure", function(g)
      g:before(function(req) if not req:header("authorization") then return 401, { error = "unauthorized" } end end)
      g:get("/data", function() reached = true return "secret" end)
    end)
    app:get("/open", function() return "open" end)
    local r = call(app, "GET", "/secure/data")
    assert.equal(401, r.status)
    assert.equal("1", r.headers["x-app"])
    assert.is_false(reached)
    assert.equal("secret", call(app, "GET", "/secure/data", { headers = { authorization = "x" } }).body)
    assert.equal("open", call(app, "GET", "/open").body)
  end)

  it("a request under a group's prefix that no route matches gets the group's middleware", function()
    local app = wxd_app.new()
    app:group("/v3", function(g)
      g:before(function(req) if not req:header("authorization") then return 401, "token needed" end end)
      g:get("/a", function() return "a" end)
    end)
    assert.equal(401, call(app, "GET", "/v3/nothing").status)
    assert.equal(404, call(app, "GET", "/v3/nothing", { headers = { authorization = "t" } }).status)
    assert.equal(404, call(app, "GET", "/v3x").status) -- not under the prefix
  end)

  it("refuses bad prefixes and patterns, at the caller's line", function()
    local app = wxd_app.new()
    for _, p in ipairs({ "api", "/", "/api/", "//api", "/a//b", "/a/*", "/a/:", "/a/:1x", 7 }) do
      local ok, err = pcall(function() app:group(p) end)
      assert.is_false(ok, tostring(p))
      assert.truthy(tostring(err):find("app_http_spec.lua", 1, true), err)
    end
    local g = app:group("/api")
    local ok, err = pcall(function() g:get("x", function() end) end)
    assert.is_false(ok)
    assert.truthy(err:find("app_http_spec.lua:%d+: wxd.app: route \"x\": pattern must start with '/'"), err)
    g:get("/dup", function() end)
    assert.has_error(function() app:get("/api/dup", function() end) end)
  end)

  it("a group can mount a WeChat callback", function()
    local app = wxd_app.new()
    app:group("/wx", function(g) g:mp("/oa", { token = "t" }, {}) end)
    assert.equal("/wx/oa", (app:match("GET", "/wx/oa")))
  end)
end)

describe("wxd.app error handlers", function()
  it("404 and 405 handlers of the app get the default response to change", function()
    local app = wxd_app.new()
    app:get("/only-get", function() return "x" end)
    app:on_error(404, function(req, res)
      assert.equal(404, res.status)
      return 404, { error = "no such page", path = req.path }
    end)
    app:on_error(405, function(_, res)
      assert.equal("GET, HEAD", res.headers["Allow"])
      res.body = "use GET"
      res.headers["content-type"] = "text/plain"
    end)
    local r = call(app, "GET", "/missing")
    assert.equal(404, r.status)
    assert.same({ error = "no such page", path = "/missing" }, cjson.decode(r.body))
    r = call(app, "POST", "/only-get")
    assert.equal(405, r.status)
    assert.equal("use GET", r.body)
    assert.equal("GET, HEAD", r.headers["allow"])
    assert.equal("text/plain", r.headers["content-type"])
  end)

  it("a group's handlers win for its paths, the app's elsewhere, parents' as fallback", function()
    local app = wxd_app.new()
    app:on_error(404, function() return 404, "app 404" end)
    app:group("/v2", function(v2)
      v2:on_error(404, function() return 200, { code = 4004 } end)
      v2:get("/a", function() return "a" end)
      v2:group("/inner", function(inner) inner:get("/b", function() return "b" end) end)
    end)
    app:group("/v3", function(v3)
      v3:on_error(405, function(_, res) res.headers["content-type"] = "application/problem+json" end)
      v3:get("/c", function() return "c" end)
    end)
    assert.equal("app 404", call(app, "GET", "/nope").body)
    assert.same({ code = 4004 }, cjson.decode(call(app, "GET", "/v2/nope").body))
    assert.same({ code = 4004 }, cjson.decode(call(app, "GET", "/v2/inner/nope").body))
    assert.equal("app 404", call(app, "GET", "/v3/nope").body)
    local r = call(app, "DELETE", "/v3/c")
    assert.equal(405, r.status)
    assert.equal("application/problem+json", r.headers["content-type"])
    assert.equal("application/json", call(app, "DELETE", "/v2/a").headers["content-type"])
  end)

  it("a 500 handler gets the error, a fresh response and no traceback in the body by default", function()
    local app = wxd_app.new()
    local seen
    app:on_error(500, function(req, res, err)
      seen = err
      assert.equal(500, res.status)
      assert.is_nil(res.headers["x-partial"])
      return 503, { error = "try again", id = req.id }
    end)
    app:get("/boom", function(_, res)
      res.headers["X-Partial"] = "1"
      error("out of coffee")
    end)
    app:get("/table-error", function() error({ code = 42 }) end)
    local r = call(app, "GET", "/boom", { id = "abc" })
    assert.equal(503, r.status)
    assert.same({ error = "try again", id = "abc" }, cjson.decode(r.body))
    assert.is_nil(r.headers["x-partial"])
    assert.truthy(seen:find("out of coffee", 1, true))
    call(app, "GET", "/table-error")
    assert.same({ code = 42 }, seen)
  end)

  it("a 500 handler that returns nothing sends the generic text, without the error", function()
    local app = wxd_app.new()
    app:on_error(500, function() end)
    app:get("/boom", function() error("secret detail /etc/passwd") end)
    local r = call(app, "GET", "/boom", { id = "rid" })
    assert.equal(500, r.status)
    assert.equal("internal server error (request id rid)\n", r.body)
    assert.equal("text/plain; charset=utf-8", r.headers["content-type"])
  end)

  it("catches errors of middleware, and only in the groups that have a handler", function()
    local app = wxd_app.new()
    app:group("/v3", function(v3)
      v3:on_error(500, function() return 500, { type = "about:blank", status = 500 } end)
      v3:before(function(req) if req.query.fail then error("middleware failed") end end)
      v3:get("/x", function() return "x" end)
    end)
    app:get("/y", function() error("plain") end)
    assert.same({ type = "about:blank", status = 500 }, cjson.decode(call(app, "GET", "/v3/x", { query = "fail=1" }).body))
    assert.equal("x", call(app, "GET", "/v3/x").body)
    -- No handler for /y: the error reaches the core as before.
    assert.has_error(function() call(app, "GET", "/y") end)
  end)

  it("an error in the 500 handler itself propagates to the core", function()
    local app = wxd_app.new()
    app:on_error(500, function() error("handler broke too") end)
    app:get("/boom", function() error("first") end)
    local ok, err = pcall(call, app, "GET", "/boom")
    assert.is_false(ok)
    assert.truthy(tostring(err):find("handler broke too", 1, true))
  end)

  it("refuses other statuses and non-functions", function()
    local app = wxd_app.new()
    assert.has_error(function() app:on_error(403, function() end) end)
    assert.has_error(function() app:on_error(404, "x") end)
  end)
end)

describe("wxd.cookie and req.cookies", function()
  it("parses leniently: spaces, quotes, no '=', empty names, first of a repeated name", function()
    assert.same({}, cookie.parse(nil))
    assert.same({}, cookie.parse(""))
    assert.same({ a = "1", b = "two words", c = "", d = "q" },
      cookie.parse(' a=1 ;b=two words;  c= ;d="q"; ;=skip;novalue;a=2'))
    assert.same({ x = "=y=" }, cookie.parse("x==y="))
    assert.same({ e = '"' }, cookie.parse('e="'))
  end)

  it("stops after MAX_COOKIES pairs", function()
    local parts = {}
    for i = 1, cookie.MAX_COOKIES + 50 do parts[i] = "c" .. i .. "=v" end
    local n = 0
    for _ in pairs(cookie.parse(table.concat(parts, "; "))) do n = n + 1 end
    assert.equal(cookie.MAX_COOKIES, n)
  end)

  it("req.cookies is parsed lazily from the Cookie header", function()
    local app = wxd_app.new()
    app:get("/c", function(req)
      assert.is_nil(rawget(req, "cookies"))
      return { sid = req.cookies.sid, same = req.cookies == req.cookies }
    end)
    local r = call(app, "GET", "/c", { headers = { cookie = "theme=dark; sid=abc123" } })
    assert.same({ sid = "abc123", same = true }, cjson.decode(r.body))
    assert.same({ same = true }, cjson.decode(call(app, "GET", "/c").body))
  end)

  it("serializes with safe defaults and every attribute", function()
    assert.equal("sid=abc; Path=/; HttpOnly; SameSite=Lax", cookie.serialize("sid", "abc"))
    assert.equal("sid=abc; Path=/; Secure; HttpOnly; SameSite=Lax", cookie.serialize("sid", "abc", nil, true))
    assert.equal("a=1; Path=/shop; Domain=example.com; Max-Age=3600; Expires=Thu, 01 Jan 1970 00:00:00 GMT; "
      .. "Secure; SameSite=Strict",
      cookie.serialize("a", 1, { path = "/shop", domain = "example.com", max_age = 3600, expires = 0,
        secure = true, http_only = false, same_site = "strict" }))
    assert.equal("a=; Path=/; Secure; HttpOnly; SameSite=None; Partitioned",
      cookie.serialize("a", "", { same_site = "None", secure = true, partitioned = true }))
    assert.equal("a=b; HttpOnly", cookie.serialize("a", "b", { path = false, same_site = false }))
    assert.equal("a=b; Path=/; Expires=Wed, 21 Oct 2015 07:28:00 GMT; HttpOnly; SameSite=Lax",
      cookie.serialize("a", "b", { expires = "Wed, 21 Oct 2015 07:28:00 GMT" }))
    assert.equal("a=b; Path=/; HttpOnly; SameSite=Lax",
      cookie.serialize("a", "b", { secure = false }, true))
  end)

  it("refuses names and values that would break the header, and bad options", function()
    local bad = {
      { "a b", "v" }, { "a;b", "v" }, { "", "v" }, { "a\r\nX: y", "v" }, { "a=b", "v" }, { 1, "v" },
      { "a", "v;Path=/x" }, { "a", "v\r\nSet-Cookie: evil=1" }, { "a", "v\n" }, { "a", "two words" },
      { "a", '"q"' }, { "a", "x,y" }, { "a", "back\\slash" }, { "a", "\0" }, { "a", "é" }, { "a", {} },
      { "a", "v", { path = "/x;Domain=evil" } }, { "a", "v", { domain = "a\r\nb" } }, { "a", "v", { path = "" } },
      { "a", "v", { max_age = 1.5 } }, { "a", "v", { max_age = "1" } }, { "a", "v", { same_site = "lol" } },
      { "a", "v", { same_site = "None" } }, { "a", "v", { partitioned = true } }, { "a", "v", { maxage = 1 } },
      { "a", "v", "opts" }, { "a", "v", { expires = "x;y" } },
    }
    for _, case in ipairs(bad) do
      local ok = pcall(cookie.serialize, case[1], case[2], case[3])
      assert.is_false(ok, cjson.encode({ tostring(case[1]), tostring(case[2]) }))
    end
  end)

  it("res:set_cookie adds one Set-Cookie per cookie; Secure by default over TLS", function()
    local app = wxd_app.new()
    app:get("/login", function(_, res)
      res:set_cookie("sid", "s1", { max_age = 60 })
      res:set_cookie("theme", "dark", { http_only = false })
      res:clear_cookie("old", { path = "/x" })
      return "ok"
    end)
    local r = call(app, "GET", "/login")
    assert.same({
      "sid=s1; Path=/; Max-Age=60; HttpOnly; SameSite=Lax",
      "theme=dark; Path=/; SameSite=Lax",
      "old=; Path=/x; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; HttpOnly; SameSite=Lax",
    }, set_cookies(r))
    r = call(app, "GET", "/login", { tls = { version = "TLSv1.3" } })
    assert.equal("sid=s1; Path=/; Max-Age=60; Secure; HttpOnly; SameSite=Lax", set_cookies(r)[1])
  end)

  it("res:set_cookie raises at the caller's line", function()
    local app = wxd_app.new()
    app:get("/bad", function(_, res) res:set_cookie("sid", "a;b") end)
    local ok, err = pcall(call, app, "GET", "/bad")
    assert.is_false(ok)
    assert.truthy(err:find("app_http_spec.lua:%d+: wxd.cookie: cookie sid: value"), err)
  end)
end)

describe("query arrays", function()
  it("a[] and repeated keys are one list in query_all; req.query keeps names as sent", function()
    local app = wxd_app.new()
    app:get("/q", function(req)
      return { a = req:query_all("a"), a2 = req:query_all("a[]"), b = req:query_all("b"),
               raw = req.query["a[]"], last = req.query.a, none = req:query_all("zz") }
    end)
    local r = cjson.decode(call(app, "GET", "/q", { query = "a[]=1&a=2&a%5B%5D=3&b=x&b=y&[]=e" }).body)
    assert.same({ "1", "2", "3" }, r.a)
    assert.same({ "1", "2", "3" }, r.a2)
    assert.same({ "x", "y" }, r.b)
    assert.equal("3", r.raw)
    assert.equal("2", r.last)
    assert.same({}, r.none)
    assert.same({ ["[]"] = { "e" }, a = { "1" } }, wxd_app.parse_query("[]=e&a[]=1", true))
    assert.same({ ["a[]"] = "1" }, wxd_app.parse_query("a[]=1"))
  end)
end)

describe("CORS", function()
  local function app_with(opts)
    local app = wxd_app.new()
    local reached = 0
    app:cors(opts)
    app:get("/data", function() reached = reached + 1 return { ok = true } end)
    app:route({ "PUT", "OPTIONS" }, "/both", function() reached = reached + 1 return "handler" end)
    return app, function() return reached end
  end
  local function preflight(app, origin, method, extra)
    local h = { origin = origin, ["access-control-request-method"] = method or "PUT" }
    for k, v in pairs(extra or {}) do h[k] = v end
    return call(app, "OPTIONS", "/data", { headers = h })
  end

  it("answers a preflight from an allowed origin with 204, never reaching a handler", function()
    local app, reached = app_with({ origins = { "https://shop.example.com" }, credentials = true, max_age = 300 })
    local r = preflight(app, "https://shop.example.com", "PUT", { ["access-control-request-headers"] = "content-type" })
    assert.equal(204, r.status)
    assert.equal("https://shop.example.com", r.headers["access-control-allow-origin"])
    assert.equal("true", r.headers["access-control-allow-credentials"])
    assert.equal("GET, HEAD, POST, PUT, PATCH, DELETE", r.headers["access-control-allow-methods"])
    assert.equal("Content-Type, Authorization, X-Requested-With", r.headers["access-control-allow-headers"])
    assert.equal("300", r.headers["access-control-max-age"])
    assert.equal("Origin", r.headers["vary"])
    assert.is_nil(r.body)
    -- Also where a route takes OPTIONS itself.
    r = call(app, "OPTIONS", "/both", { headers = { origin = "https://shop.example.com",
      ["access-control-request-method"] = "PUT" } })
    assert.equal(204, r.status)
    assert.equal(0, reached())
    -- A plain OPTIONS (no Access-Control-Request-Method) is not a preflight.
    assert.equal("handler", call(app, "OPTIONS", "/both", { headers = { origin = "https://shop.example.com" } }).body)
  end)

  it("refuses a preflight from another origin with 403 and no allow headers", function()
    local app, reached = app_with({ origins = { "https://shop.example.com" } })
    local r = preflight(app, "https://evil.example.com")
    assert.equal(403, r.status)
    assert.is_nil(r.headers["access-control-allow-origin"])
    assert.equal("Origin", r.headers["vary"])
    assert.equal(0, reached())
  end)

  it("marks actual responses for allowed origins only, always with Vary: Origin", function()
    local app, reached = app_with({ origins = { "https://A.example.com" }, expose = { "X-Request-Id" } })
    local r = call(app, "GET", "/data", { headers = { origin = "https://a.example.com" } })
    assert.equal(200, r.status)
    assert.equal("https://a.example.com", r.headers["access-control-allow-origin"])
    assert.equal("X-Request-Id", r.headers["access-control-expose-headers"])
    assert.is_nil(r.headers["access-control-allow-credentials"])
    assert.equal("Origin", r.headers["vary"])
    r = call(app, "GET", "/data", { headers = { origin = "https://b.example.com" } })
    assert.equal(200, r.status)
    assert.is_nil(r.headers["access-control-allow-origin"])
    assert.equal("Origin", r.headers["vary"])
    r = call(app, "GET", "/data")
    assert.is_nil(r.headers["access-control-allow-origin"])
    assert.equal("Origin", r.headers["vary"])
    assert.equal(3, reached())
  end)

  it("takes '*', a function, reflected headers and custom methods; keeps an existing Vary", function()
    local app = app_with({ origins = "*", methods = { "get", "post" }, headers = true })
    local r = preflight(app, "https://any.example", "POST", { ["access-control-request-headers"] = "x-a, x-b" })
    assert.equal("*", r.headers["access-control-allow-origin"])
    assert.equal("GET, POST", r.headers["access-control-allow-methods"])
    assert.equal("x-a, x-b", r.headers["access-control-allow-headers"])
    assert.equal("Access-Control-Request-Headers", r.headers["vary"])
    local fapp = wxd_app.new()
    fapp:before(function(_, res) res.headers["Vary"] = "Accept-Encoding" end)
    fapp:cors({ origins = function(origin) return origin:find("%.example%.org$") ~= nil end })
    fapp:get("/x", function() return "x" end)
    r = call(fapp, "GET", "/x", { headers = { origin = "https://sub.example.org" } })
    assert.equal("https://sub.example.org", r.headers["access-control-allow-origin"])
    assert.equal("Accept-Encoding, Origin", r.headers["vary"])
    assert.is_nil(call(fapp, "GET", "/x", { headers = { origin = "https://example.com" } })
      .headers["access-control-allow-origin"])
  end)

  it("applies to a group's routes only when set on the group", function()
    local app = wxd_app.new()
    app:group("/api", function(api)
      api:cors({ origins = { "https://a.example" } })
      api:get("/x", function() return "x" end)
    end)
    app:get("/y", function() return "y" end)
    local h = { origin = "https://a.example", ["access-control-request-method"] = "GET" }
    assert.equal(204, call(app, "OPTIONS", "/api/x", { headers = h }).status)
    assert.equal(204, call(app, "OPTIONS", "/api/unrouted", { headers = h }).status)
    assert.equal(405, call(app, "OPTIONS", "/y", { headers = h }).status)
  end)

  it("refuses bad options at the caller's line", function()
    local app = wxd_app.new()
    for _, opts in ipairs({ {}, { origins = "*", credentials = true }, { origins = { "shop.example.com" } },
        { origins = { "https://a.example/path" } }, { origins = "*", methods = { "GET POST" } },
        { origins = "*", max_age = -1 }, { origins = "*", colour = 1 }, "x" }) do
      local ok, err = pcall(function() app:cors(opts) end)
      assert.is_false(ok)
      assert.truthy(err:find("app_http_spec.lua:%d+: wxd.cors: "), err)
    end
    local ok, err = pcall(function() require("wxd.cors").middleware({ origins = 1 }) end)
    assert.is_false(ok)
    assert.truthy(err:find("app_http_spec.lua:%d+: wxd.cors: "), err)
  end)
end)

describe("per-route body limits", function()
  it("takes { max_body } before the handler, reports it to the core, and checks hand-built requests", function()
    local app = wxd_app.new()
    assert.is_nil(app._body_limits)
    app:post("/small", { max_body = 10 }, function(req) return #req.body .. "" end)
    app:group("/g", function(g) g:put("/:id", { max_body = "2k" }, function() return "ok" end) end)
    app:post("/plain", function() return "plain" end)
    assert.is_true(app._body_limits)
    assert.equal(10, app:body_limit("POST", "/small"))
    assert.equal(2048, app:body_limit("PUT", "/g/1"))
    assert.is_nil(app:body_limit("POST", "/plain"))
    assert.is_nil(app:body_limit("GET", "/small"))
    assert.equal("10", call(app, "POST", "/small", { body = string.rep("x", 10) }).body)
    local r = call(app, "POST", "/small", { body = string.rep("x", 11) })
    assert.equal(413, r.status)
    assert.equal("request body too large\n", r.body)
  end)

  it("refuses bad route options at the caller's line", function()
    local app = wxd_app.new()
    for _, opts in ipairs({ { max_body = "lots" }, { max_body = -1 }, { max_bdy = 1 } }) do
      local ok, err = pcall(function() app:post("/x", opts, function() end) end)
      assert.is_false(ok)
      assert.truthy(err:find("app_http_spec.lua:%d+: wxd.app: route \"/x\": "), err)
    end
  end)
end)
