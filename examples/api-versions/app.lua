-- examples/api-versions: one resource (orders), two API generations.
--
-- v2, the old one (/api/v2/...): a session cookie from POST /api/v2/login,
-- a CSRF token for writes, every answer an envelope
-- { code, message, data } with integer error codes (4011: no session).
-- v3, the new one (/api/... with `Accept: application/vnd.shop.v3+json`
-- or `X-API-Version: 3`, or /api/v3/...): an OAuth2 bearer JWT from
-- POST .../token, scopes per route, standard statuses, RFC 9457 problem
-- details and RFC 8288 Link pagination. A version nobody serves: 4xx.
-- See docs/api-versions.md.
local apiversion = require "wxd.apiversion"
local jwt = require "wxd.jwt"
local respond = require "wxd.respond"
local session = require "wxd.session"
local app = require("wxd.app").new()

local envelope, problem = respond.envelope, respond.problem

local function required(name)
  local v = os.getenv(name)
  if not v or v == "" then error("examples/api-versions: set " .. name .. " (see config.lua)", 0) end
  return v
end

local sessions = session.new({
  secret = required("SESSION_SECRET"),
  ttl = 8 * 3600, idle = 30 * 60,
  on_csrf = function() return envelope.err(4031, "csrf token missing or wrong") end,
})

local signing_key = os.getenv("JWT_KEY_FILE")
  and jwt.key({ alg = "ES256", file = os.getenv("JWT_KEY_FILE"), kid = "apiv-1" })
  or jwt.key({ alg = "HS256", secret = required("JWT_SECRET") })
local ISSUER, AUDIENCE = "wxd-example", "shop"

-- The resource: 25 orders, and the ones created since start (per worker:
-- a real app keeps them in a database).
local orders = {}
for i = 1, 25 do
  orders[i] = { id = i, item = ({ "tea", "rice", "noodles", "dumplings", "buns" })[(i - 1) % 5 + 1], amount = i * 100 }
end

local function find(id)
  return orders[tonumber(id) or 0]
end

local function create(item, amount)
  local o = { id = #orders + 1, item = item, amount = amount }
  orders[o.id] = o
  return o
end

-- The demo's one user (a real app checks a password hash, or a WeChat code).
local function check_login(user, password)
  return user == "demo" and password == "demo"
end

local function v2(g)
  envelope.on_error(g)
  sessions:mount(g)
  g:post("/login", function(req, res)
    local form = req:form() or {}
    if not check_login(form.user, form.password) then return envelope.err(4012, "wrong user or password") end
    sessions:login(req, res, { user = form.user })
    return envelope.ok({ user = form.user, csrf_token = req.session.csrf })
  end)
  g:post("/logout", function(req, res)
    sessions:logout(req, res)
    return envelope.ok(true)
  end)
  g:group("/orders", function(o)
    o:before(function(req)
      if not req.session then return envelope.err(4011, "login required") end
    end)
    o:get("", function(req)
      local page, per = respond.page_of(req, 10, 50)
      if not page then return envelope.err(4001, "page and per_page must be positive integers") end
      local items = {}
      for i = (page - 1) * per + 1, math.min(page * per, #orders) do items[#items + 1] = orders[i] end
      return envelope.ok({ items = items, page = page, per_page = per, total = #orders })
    end)
    o:get("/:id", function(req)
      local order = find(req.params.id)
      if not order then return envelope.err(4041, "no such order") end
      return envelope.ok(order)
    end)
    o:post("", function(req)
      local form = req:form() or {}
      local amount = tonumber(form.amount)
      if not form.item or not amount then return envelope.err(4002, "item and amount required") end
      return envelope.ok(create(form.item, amount))
    end)
  end)
end

local function v3(g)
  problem.on_error(g)
  g:post("/token", function(req, res)
    local form = req:form() or {}
    if form.grant_type ~= "password" or not check_login(form.username, form.password) then
      return problem.new(res, 400, { error = "invalid_grant" })
    end
    local scope = form.scope or "orders:read"
    local token = jwt.sign({ sub = form.username, iss = ISSUER, aud = AUDIENCE, scope = scope }, signing_key,
      { expires_in = 3600 })
    res.headers["Cache-Control"] = "no-store"
    return { access_token = token, token_type = "Bearer", expires_in = 3600, scope = scope }
  end)
  g:group("/orders", function(o)
    o:before(jwt.bearer({ keys = { signing_key }, issuer = ISSUER, audience = AUDIENCE, realm = "shop",
                          on_fail = problem.bearer_fail }))
    o:get("", jwt.scoped("orders:read", function(req, res)
      local page, per = respond.page_of(req, 10, 50)
      if not page then return problem.new(res, 400, { detail = "page and per_page must be positive integers" }) end
      local items = {}
      for i = (page - 1) * per + 1, math.min(page * per, #orders) do items[#items + 1] = orders[i] end
      respond.paginate(req, res, page, per, #orders)
      return require("wxd.json").array(items)
    end))
    o:get("/:id", jwt.scoped("orders:read", function(req, res)
      local order = find(req.params.id)
      if not order then return problem.new(res, 404, { detail = "no order " .. req.params.id }) end
      return order
    end))
    o:post("", jwt.scoped("orders:write", function(req, res)
      local body = req:json()
      if type(body) ~= "table" or type(body.item) ~= "string" or type(body.amount) ~= "number" then
        return problem.new(res, 422, { detail = "item (string) and amount (number) required" })
      end
      local order = create(body.item, body.amount)
      res.headers["Location"] = req.path .. "/" .. order.id
      return 201, order
    end))
  end)
end

apiversion.mount(app, {
  path = "/api", vendor = "shop", header = "X-API-Version", default = "v2",
  versions = { v2 = v2, v3 = v3 },
})

return app
