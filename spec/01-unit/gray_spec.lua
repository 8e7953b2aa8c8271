-- wxd.gray: rules compiled (and refused, naming the rule) with the config,
-- first match wins, buckets as documented (checked against sha256sum),
-- req.gray and gray groups through app:handle, wxd.gray.pick, the baggage
-- merge, and an Official Account message coloured by its sender.
local H = require "helpers"
local gray = require "wxd.gray"
local config = require "wxd.config"
local testing = require "wxd.testing"

local function compile(rules, extra)
  local section = { rules = rules }
  for k, v in pairs(extra or {}) do section[k] = v end
  local cfg, err = config.validate({ gray = section })
  return cfg and cfg.gray, err
end

-- A request as the core hands it to app:handle (headers lower case).
local function req(headers, query)
  local r = setmetatable({ headers = headers or {}, query_string = query or "" }, {
    __index = function(t, k)
      if k == "query" then return require("wxd.app").parse_query(rawget(t, "query_string")) end
    end,
  })
  return r
end

describe("wxd.gray rules", function()
  it("refuses bad rules at load with a message naming the rule", function()
    local cases = {
      { { { name = "canary", colour = "v2", percent = 150 } },
        'config.gray.rules[1] (canary): percent must be a number in 0..100, got 150' },
      { { { colour = "v2", header = { "X-A", "b" } }, { name = "bad", colour = "v 2", percent = 1 } },
        "config.gray.rules[2] (bad): colour must be 1..32 letters" },
      { { { name = "empty", colour = "v2" } }, "config.gray.rules[1] (empty): a rule needs a condition" },
      { { { name = "typo", color = "v2", percent = 5 } }, 'config.gray.rules[1] (typo): unknown key "color"' },
      { { { name = "hdr", colour = "v2", header = { "X-A" } } }, "config.gray.rules[1] (hdr): header must be" },
      { { { name = "ids", colour = "v2", openids = {} } }, "openids must be a non-empty list of strings" },
      { { { name = "key", colour = "v2", percent = 5, key = { cookie = "x" } } }, "(key): key must be" },
      { { { name = "none", colour = "none", percent = 5 } }, 'colour "none" is reserved' },
      { { { name = "a", colour = "v2", percent = 5 }, { name = "a", colour = "v3", percent = 5 } },
        'config.gray.rules[2] (a): name "a" is used by rules[1] too' },
      { { { name = "salt", colour = "v2", header = { "X-A", "b" }, salt = "s" } }, "salt is used by percent" },
      { "no list", "config.gray.rules: expected a list of rules" },
    }
    for _, c in ipairs(cases) do
      local set, err = compile(c[1])
      assert.is_nil(set, c[2])
      assert.truthy(err:find(c[2], 1, true), "expected " .. c[2] .. "\n got " .. tostring(err))
    end
    local _, err = config.validate({ gray = { rule = {} } })
    assert.truthy(err:find('config.gray: unknown key "rule"', 1, true), err)
    -- Every bad rule is reported, not only the first.
    _, err = compile({ { name = "x", colour = "v2", percent = -1 }, { name = "y", colour = "v2" } })
    assert.truthy(err:find("(x)", 1, true) and err:find("(y)", 1, true), err)
  end)

  it("compiles an empty section to nothing (no cost per request)", function()
    assert.is_nil((compile({})))
    local cfg = assert(config.validate({ gray = {} }))
    assert.is_nil(cfg.gray)
  end)

  it("computes buckets as documented: SHA-256(salt:key), 4 bytes big-endian, mod 10000", function()
    -- The sha256sum command is the independent implementation.
    for i = 1, 20 do
      local key = "oUser" .. (i * 7919) .. "xyz"
      local out = H.sh("printf '%s' 'v2:" .. key .. "' | sha256sum")
      local want = tonumber(out:sub(1, 8), 16) % 10000
      assert.equal(want, gray.bucket("v2", key), key)
    end
  end)

  it("takes the first rule that holds; header values match exactly", function()
    local set = assert(compile({
      { name = "scene", colour = "v2", header = { "X-Wechat-Scene", "miniapp_v3" } },
      { name = "region", colour = "sh", header = { "X-User-Region", { "shanghai", "sh" } } },
      { name = "staff", colour = "staff", openids = { "oStaff1", "oStaff2" } },
      { name = "device", colour = "dev", percent = 100, key = { header = "X-Device-Id" } },
      { name = "uid", colour = "q", openids = { "u7" }, key = { query = "uid" } },
    }))
    local function colour(h, q) return (gray.classify(set, req(h, q))) end
    assert.equal("v2", colour({ ["x-wechat-scene"] = "miniapp_v3", ["x-user-region"] = "shanghai" }))
    assert.equal("sh", colour({ ["x-wechat-scene"] = "miniapp_v2", ["x-user-region"] = "shanghai" }))
    assert.equal("sh", colour({ ["x-user-region"] = "sh" }))
    assert.is_nil(colour({ ["x-wechat-scene"] = "MINIAPP_V3" }))
    assert.is_nil(colour({ ["x-wechat-scene"] = "miniapp_v31" }))
    assert.is_nil(colour({ ["x-user-region"] = "beijing" }))
    assert.equal("staff", colour({ ["x-openid"] = "oStaff2" }))
    assert.is_nil(colour({ ["x-openid"] = "oStaff3" }))
    assert.equal("dev", colour({ ["x-device-id"] = "d1" }))
    assert.equal("q", colour({}, "uid=u7"))
    assert.is_nil(colour({}, "uid=u8"))
    assert.is_nil(colour({}))
  end)

  it("puts a share of keys in a percentage, the same keys every time; raising it only adds keys", function()
    local five = assert(compile({ { name = "canary", colour = "v2", percent = 5 } }))
    local ten = assert(compile({ { name = "first", colour = "x", header = { "X-A", "b" } },
      { name = "canary", colour = "v2", percent = 10 } }))
    local zero = assert(compile({ { colour = "v2", percent = 0 } }))
    local all = assert(compile({ { colour = "v2", percent = 100 } }))
    local n5, n10 = 0, 0
    for i = 1, 10000 do
      local r = req({ ["x-openid"] = "oGray" .. i })
      local a, b = gray.classify(five, r), gray.classify(ten, r)
      if a then n5 = n5 + 1; assert.equal("v2", b) end
      if b then n10 = n10 + 1 end
      assert.equal(a, (gray.classify(five, r)))
      assert.is_nil((gray.classify(zero, r)))
      assert.equal("v2", (gray.classify(all, r)))
    end
    assert.is_true(n5 >= 400 and n5 <= 600, "5%: " .. n5)
    assert.is_true(n10 >= 900 and n10 <= 1100, "10%: " .. n10)
    -- Another salt, another population.
    local salted = assert(compile({ { colour = "v2", percent = 5, salt = "round-2" } }))
    local same = 0
    for i = 1, 10000 do
      local r = req({ ["x-openid"] = "oGray" .. i })
      if gray.classify(five, r) and gray.classify(salted, r) then same = same + 1 end
    end
    assert.is_true(same < 100, "overlap " .. same)
  end)

  it("needs every condition of a rule to hold", function()
    local set = assert(compile({ { colour = "v2", header = { "X-User-Region", "shanghai" }, percent = 50 } }))
    local sh, other = 0, 0
    for i = 1, 2000 do
      if gray.classify(set, req({ ["x-user-region"] = "shanghai", ["x-openid"] = "o" .. i })) then sh = sh + 1 end
      if gray.classify(set, req({ ["x-user-region"] = "beijing", ["x-openid"] = "o" .. i })) then other = other + 1 end
    end
    assert.is_true(sh > 850 and sh < 1150, sh)
    assert.equal(0, other)
  end)

  it("says when an openid rule waited for an openid, and uses the sender given later", function()
    local set = assert(compile({ { colour = "staff", openids = { "oStaff1" } } }))
    local colour, waiting = gray.classify(set, req({}))
    assert.is_nil(colour)
    assert.is_true(waiting)
    assert.equal("staff", (gray.classify(set, req({}), "oStaff1")))
  end)

  it("inherits a known colour from X-Wxd-Gray or baggage only when told to", function()
    local rules = { { colour = "v2", header = { "X-A", "b" } } }
    local plain = assert(compile(rules))
    local inh = assert(compile(rules, { inherit = true }))
    assert.is_nil((gray.classify(plain, req({ ["x-wxd-gray"] = "v2" }))))
    assert.equal("v2", (gray.classify(inh, req({ ["x-wxd-gray"] = "v2" }))))
    assert.equal("v2", (gray.classify(inh, req({ baggage = "a=1, wxd-gray=v2" }))))
    -- Colours the config does not know are not taken (metric labels stay bounded).
    assert.is_nil((gray.classify(inh, req({ ["x-wxd-gray"] = "v9" }))))
    assert.is_nil((gray.classify(inh, req({ baggage = "xwxd-gray=v2" }))))
  end)
end)

describe("wxd.gray helpers", function()
  it("picks by colour, else the default", function()
    local t = { default = "http://v1", v2 = "http://v2" }
    assert.equal("http://v2", gray.pick(t, "v2"))
    assert.equal("http://v1", gray.pick(t, "v3"))
    assert.equal("http://v1", gray.pick(t)) -- outside a request: no colour
    assert.has_error(function() gray.pick("x") end)
  end)

  it("adds wxd-gray to baggage and keeps the caller's entries", function()
    assert.equal("wxd-gray=v2", gray.baggage("v2"))
    assert.equal("k1=v1,k2=v2;p=1,wxd-gray=v2", gray.baggage("v2", "k1=v1,k2=v2;p=1"))
    assert.is_nil(gray.baggage("v2", "k1=v1, wxd-gray=v3"))
  end)

  it("knows no request outside the server", function()
    assert.is_nil(gray.current())
    assert.is_false(gray.set("v2"))
    assert.has_error(function() gray.set("bad colour") end)
  end)
end)

describe("gray through app:handle", function()
  local dir, saved_config
  local APP = [[
local app = require("wxd.app").new()
app:group({ gray = "v2" }, function(v2)
  v2:get("/orders/:id", function(req) return "v2 order " .. req.params.id end)
end)
app:group({ gray = { "sh", "bj" } }, function(g)
  g:get("/region", function(req) return "regional " .. req.gray end)
end)
app:get("/orders/:id", function(req) return "v1 order " .. req.params.id end)
app:post("/orders/:id", function(req) return "v1 post " .. tostring(req.gray) end)
app:get("/region", function(req) return "central " .. tostring(req.gray) end)
app:mp("/wx", { token = "t0ken", appid = "wx0123456789abcdef", aes_key = string.rep("a", 43) }, {
  text = function(msg, ctx) return "colour " .. tostring(ctx.req.gray) end,
})
return app
]]
  local CONFIG = {
    gray = { rules = {
      { name = "scene", colour = "v2", header = { "X-Wechat-Scene", "miniapp_v3" } },
      { name = "region", colour = "sh", header = { "X-User-Region", "shanghai" } },
      { name = "staff", colour = "v2", openids = { "oStaffMember000001" } },
    } },
  }

  setup(function()
    saved_config = require("wxd").config
    dir = H.tmpdir()
    H.write_file(dir .. "/app.lua", APP)
  end)
  teardown(function()
    -- testing.app set wxd.config: later specs get what they had.
    require("wxd").config = saved_config
    os.execute("rm -rf " .. dir)
  end)

  it("routes a coloured request to its group's route, and falls through for the rest", function()
    local c = testing.app(dir, { config = CONFIG })
    assert.equal("v1 order 7", c:get("/orders/7").body)
    assert.equal("v2 order 7", c:get("/orders/7", { headers = { ["X-Wechat-Scene"] = "miniapp_v3" } }).body)
    assert.equal("v2 order 8", c:get("/orders/8", { headers = { ["X-OpenID"] = "oStaffMember000001" } }).body)
    -- No POST in the v2 group: the app's route answers, with the colour.
    assert.equal("v1 post v2", c:post("/orders/7", { headers = { ["X-Wechat-Scene"] = "miniapp_v3" } }).body)
    assert.equal("regional sh", c:get("/region", { headers = { ["X-User-Region"] = "shanghai" } }).body)
    assert.equal("central nil", c:get("/region").body)
    assert.equal(404, c:get("/nope", { headers = { ["X-Wechat-Scene"] = "miniapp_v3" } }).status)
  end)

  it("routes nothing by colour without rules", function()
    local c = testing.app(dir, { config = {} })
    assert.equal("v1 order 7", c:get("/orders/7", { headers = { ["X-Wechat-Scene"] = "miniapp_v3" } }).body)
  end)

  it("colours an Official Account message by its sender", function()
    local c = testing.app(dir, { config = CONFIG })
    local wx = testing.wechat({ token = "t0ken", appid = "wx0123456789abcdef", aes_key = string.rep("a", 43),
      openid = "oStaffMember000001" })
    local reply = wx:send(c, { MsgType = "text", Content = "hi" })
    assert.equal("colour v2", reply.Content)
    wx = testing.wechat({ token = "t0ken", appid = "wx0123456789abcdef", aes_key = string.rep("a", 43),
      openid = "oSomebodyElse00001" })
    assert.equal("colour nil", wx:send(c, { MsgType = "text", Content = "hi" }).Content)
  end)

  it("refuses malformed gray selectors when the app loads", function()
    local app = require("wxd.app").new()
    assert.has_error(function() app:group({ gray = "v 2" }, function() end) end)
    assert.has_error(function() app:group({ gray = {} }, function() end) end)
  end)
end)
