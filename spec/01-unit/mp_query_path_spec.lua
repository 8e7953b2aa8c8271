-- wxd.mp reads an encrypted XML message's query string in C
-- (wx_open_query) instead of building req.query. Every request must get
-- exactly what the general path (the query table, check_query, wx_open)
-- gives it: the same status, the same refusal, the same handler runs.
-- Each case runs twice, once as it comes (the C path) and once with
-- req.query built by a before-middleware (which sends it down the
-- general path), and the answers are compared.
local mp = require "wxd.mp"
local app_mod = require "wxd.app"
local testing = require "wxd.testing"
local core = require "wxd.core"
local C = require "fixtures.mp.conf"

local APPID = "wxquerypath00001"
local CORP = "wwquerypath00001"

local calls = 0
local function new_app(cfg)
  local app = app_mod.new()
  app:before(function(req)
    if req.headers["x-general"] then local _ = req.query end
  end)
  app:mp("/wx", cfg, { default = function(msg)
    calls = calls + 1
    return "echo " .. tostring(msg.Content)
  end })
  return app
end

local SENDERS = {
  mp = { app = new_app({ token = C.token, appid = APPID, aes_key = C.key1 }),
         sender = testing.wechat({ token = C.token, appid = APPID, aes_key = C.key1, mode = "safe" }) },
  compatible = { app = new_app({ token = C.token, appid = APPID, aes_key = C.key1 }),
         sender = testing.wechat({ token = C.token, appid = APPID, aes_key = C.key1, mode = "compatible" }) },
  wecom = { app = new_app({ token = C.token, corp_id = CORP, aes_key = C.key1, kind = "wecom" }),
         sender = testing.wechat({ token = C.token, corp_id = CORP, aes_key = C.key1, kind = "wecom", mode = "safe" }) },
}

local seq = 0
local function message()
  seq = seq + 1
  return { MsgType = "text", Content = "m" .. seq, MsgId = tostring(7000000000 + seq) }
end

local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = type(v) == "table" and copy(v) or v end
  return c
end

-- Runs raw both ways and compares; returns the status.
local function same_both_ways(s, raw, label)
  local general = copy(raw)
  general.headers["x-general"] = "1"
  local c0 = calls
  local st1, _, body1 = s.app:handle(copy(raw))
  local c1 = calls
  local st2, _, body2 = s.app:handle(general)
  local c2 = calls
  assert.equal(st2, st1, label .. ": status (general path first)")
  if st1 == 200 then
    -- A reply is sealed with a fresh nonce: compare what it says. The
    -- second delivery is a duplicate of the first and gets its reply.
    local r1 = s.sender:open_reply(body1)
    local r2 = s.sender:open_reply(body2)
    assert.same(r2, r1, label .. ": reply")
  else
    assert.equal(body2, body1, label .. ": body")
  end
  assert.equal(0, c2 - c1, label .. ": the handler ran twice for one message")
  assert.is_true(c1 - c0 <= 1, label)
  return st1, c1 - c0
end

local function set_param(qs, name, value)
  local out, found = {}, false
  for pair in qs:gmatch("[^&]+") do
    local k = pair:match("^([^=]*)")
    if k == name then
      found = true
      if value ~= nil then out[#out + 1] = name .. "=" .. value end
    else
      out[#out + 1] = pair
    end
  end
  if not found and value ~= nil then out[#out + 1] = name .. "=" .. value end
  return table.concat(out, "&")
end

local function param(qs, name) return qs:match("[?&]?" .. name .. "=([^&]*)") end

-- A request, its query string changed by f(qs) -> qs.
local function case(s, f, opts)
  local raw = s.sender:request(message(), opts)
  raw.query_string = f(raw.query_string)
  return raw
end

describe("wxd.mp's query string path (wx_open_query)", function()
  it("keeps wxd.app's limit on query pairs", function()
    assert.equal(app_mod.MAX_PARAMS, mp._MAX_QUERY_PARAMS)
  end)

  it("is the path a usual message takes, and declines other modes", function()
    local native = require "wxd.core.crypto"
    local s = SENDERS.mp
    local raw = s.sender:request(message())
    local function open(qs, wecom)
      return native.wx_open_query(C.token, qs, raw.body, APPID, { mp.aes_key(C.key1).key }, 65536, 10, 1000,
        { item = true }, core.now(), 300, 1000, wecom)
    end
    local m, root, key_index, compatible, id = open(raw.query_string)
    assert.equal("table", type(m))
    assert.equal("xml", root)
    assert.equal("text", m.MsgType)
    assert.equal(1, key_index)
    assert.is_false(compatible)
    assert.matches("^m:%x+$", id)
    assert.is_false(open(set_param(raw.query_string, "encrypt_type", "raw")))
    assert.is_false(open(set_param(raw.query_string, "encrypt_type", nil)))
    assert.is_false(open(set_param(raw.query_string, "encrypt_type", "raw"), true))
    local no, why, status = open(set_param(raw.query_string, "nonce", "1"))
    assert.same({ nil, "bad msg_signature", 403 }, { no, why, status })
  end)

  it("takes the usual message, and runs its handler once", function()
    for name, s in pairs(SENDERS) do
      local st, ran = same_both_ways(s, (s.sender:request(message())), name)
      assert.equal(200, st)
      assert.equal(1, ran)
    end
  end)

  it("answers every mangled query string as the general path does", function()
    local seen = {}
    local function check(name, s, label, f, opts)
      local st = same_both_ways(s, case(s, f, opts), name .. ": " .. label)
      seen[st] = true
    end
    for name, s in pairs(SENDERS) do
      for _, p in ipairs({ "msg_signature", "timestamp", "nonce", "encrypt_type", "signature", "openid" }) do
        check(name, s, "without " .. p, function(qs) return set_param(qs, p, nil) end)
        check(name, s, "empty " .. p, function(qs) return set_param(qs, p, "") end)
        check(name, s, "bare " .. p, function(qs) return set_param(qs, p, nil) .. "&" .. p end)
        check(name, s, p .. " given twice, a wrong one last", function(qs) return qs .. "&" .. p .. "=1" end)
        check(name, s, p .. " given twice, the right one last", function(qs)
          local v = param(qs, p)
          return v and (p .. "=2&" .. qs) or qs
        end)
        check(name, s, p .. " name percent-encoded", function(qs)
          return (qs:gsub("([&]?)" .. p .. "=", function(amp)
            return amp .. "%" .. string.format("%02X", p:byte(1)) .. p:sub(2) .. "="
          end, 1))
        end)
        check(name, s, p .. " name with '+'", function(qs) return (qs:gsub(p .. "=", p .. "+=", 1)) end)
        check(name, s, p .. " 4096 bytes", function(qs) return set_param(qs, p, string.rep("1", 4096)) end)
        check(name, s, p .. " 4097 bytes", function(qs) return set_param(qs, p, string.rep("1", 4097)) end)
        check(name, s, p .. " 4097 bytes once decoded from more", function(qs)
          return set_param(qs, p, string.rep("%31", 4097))
        end)
      end
      for _, v in ipairs({ "aes", "raw", "AES", "aes%20", "a%65s", "aes+", "", "xyz", "aes&encrypt_type=raw" }) do
        check(name, s, "encrypt_type=" .. v, function(qs) return set_param(qs, "encrypt_type", v) end)
      end
      for _, ts in ipairs({ "12a", "-1", "1e9", " 1", "%31", "0", "999999999999", "9999999999999",
                            tostring(math.floor(core.now()) - 1000), tostring(math.floor(core.now()) + 299) }) do
        check(name, s, "timestamp=" .. ts, function(qs) return set_param(qs, "timestamp", ts) end)
      end
      for _, n in ipairs({ 128, 129, 5000 }) do
        check(name, s, "nonce of " .. n, function(qs) return qs end, { nonce = string.rep("7", n) })
      end
      check(name, s, "a nonce with '+' and escapes", function(qs) return qs end, { nonce = "a b%2Bc" })
      check(name, s, "1000 pairs before the real ones", function(qs) return string.rep("x=1&", 1000) .. qs end)
      check(name, s, "999 pairs before the real ones", function(qs) return string.rep("x=1&", 999) .. qs end)
      check(name, s, "empty pairs and names", function(qs) return "&&=1&" .. qs:gsub("&", "&&") .. "&" end)
      check(name, s, "a signature of 41 bytes", function(qs)
        return set_param(qs, "msg_signature", (param(qs, "msg_signature") or "") .. "0")
      end)
      check(name, s, "a signature in upper case", function(qs)
        return set_param(qs, "msg_signature", (param(qs, "msg_signature") or ""):upper())
      end)
    end
    assert.is_true(seen[200] and seen[400] and seen[403], "the cases cover success and both refusals")
  end)

  it("answers random byte changes of the query string as the general path does", function()
    local rnd = require("wxd.crypto").random_bytes
    local alphabet = "=&%+0123456789abcdefAES_ntyp"
    for i = 1, 600 do
      local s = i % 3 == 0 and SENDERS.wecom or SENDERS.mp
      local raw = s.sender:request(message())
      local qs = raw.query_string
      local r = rnd(4)
      local at = r:byte(1) * 256 + r:byte(2)
      at = at % #qs + 1
      local k = r:byte(3) % #alphabet + 1
      if r:byte(4) % 2 == 0 then
        qs = qs:sub(1, at - 1) .. alphabet:sub(k, k) .. qs:sub(at + 1)
      else
        qs = qs:sub(1, at - 1) .. alphabet:sub(k, k) .. qs:sub(at)
      end
      raw.query_string = qs
      same_both_ways(s, raw, "mutation " .. i .. " (" .. qs .. ")")
    end
  end)
end)
