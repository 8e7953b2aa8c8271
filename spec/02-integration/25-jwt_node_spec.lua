-- wxd.jwt against an independent implementation, the npm `jose` package
-- (installed by make deps into build/spec/node): its tokens verify with
-- ours, ours with it, and its refusals are ours; then a JWKS key set served
-- by one wxd, used by another, rotated without a failed request.
local H = require "helpers"
local jwt = require "wxd.jwt"
local json = require "cjson"

local NODE_MODULES = H.ROOT .. "/build/spec/node/node_modules"
local SCRIPT = H.ROOT .. "/spec/fixtures/jwt_node.mjs"
local SECRET = "0123456789abcdef0123456789abcdef"

-- Runs a batch of jobs through jose; returns its results in order.
local function jose(dir, jobs)
  H.write_file(dir .. "/jobs.json", json.encode(jobs))
  local out, rc = H.sh(string.format("NODE_MODULES=%s node %s %s/jobs.json %s/out.json", NODE_MODULES, SCRIPT, dir, dir))
  assert(rc == 0, out)
  return json.decode(H.read_file(dir .. "/out.json"))
end

describe("wxd.jwt with npm jose", function()
  if H.read_file(NODE_MODULES .. "/jose/package.json") == nil then
    pending("npm jose is not installed in build/spec/node (run make deps)")
    return
  end

  local dir, pem = H.tmpdir(), {}
  setup(function()
    for _, c in ipairs({
      "openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out DIR/rsa.pem",
      "openssl pkey -in DIR/rsa.pem -pubout -out DIR/rsa.pub",
      "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out DIR/ec.pem",
      "openssl pkey -in DIR/ec.pem -pubout -out DIR/ec.pub",
    }) do
      local out, rc = H.sh((c:gsub("DIR", dir)))
      assert(rc == 0, out)
    end
    for _, n in ipairs({ "rsa.pem", "rsa.pub", "ec.pem", "ec.pub" }) do pem[n] = H.read_file(dir .. "/" .. n) end
  end)
  teardown(function() os.execute("rm -rf " .. dir) end)

  local function material(alg, private)
    if alg == "HS256" then return SECRET end
    return pem[(alg == "RS256" and "rsa" or "ec") .. (private and ".pem" or ".pub")]
  end

  it("verifies jose's tokens and refuses what must be refused", function()
    local now = os.time()
    local good = { iss = "https://auth.test", aud = "shop", sub = "u1", iat = now, exp = now + 300 }
    local function with(t)
      local c = {}
      for k, v in pairs(good) do c[k] = v end
      for k, v in pairs(t) do c[k] = v end
      return c
    end
    local cases = {
      { "HS256", good, true }, { "RS256", good, true }, { "ES256", good, true },
      { "RS256", with{ exp = now - 120 }, "expired" },
      { "ES256", with{ nbf = now + 120 }, "not yet valid" },
      { "HS256", with{ iss = "https://evil.test" }, "wrong issuer" },
      { "RS256", with{ aud = { "a", "b" } }, "wrong audience" },
      { "RS256", good, "unknown kid", { kid = "nope" } },
    }
    local jobs = {}
    for i, c in ipairs(cases) do
      jobs[i] = { op = "sign", alg = c[1], key = material(c[1], true), claims = c[2], header = c[4] }
    end
    local res = jose(dir, jobs)
    local keys = {
      jwt.key{ alg = "HS256", secret = SECRET },
      jwt.key{ alg = "RS256", pem = pem["rsa.pub"], kid = "r1" },
      jwt.key{ alg = "ES256", pem = pem["ec.pub"] },
    }
    for i, c in ipairs(cases) do
      assert.truthy(res[i].token, res[i].error)
      local claims, err = jwt.verify(res[i].token, { keys = keys, issuer = "https://auth.test", audience = "shop" })
      if c[3] == true then
        assert.equal("u1", claims and claims.sub, c[1] .. ": " .. tostring(err))
      else
        assert.same({ nil, c[3] }, { claims, err }, c[1] .. " " .. c[3])
      end
    end
    -- a jose HS256 token with its signature swapped for an RS256 one's
    local h, p = res[1].token:match("^([^.]+)%.([^.]+)%.")
    local rs_sig = res[2].token:match("%.([^.]+)$")
    assert.same({ nil, "bad signature" }, { jwt.verify(h .. "." .. p .. "." .. rs_sig, { keys = keys }) })
  end)

  it("makes tokens jose verifies, and jose refuses ours when it must", function()
    local now = os.time()
    local jobs, kinds = {}, {}
    for _, alg in ipairs({ "HS256", "RS256", "ES256" }) do
      local key = alg == "HS256" and jwt.key{ alg = alg, secret = SECRET } or jwt.key{ alg = alg, pem = material(alg, true) }
      local t = jwt.sign({ sub = "ours-" .. alg, iss = "wxd", aud = "shop" }, key, { expires_in = 300 })
      jobs[#jobs + 1] = { op = "verify", alg = alg, key = material(alg, false), token = t,
                          opts = { issuer = "wxd", audience = "shop" } }
      kinds[#kinds + 1] = "ok"
      local expired = jwt.sign({ sub = "x" }, key, { now = now - 1000, expires_in = 10 })
      jobs[#jobs + 1] = { op = "verify", alg = alg, key = material(alg, false), token = expired }
      kinds[#kinds + 1] = "ERR_JWT_EXPIRED"
      local wrong_aud = jwt.sign({ sub = "x", aud = "other" }, key, { expires_in = 300 })
      jobs[#jobs + 1] = { op = "verify", alg = alg, key = material(alg, false), token = wrong_aud,
                          opts = { audience = "shop" } }
      kinds[#kinds + 1] = "ERR_JWT_CLAIM_VALIDATION_FAILED"
    end
    local res = jose(dir, jobs)
    for i, kind in ipairs(kinds) do
      if kind == "ok" then
        assert.equal(jobs[i].alg, res[i].payload and res[i].payload.sub:sub(6), tostring(res[i].error))
      else
        assert.equal(kind, res[i].error, jobs[i].alg)
      end
    end
  end)

  describe("a JWKS key set served by another wxd", function()
    local issuer, api
    local function app(src)
      local d = H.tmpdir()
      H.write_file(d .. "/app.lua", src)
      return d
    end
    setup(function()
      H.write_file(dir .. "/jwks.json", '{"keys":[]}')
      issuer = H.start(app([[
        local app = require("wxd.app").new()
        app:get("/jwks.json", function(_, res)
          require("wxd").sleep(200) -- a slow identity provider: requests pile up meanwhile
          local f = assert(io.open(os.getenv("JWKS_FILE"), "rb"))
          local s = f:read("*a") f:close()
          res.headers["content-type"] = "application/json"
          return s
        end)
        return app
      ]]), { env = "JWKS_FILE=" .. dir .. "/jwks.json" })
      api = H.start(app([[
        local jwt = require "wxd.jwt"
        local app = require("wxd.app").new()
        -- /v3 may refetch once a second, /strict once an hour
        local set = jwt.jwks{ url = os.getenv("JWKS_URL"), min_refresh = 1, ttl = 300 }
        local strict = jwt.jwks{ url = os.getenv("JWKS_URL"), min_refresh = 3600, ttl = 3600 }
        app:get("/fetches", function() return { n = set.fetches, strict = strict.fetches } end)
        app:group("/v3", function(v3)
          v3:before(jwt.bearer{ keys = set, audience = "shop" })
          v3:get("/me", function(req) return { sub = req.ctx.jwt.sub } end)
        end)
        app:group("/strict", function(g)
          g:before(jwt.bearer{ keys = strict, audience = "shop" })
          g:get("/me", function(req) return { sub = req.ctx.jwt.sub } end)
        end)
        return app
      ]]), { env = "JWKS_URL=http://127.0.0.1:" .. issuer.port .. "/jwks.json" })
    end)
    teardown(function()
      if api then api:stop(); api:cleanup() end
      if issuer then issuer:stop(); issuer:cleanup() end
    end)

    it("fetches the set, takes a rotated-in kid on its first request, refetches for unknown kids at most once a pause", function()
      local now = os.time()
      local claims = { sub = "u1", aud = "shop", iat = now, exp = now + 300 }
      local res = jose(dir, {
        { op = "jwk", alg = "RS256", key = pem["rsa.pub"], kid = "k1" },
        { op = "jwk", alg = "ES256", key = pem["ec.pub"], kid = "k2" },
        { op = "sign", alg = "RS256", key = pem["rsa.pem"], claims = claims, header = { kid = "k1" } },
        { op = "sign", alg = "ES256", key = pem["ec.pem"], claims = claims, header = { kid = "k2" } },
        { op = "sign", alg = "ES256", key = pem["ec.pem"], claims = claims, header = { kid = "k3" } },
      })
      H.write_file(dir .. "/jwks.json", json.encode({ keys = { res[1].jwk } }))
      local function me(token, base)
        return api:get((base or "/v3") .. "/me", { Authorization = "Bearer " .. token })
      end
      local r = me(res[3].token)
      local fetched = os.time()
      assert.equal(200, r.status, r.body)
      assert.equal("u1", json.decode(r.body).sub)
      -- k2 is published (as an issuer does before signing with it) and,
      -- once the refetch pause has passed, the first request with it passes
      H.write_file(dir .. "/jwks.json", json.encode({ keys = { res[1].jwk, res[2].jwk } }))
      H.wait_until(function() return os.time() >= fetched + 2 end, 5, "the refetch pause to pass")
      -- five requests at once: they share one fetch and all pass
      local conns = {}
      for i = 1, 5 do
        conns[i] = api:connect(10)
        assert(conns[i]:send("GET /v3/me HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer "
          .. res[4].token .. "\r\n\r\n"))
      end
      for i = 1, 5 do
        local raw = H.read_all(conns[i], 10)
        local rs = H.parse_responses(raw)
        conns[i]:close()
        assert.equal(200, rs[1] and rs[1].status, i)
      end
      assert.equal(2, api:get_json("/fetches").n)
      -- unknown kids within the pause: 401 invalid_token and no fetch at all
      assert.equal(200, me(res[3].token, "/strict").status)
      assert.equal(1, api:get_json("/fetches").strict)
      for _ = 1, 3 do
        r = me(res[5].token, "/strict")
        assert.equal(401, r.status)
        assert.equal('Bearer realm="api", error="invalid_token", error_description="unknown kid"',
          r.headers["www-authenticate"])
      end
      assert.equal(1, api:get_json("/fetches").strict)
      -- k2 is in /strict's set since its first fetch
      assert.equal(200, me(res[4].token, "/strict").status)
      assert.equal(1, api:get_json("/fetches").strict)
    end)
  end)
end)
