-- Unit specs for wxd.jwt and the ES256 keys of wxd.core.crypto: sign and
-- verify in process, every refusal, JWK import, bearer middleware and
-- scopes through app:handle. Interop with npm jose: 25-jwt_node_spec.lua.
local H = require "helpers"
local jwt = require "wxd.jwt"
local crypto = require "wxd.crypto"
local core = require "wxd.core.crypto"
local json = require "wxd.json"
local wxd_app = require "wxd.app"

local dir = H.tmpdir()
local function gen(name, cmd)
  local out, rc = H.sh(cmd)
  assert(rc == 0, out)
  return H.read_file(dir .. "/" .. name)
end
local RSA_PRIV = gen("rsa.pem", "openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out " .. dir .. "/rsa.pem")
local RSA_PUB = gen("rsa.pub", "openssl pkey -in " .. dir .. "/rsa.pem -pubout -out " .. dir .. "/rsa.pub")
local EC_PRIV = gen("ec.pem", "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out " .. dir .. "/ec.pem")
local EC_PUB = gen("ec.pub", "openssl pkey -in " .. dir .. "/ec.pem -pubout -out " .. dir .. "/ec.pub")
local EC384 = gen("ec384.pem", "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out " .. dir .. "/ec384.pem")
local SECRET = string.rep("k", 32)

local NOW = 1700000000
local function b64j(t) return crypto.base64url_encode(json.encode(t)) end

describe("ES256 keys (wxd.core.crypto)", function()
  it("signs r||s that openssl verifies, and verifies openssl's signatures", function()
    local k = assert(core.ec_load_private_key(EC_PRIV))
    local sig = k:sign("hello")
    assert.equal(64, #sig)
    assert.is_true(k:verify("hello", sig))
    assert.same({ nil, "bad signature" }, { k:verify("hellO", sig) })
    assert.same({ nil, "bad signature" }, { k:verify("hello", sig:sub(1, 63)) })
    -- openssl's DER signature, converted to r||s by hand, verifies with ours
    H.write_file(dir .. "/msg", "from openssl")
    local out, rc = H.sh("openssl dgst -sha256 -sign " .. dir .. "/ec.pem -out " .. dir .. "/sig.der " .. dir .. "/msg")
    assert(rc == 0, out)
    local asn = H.sh("openssl asn1parse -inform DER -in " .. dir .. "/sig.der")
    local ints = {}
    for hex in asn:gmatch("INTEGER%s*:(%x+)") do ints[#ints + 1] = crypto.hex_decode(("0"):rep(64 - #hex) .. hex) end
    local pub = assert(core.ec_load_public_key(EC_PUB))
    assert.is_true(pub:verify("from openssl", ints[1] .. ints[2]))
    assert.has_error(function() pub:sign("x") end, "sign needs a private key")
  end)

  it("refuses other curves, RSA keys and garbage as invalid key", function()
    assert.same({ nil, "invalid key" }, { core.ec_load_private_key(EC384) })
    assert.same({ nil, "invalid key" }, { core.ec_load_private_key(RSA_PRIV) })
    assert.same({ nil, "invalid key" }, { core.ec_load_public_key("garbage") })
    assert.same({ nil, "invalid key" }, { crypto.load_public_key(EC_PUB) })
  end)
end)

describe("wxd.jwt sign and verify", function()
  local keys = {
    HS256 = jwt.key{ alg = "HS256", secret = SECRET },
    RS256 = jwt.key{ alg = "RS256", pem = RSA_PRIV, kid = "r1" },
    ES256 = jwt.key{ alg = "ES256", file = dir .. "/ec.pem", kid = "e1" },
  }
  local pubs = {
    HS256 = keys.HS256,
    RS256 = jwt.key{ alg = "RS256", pem = RSA_PUB, kid = "r1" },
    ES256 = jwt.key{ alg = "ES256", pem = EC_PUB, kid = "e1" },
  }
  local opts = { keys = { pubs.HS256, pubs.RS256, pubs.ES256 }, issuer = "https://auth.test", audience = "shop",
                 now = NOW }

  for alg in pairs(keys) do
    it("round-trips " .. alg .. " with exp, iss, aud", function()
      local t = jwt.sign({ sub = "u1", iss = "https://auth.test", aud = { "x", "shop" } }, keys[alg],
        { expires_in = 600, now = NOW })
      local claims, header = jwt.verify(t, opts)
      assert.equal("u1", claims.sub)
      assert.equal(NOW + 600, claims.exp)
      assert.equal(alg, header.alg)
    end)
  end

  local function signed(claims, key)
    return jwt.sign(claims, key or keys.RS256, { now = NOW })
  end
  local base = { iss = "https://auth.test", aud = "shop", exp = NOW + 60 }
  local function with(t)
    local c = {}
    for k, v in pairs(base) do c[k] = v end
    for k, v in pairs(t) do c[k] = v end
    return c
  end

  it("refuses by time with leeway", function()
    assert.same({ nil, "expired" }, { jwt.verify(signed(with{ exp = NOW - 61 }), opts) })
    assert.truthy(jwt.verify(signed(with{ exp = NOW - 59 }), opts)) -- within the 60 s leeway
    assert.same({ nil, "expired" }, { jwt.verify(signed(with{ exp = NOW - 1 }), { keys = opts.keys, now = NOW, leeway = 0 }) })
    assert.same({ nil, "not yet valid" }, { jwt.verify(signed(with{ nbf = NOW + 61 }), opts) })
    assert.truthy(jwt.verify(signed(with{ nbf = NOW + 59 }), opts))
    assert.same({ nil, "issued in the future" }, { jwt.verify(signed(with{ iat = NOW + 120 }), opts) })
    assert.same({ nil, "missing exp" }, { jwt.verify(signed({ iss = "https://auth.test", aud = "shop" }), opts) })
    assert.same({ nil, "malformed" }, { jwt.verify(signed(with{ exp = "tomorrow" }), opts) })
  end)

  it("refuses a wrong issuer or audience", function()
    assert.same({ nil, "wrong issuer" }, { jwt.verify(signed(with{ iss = "https://evil.test" }), opts) })
    assert.same({ nil, "wrong audience" }, { jwt.verify(signed(with{ aud = { "other" } }), opts) })
    assert.same({ nil, "wrong audience" }, { jwt.verify(signed(with{ aud = json.null }), opts) })
  end)

  it("refuses a bad signature, a token cut or padded, unknown kid", function()
    local t = signed(with{})
    local h, p, s = t:match("^([^.]+)%.([^.]+)%.([^.]+)$")
    local other = signed(with{ sub = "admin" })
    local _, p2 = other:match("^([^.]+)%.([^.]+)%.")
    assert.same({ nil, "bad signature" }, { jwt.verify(h .. "." .. p2 .. "." .. s, opts) })
    assert.same({ nil, "malformed" }, { jwt.verify(h .. "." .. p, opts) })
    assert.same({ nil, "malformed" }, { jwt.verify(t .. ".x", opts) })
    assert.same({ nil, "malformed" }, { jwt.verify("a.b.c", opts) })
    local unknown = jwt.sign(with{}, keys.RS256, { now = NOW, header = { kid = "r9" } })
    assert.same({ nil, "unknown kid" }, { jwt.verify(unknown, opts) })
    local es = jwt.sign(with{}, keys.ES256, { now = NOW })
    local eh, ep, esig = es:match("^([^.]+)%.([^.]+)%.([^.]+)$")
    local raw = crypto.base64url_decode(esig)
    local flipped = raw:sub(1, 10) .. string.char((raw:byte(11) + 1) % 256) .. raw:sub(12)
    assert.same({ nil, "bad signature" }, { jwt.verify(eh .. "." .. ep .. "." .. crypto.base64url_encode(flipped), opts) })
  end)

  it("refuses alg none and other algorithms", function()
    local body = b64j(with{})
    for _, alg in ipairs({ "none", "None", "NONE", "HS512", "RS512", "PS256", "ES384" }) do
      local t = b64j({ alg = alg, typ = "JWT" }) .. "." .. body .. "."
      assert.same({ nil, "unsupported alg" }, { jwt.verify(t, opts) }, alg)
      t = b64j({ alg = alg, typ = "JWT" }) .. "." .. body .. "." .. crypto.base64url_encode("x")
      assert.same({ nil, "unsupported alg" }, { jwt.verify(t, opts) }, alg)
    end
    assert.same({ nil, "unsupported alg" }, { jwt.verify(b64j({ typ = "JWT" }) .. "." .. body .. ".", opts) })
  end)

  it("refuses the HS/RS confusion: an RS256 public key is never an HMAC secret", function()
    local input = b64j({ alg = "HS256", typ = "JWT", kid = "r1" }) .. "." .. b64j(with{})
    local forged = input .. "." .. crypto.base64url_encode(crypto.hmac_sha256(RSA_PUB, input))
    -- only RSA keys configured: no HS256 key to try
    assert.same({ nil, "unknown kid" }, { jwt.verify(forged, { keys = { pubs.RS256 }, now = NOW }) })
    input = b64j({ alg = "HS256", typ = "JWT" }) .. "." .. b64j(with{})
    forged = input .. "." .. crypto.base64url_encode(crypto.hmac_sha256(RSA_PUB, input))
    assert.same({ nil, "unsupported alg" }, { jwt.verify(forged, { keys = { pubs.RS256 }, now = NOW }) })
    -- with an HS256 key of its own, the RSA PEM is still not its secret
    assert.same({ nil, "bad signature" }, { jwt.verify(forged, opts) })
    -- and an allow-list of algorithms narrows further
    local hs = jwt.sign(with{}, keys.HS256, { now = NOW })
    assert.same({ nil, "unsupported alg" }, { jwt.verify(hs, { keys = opts.keys, now = NOW, algs = { RS256 = true } }) })
  end)

  it("raises for programmer errors", function()
    assert.has_error(function() jwt.key{ alg = "none" } end)
    assert.has_error(function() jwt.key{ alg = "HS256", secret = "short" } end)
    assert.has_error(function() jwt.key{ alg = "ES256", pem = RSA_PUB } end)
    assert.has_error(function() jwt.sign({}, pubs.RS256) end)
  end)
end)

describe("wxd.jwt JWK import", function()
  it("builds RS256 and ES256 keys from their numbers", function()
    -- numbers from openssl's text dump of the same keys
    local rsa_txt = H.sh("openssl pkey -pubin -in " .. dir .. "/rsa.pub -text -noout")
    local hex = rsa_txt:match("Modulus:%s*(.-)Exponent"):gsub("[%s:]", "")
    local n = crypto.hex_decode(hex)
    local k = assert(jwt.key_from_jwk({ kty = "RSA", kid = "a", n = crypto.base64url_encode(n),
      e = crypto.base64url_encode("\1\0\1") }))
    local t = jwt.sign({ exp = NOW + 10 }, jwt.key{ alg = "RS256", pem = RSA_PRIV }, { now = NOW })
    assert.truthy(jwt.verify(t, { keys = { k }, now = NOW }))
    local ec_txt = H.sh("openssl pkey -pubin -in " .. dir .. "/ec.pub -text -noout")
    local pt = crypto.hex_decode((ec_txt:match("pub:%s*(.-)ASN1"):gsub("[%s:]", "")))
    assert.equal(65, #pt)
    local ek = assert(jwt.key_from_jwk({ kty = "EC", crv = "P-256", x = crypto.base64url_encode(pt:sub(2, 33)),
      y = crypto.base64url_encode(pt:sub(34, 65)) }))
    t = jwt.sign({ exp = NOW + 10 }, jwt.key{ alg = "ES256", pem = EC_PRIV }, { now = NOW })
    assert.truthy(jwt.verify(t, { keys = { ek }, now = NOW }))
  end)

  it("refuses oct keys, other uses and broken numbers", function()
    assert.same({ nil, "invalid jwk" }, { jwt.key_from_jwk({ kty = "oct", k = "c2VjcmV0" }) })
    assert.same({ nil, "invalid jwk" }, { jwt.key_from_jwk({ kty = "RSA", use = "enc", n = "AQAB", e = "AQAB" }) })
    assert.same({ nil, "invalid jwk" }, { jwt.key_from_jwk({ kty = "RSA", n = "AQAB", e = "AQAB" }) })
    assert.same({ nil, "invalid jwk" }, { jwt.key_from_jwk({ kty = "EC", crv = "P-256", x = "AQAB", y = "AQAB" }) })
    local zero = crypto.base64url_encode(("\0"):rep(32))
    assert.same({ nil, "invalid jwk" }, { jwt.key_from_jwk({ kty = "EC", crv = "P-256", x = zero, y = zero }) })
  end)
end)

describe("wxd.jwt bearer middleware and scopes", function()
  local key = jwt.key{ alg = "HS256", secret = SECRET }
  local function app()
    local a = wxd_app.new()
    a:group("/v3", function(g)
      g:before(jwt.bearer{ keys = { key }, audience = "shop", realm = "shop" })
      g:get("/orders", jwt.scoped("orders:read", function(req) return { sub = req.ctx.jwt.sub } end))
      g:post("/orders", jwt.scoped({ "orders:read", "orders:write" }, function() return 201, { ok = true } end))
    end)
    return a
  end
  local function call(a, method, auth)
    local status, headers, body = a:handle({ method = method, path = "/v3/orders", query = "", version = "1.1",
      headers = { authorization = auth }, body = "", remote_addr = "127.0.0.1", remote_port = 1, id = "r" })
    local h = {}
    for k, v in pairs(headers or {}) do h[k:lower()] = v end
    return status, h, json.decode(body)
  end

  it("answers 401 without a token, 401 invalid_token with a bad one", function()
    local s, h, b = call(app(), "GET", nil)
    assert.equal(401, s)
    assert.equal('Bearer realm="shop"', h["www-authenticate"])
    assert.equal("unauthorized", b.error)
    s, h = call(app(), "GET", "Bearer " .. jwt.sign({ aud = "other", exp = os.time() + 60 }, key))
    assert.equal(401, s)
    assert.equal('Bearer realm="shop", error="invalid_token", error_description="wrong audience"', h["www-authenticate"])
    s = call(app(), "GET", "Basic dXNlcjpwYXNz")
    assert.equal(401, s)
  end)

  it("checks scopes per route: 403 insufficient_scope naming the scope", function()
    local t = jwt.sign({ sub = "u7", aud = "shop", scope = "orders:read profile", exp = os.time() + 60 }, key)
    local s, _, b = call(app(), "GET", "Bearer " .. t)
    assert.equal(200, s)
    assert.equal("u7", b.sub)
    local h
    s, h, b = call(app(), "POST", "bearer " .. t)
    assert.equal(403, s)
    assert.equal('Bearer realm="shop", error="insufficient_scope", scope="orders:read orders:write"', h["www-authenticate"])
    assert.equal("insufficient_scope", b.error)
    t = jwt.sign({ aud = "shop", scp = { "orders:read", "orders:write" }, exp = os.time() + 60 }, key)
    assert.equal(201, (call(app(), "POST", "Bearer " .. t)))
  end)
end)
