-- examples/api-versions over real sockets: two wxd processes on one Redis
-- serve both generations of one resource; a v2 and a v3 request to the same
-- order get their own formats; a v2 session made on one process is used on
-- the other; CSRF, missing credentials and unknown versions are refused.
local H = require "helpers"
local json = require "cjson"

local APP = H.ROOT .. "/examples/api-versions"
local ACCEPT_V3 = "application/vnd.shop.v3+json"

describe("examples/api-versions", function()
  local a, b
  setup(function()
    local env = "SESSION_SECRET=" .. ("s"):rep(40) .. " JWT_SECRET=" .. ("j"):rep(40)
      .. " WXD_REDIS_URL=" .. H.redis_url()
    a = H.start(APP, { env = env })
    b = H.start(APP, { env = env })
  end)
  teardown(function()
    for _, s in ipairs({ a, b }) do if s then s:stop(); s:cleanup() end end
  end)

  local form = { ["Content-Type"] = "application/x-www-form-urlencoded" }
  local function with(h, more)
    local t = {}
    for k, v in pairs(h or {}) do t[k] = v end
    for k, v in pairs(more or {}) do t[k] = v end
    return t
  end

  local function v2_login(srv)
    local r = srv:request("POST", "/api/v2/login", form, "user=demo&password=demo")
    assert.equal(200, r.status, r.body)
    local sc = r.headers["set-cookie"]
    sc = type(sc) == "table" and sc[1] or sc
    return sc:match("^(sid=[^;]+)"), json.decode(r.body).data.csrf_token, sc
  end

  local function v3_token(srv, scope)
    local r = srv:request("POST", "/api/token", with(form, { Accept = ACCEPT_V3 }),
      "grant_type=password&username=demo&password=demo&scope=" .. (scope or "orders:read"))
    assert.equal(200, r.status, r.body)
    return json.decode(r.body).access_token
  end

  it("gives a v2 and a v3 request to the same order their own formats", function()
    local cookie = v2_login(a)
    local r2 = b:get("/api/v2/orders/3", { Cookie = cookie })
    assert.equal(200, r2.status, r2.body)
    assert.same({ code = 0, message = "ok", data = { id = 3, item = "noodles", amount = 300 } }, json.decode(r2.body))
    local token = v3_token(a)
    local r3 = b:get("/api/orders/3", { Accept = ACCEPT_V3, Authorization = "Bearer " .. token })
    assert.equal(200, r3.status, r3.body)
    assert.same({ id = 3, item = "noodles", amount = 300 }, json.decode(r3.body))
    -- the same through the header and the v3 path
    assert.equal(r3.body, b:get("/api/orders/3", { ["X-API-Version"] = "3", Authorization = "Bearer " .. token }).body)
    assert.equal(r3.body, b:get("/api/v3/orders/3", { Authorization = "Bearer " .. token }).body)
    -- errors: an envelope code for v2, problem details for v3
    r2 = a:get("/api/v2/orders/999", { Cookie = cookie })
    assert.equal(404, r2.status)
    assert.equal(4041, json.decode(r2.body).code)
    r3 = a:get("/api/orders/999", { Accept = ACCEPT_V3, Authorization = "Bearer " .. token })
    assert.equal(404, r3.status)
    assert.equal("application/problem+json", r3.headers["content-type"])
    assert.same({ type = "about:blank", title = "Not Found", status = 404, detail = "no order 999" }, json.decode(r3.body))
  end)

  it("paginates v2 in the envelope and v3 with Link headers", function()
    local cookie = v2_login(a)
    local body = json.decode(a:get("/api/v2/orders?page=2&per_page=10", { Cookie = cookie }).body)
    assert.same({ 2, 10, 25, 11 }, { body.data.page, body.data.per_page, body.data.total, body.data.items[1].id })
    local r = a:get("/api/orders?page=2&per_page=10", { Accept = ACCEPT_V3, Authorization = "Bearer " .. v3_token(a) })
    assert.equal(200, r.status)
    assert.equal(10, #json.decode(r.body))
    assert.equal('</api/orders?page=1&per_page=10>; rel="first", </api/orders?page=1&per_page=10>; rel="prev", '
      .. '</api/orders?page=3&per_page=10>; rel="next", </api/orders?page=3&per_page=10>; rel="last"', r.headers.link)
  end)

  it("shares v2 sessions across processes on one Redis, and logout on one ends them on the other", function()
    local cookie, csrf, line = v2_login(b)
    assert.truthy(line:find("HttpOnly", 1, true))
    assert.truthy(line:find("SameSite=Lax", 1, true))
    assert.equal(200, a:get("/api/v2/orders/1", { Cookie = cookie }).status)
    -- CSRF over the wire: a write without the token is refused on either process
    local r = a:request("POST", "/api/v2/orders", with(form, { Cookie = cookie }), "item=tea&amount=5")
    assert.equal(403, r.status)
    assert.equal(4031, json.decode(r.body).code)
    r = a:request("POST", "/api/v2/orders", with(form, { Cookie = cookie, ["X-CSRF-Token"] = csrf }), "item=tea&amount=5")
    assert.equal(200, r.status, r.body)
    assert.equal(0, json.decode(r.body).code)
    r = b:request("POST", "/api/v2/logout", { Cookie = cookie, ["X-CSRF-Token"] = csrf })
    assert.equal(200, r.status, r.body)
    r = a:get("/api/v2/orders/1", { Cookie = cookie })
    assert.equal(401, r.status)
    assert.equal(4011, json.decode(r.body).code)
  end)

  it("refuses missing credentials, scopes and unknown versions in each generation's format", function()
    local r = a:get("/api/v2/orders/1")
    assert.equal(401, r.status)
    assert.equal(4011, json.decode(r.body).code)
    r = a:get("/api/v2/orders/1", { Cookie = "sid=forged.c2lnbmF0dXJl" })
    assert.equal(401, r.status)
    r = a:get("/api/orders/1", { Accept = ACCEPT_V3 })
    assert.equal(401, r.status)
    assert.equal('Bearer realm="shop"', r.headers["www-authenticate"])
    assert.equal("application/problem+json", r.headers["content-type"])
    r = a:request("POST", "/api/orders", { Accept = ACCEPT_V3, Authorization = "Bearer " .. v3_token(a),
                                           ["Content-Type"] = "application/json" }, '{"item":"tea","amount":1}')
    assert.equal(403, r.status)
    assert.equal('Bearer realm="shop", error="insufficient_scope", scope="orders:write"', r.headers["www-authenticate"])
    r = a:request("POST", "/api/orders", { Accept = ACCEPT_V3, Authorization = "Bearer " .. v3_token(a, "orders:write"),
                                           ["Content-Type"] = "application/json" }, '{"item":"tea","amount":1}')
    assert.equal(201, r.status, r.body)
    r = a:get("/api/orders/1", { Accept = "application/vnd.shop.v9+json" })
    assert.equal(406, r.status)
    assert.same({ error = "unknown api version", version = "v9", supported = { "v2", "v3" } }, json.decode(r.body))
    assert.equal(404, a:get("/api/v9/orders/1").status)
    assert.equal(400, a:get("/api/orders/1", { ["X-API-Version"] = "beta" }).status)
  end)
end)
