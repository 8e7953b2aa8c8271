-- Unit specs for wxd.session through app:handle, with the memory store and
-- a clock of the spec's own (expiry without waiting). Sharing over Redis
-- between two processes: spec/02-integration/25-session_spec.lua.
local wxd_app = require "wxd.app"
local session = require "wxd.session"
local store = require "wxd.store"
local json = require "wxd.json"

local SECRET = string.rep("s", 32)

local function setup_app(opts)
  local t = { now = 1000 }
  opts = opts or {}
  opts.secret = SECRET
  opts.clock = function() return t.now end
  opts.store = store.new({ backend = "memory" })
  opts.prefix = "sess-" .. tostring(t):sub(-8) .. ":"
  local sessions = session.new(opts)
  local app = wxd_app.new()
  app:group("/api/v2", function(v2)
    sessions:mount(v2)
    v2:post("/login", function(req, res)
      sessions:login(req, res, { user = req.query.user })
      return { data = { csrf = req.session.csrf } }
    end)
    v2:get("/me", function(req)
      if not req.session then return 401, { code = 4011, error = req.ctx.session_end or "no session" } end
      req.session.data.hits = (req.session.data.hits or 0) + 1
      return { data = req.session.data }
    end)
    v2:post("/cart", function(req)
      if not req.session then return 401, { code = 4011 } end
      return { data = "added" }
    end)
    v2:post("/logout", function(req, res) sessions:logout(req, res) return { data = true } end)
  end)
  return app, t, sessions
end

local function call(app, method, path, cookie, headers, opts)
  local h = headers or {}
  h.cookie = cookie
  local status, hdrs, body = app:handle({ method = method, path = path, query = (opts or {}).query or "",
    version = "1.1", headers = h, body = (opts or {}).body or "", remote_addr = "127.0.0.1", remote_port = 1,
    id = "r", tls = (opts or {}).tls })
  local out = {}
  for k, v in pairs(hdrs or {}) do out[k:lower()] = v end
  local sc = out["set-cookie"]
  if type(sc) == "string" then sc = { sc } end
  return { status = status, headers = out, body = body, json = json.decode(body or "null"), cookies = sc or {} }
end

-- The sid=... pair of a response's Set-Cookie.
local function sid_of(r)
  for _, c in ipairs(r.cookies) do
    local v = c:match("^sid=([^;]*)")
    if v then return "sid=" .. v, c end
  end
end

local function login(app, user, cookie, opts)
  opts = opts or {}
  local r = call(app, "POST", "/api/v2/login", cookie, { ["x-csrf-token"] = opts.csrf },
    { query = "user=" .. user, tls = opts.tls })
  assert.equal(200, r.status, r.body)
  local sid, line = sid_of(r)
  return sid, r.json.data.csrf, line
end

describe("wxd.session", function()
  it("logs in with a signed HttpOnly SameSite cookie, Secure over TLS, and keeps data", function()
    local app = setup_app()
    local sid, _, line = login(app, "u1")
    assert.matches("^sid=%w+%.[%w_-]+; ", line)
    assert.truthy(line:find("HttpOnly", 1, true))
    assert.truthy(line:find("SameSite=Lax", 1, true))
    assert.falsy(line:find("Secure", 1, true))
    local _, _, tls_line = login(app, "u1", nil, { tls = true })
    assert.truthy(tls_line:find("; Secure", 1, true))
    assert.same({ user = "u1", hits = 1 }, call(app, "GET", "/api/v2/me", sid).json.data)
    assert.same({ user = "u1", hits = 2 }, call(app, "GET", "/api/v2/me", sid).json.data)
  end)

  it("rotates the id on login (fixation): the id from before no longer works", function()
    local app = setup_app()
    local before, csrf = login(app, "anon")
    local after = login(app, "u1", before, { csrf = csrf })
    assert.not_equal(before, after)
    assert.equal("u1", call(app, "GET", "/api/v2/me", after).json.data.user)
    local r = call(app, "GET", "/api/v2/me", before)
    assert.equal(401, r.status)
    assert.equal("unknown", r.json.error)
  end)

  it("refuses a tampered cookie and clears it", function()
    local app = setup_app()
    local sid = login(app, "u1")
    local id, mac = sid:match("^sid=(%w+)%.(.+)$")
    local other = id:sub(1, -2) .. (id:sub(-1) == "a" and "b" or "a")
    for _, bad in ipairs({ "sid=" .. other .. "." .. mac, "sid=" .. id .. "." .. mac:sub(2), "sid=" .. id,
                           "sid=" .. id .. ".", "sid=garbage" }) do
      local r = call(app, "GET", "/api/v2/me", bad)
      assert.equal(401, r.status, bad)
      assert.equal("tampered", r.json.error, bad)
      assert.matches("^sid=; ", r.cookies[1])
    end
    assert.equal(200, call(app, "GET", "/api/v2/me", sid).status)
  end)

  it("ends a session after ttl however busy, and after idle when unused", function()
    local app, t = setup_app({ ttl = 100, idle = 30 })
    local sid = login(app, "u1")
    for _ = 1, 4 do
      t.now = t.now + 20 -- within idle each time: kept alive
      assert.equal(200, call(app, "GET", "/api/v2/me", sid).status)
    end
    t.now = t.now + 20 -- 100 s after login
    local r = call(app, "GET", "/api/v2/me", sid)
    assert.equal(401, r.status)
    assert.equal("expired", r.json.error)
    -- idle: 31 s without a request
    sid = login(app, "u2")
    t.now = t.now + 29
    assert.equal(200, call(app, "GET", "/api/v2/me", sid).status)
    t.now = t.now + 31
    r = call(app, "GET", "/api/v2/me", sid)
    assert.equal(401, r.status)
    assert.equal("idle", r.json.error)
    -- and it is gone, not merely refused
    assert.equal("unknown", call(app, "GET", "/api/v2/me", sid).json.error)
  end)

  it("refuses unsafe methods without the CSRF token when the cookie authenticates", function()
    local app = setup_app()
    local sid, csrf = login(app, "u1")
    local r = call(app, "POST", "/api/v2/cart", sid)
    assert.equal(403, r.status)
    assert.equal("csrf", r.json.error)
    assert.equal(403, call(app, "POST", "/api/v2/cart", sid, { ["x-csrf-token"] = csrf:sub(2) }).status)
    assert.equal(200, call(app, "POST", "/api/v2/cart", sid, { ["x-csrf-token"] = csrf }).status)
    assert.equal(200, call(app, "POST", "/api/v2/cart", sid, { ["content-type"] = "application/x-www-form-urlencoded" },
      { body = "item=1&_csrf=" .. csrf }).status)
    -- safe methods and requests without the cookie are not checked
    assert.equal(200, call(app, "GET", "/api/v2/me", sid).status)
    assert.equal(401, call(app, "POST", "/api/v2/cart", nil).status)
    -- logout is unsafe too
    assert.equal(403, call(app, "POST", "/api/v2/logout", sid).status)
    assert.equal(200, call(app, "POST", "/api/v2/logout", sid, { ["x-csrf-token"] = csrf }).status)
    assert.equal("unknown", call(app, "GET", "/api/v2/me", sid).json.error)
  end)

  it("raises on a short secret", function()
    assert.has_error(function() session.new({ secret = "short" }) end)
  end)
end)
