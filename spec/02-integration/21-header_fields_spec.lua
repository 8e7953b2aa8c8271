-- Header fields as the server and the client collect them (core/hdrs.c):
-- pieces of a name or value joined, names in lower case, repeats joined,
-- the bounds on fields and bytes exactly where they were. Raw sockets for
-- the server (spec/fixtures/apps/basic and hardening), the raw peer of
-- spec/fixtures/apps/upstream for the client.
local H = require "helpers"
local cjson = require "cjson"
local http = require "wxd.http"

--- `n` header lines X1: 1 .. Xn: 1.
local function extra_fields(n)
  local t = {}
  for i = 1, n do t[i] = "X" .. i .. ": 1\r\n" end
  return table.concat(t)
end

local function one_response(out)
  local rs = H.parse_responses(out)
  assert.equal(1, #rs, "exactly one response in: " .. out)
  return rs[1]
end

describe("server header fields (basic app: max_header_bytes 2048)", function()
  local srv
  setup(function() srv = H.start(H.app("basic")) end)
  teardown(function() srv:stop(); srv:cleanup() end)

  it("joins names and values that arrive one byte at a time, lower-cases names, joins repeats", function()
    local req = "GET /headers HTTP/1.1\r\nHOST: x\r\nUser-AGENT: piece by piece\r\n"
      .. "X-Multi: a\r\nx-multi: b\r\nConnection: close\r\n\r\n"
    local r = one_response((srv:raw(req, { split = true })))
    assert.equal(200, r.status)
    local seen = cjson.decode(r.body)
    assert.equal("piece by piece", seen.ua)
    assert.equal("a, b", seen.multi)
  end)

  it("drops whitespace after a value (RFC 9110 5.5), also when it arrives one byte at a time", function()
    local req = "GET /headers HTTP/1.1\r\nHost: x\r\nUser-Agent: \t spaced out \t \r\n"
      .. "X-Multi: a \r\nX-Multi: b\t\r\nConnection: close\r\n\r\n"
    for _, split in ipairs({ false, true }) do
      local r = one_response((srv:raw(req, { split = split })))
      assert.equal(200, r.status)
      local seen = cjson.decode(r.body)
      assert.equal("spaced out", seen.ua)
      assert.equal("a, b", seen.multi)
    end
  end)

  it("takes 100 fields and refuses 101 with 431", function()
    local head = "GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    assert.equal(200, one_response((srv:raw(head .. extra_fields(98) .. "\r\n"))).status)
    local r = one_response((srv:raw(head .. extra_fields(99) .. "\r\n")))
    assert.equal(431, r.status)
  end)

  -- Counted: the target, then 4 bytes per field plus its name and value.
  -- /hello (6) + Host: x (4 + 4 + 1) + X-Pad: (4 + 5 + n) = 24 + n.
  it("counts header bytes as before: 2048 pass, 2049 get 431", function()
    local function send(n)
      return one_response((srv:raw("GET /hello HTTP/1.1\r\nHost: x\r\nX-Pad: " .. string.rep("p", n) .. "\r\n\r\n")))
    end
    assert.equal(200, send(2048 - 24).status)
    assert.equal(431, send(2049 - 24).status)
  end)
end)

describe("server header fields with an absolute-form target", function()
  local srv
  setup(function() srv = H.start(H.app("hardening")) end)
  teardown(function() srv:stop(); srv:cleanup() end)

  it("gives the target's authority the 100th field, and refuses a 101st", function()
    local head = "GET http://a.example/seen HTTP/1.0\r\n"
    local r = one_response((srv:raw(head .. extra_fields(99) .. "\r\n")))
    assert.equal(200, r.status)
    assert.same({ path = "/seen", host = "a.example" }, cjson.decode(r.body))
    r = one_response((srv:raw(head .. extra_fields(100) .. "\r\n")))
    assert.equal(431, r.status)
  end)
end)

describe("client header fields (raw peer)", function()
  local peer, base

  setup(function()
    peer = H.raw_peer("canned")
    base = peer.base
  end)
  teardown(function()
    if peer then peer.stop() end
  end)

  it("keeps 256 fields of a response and refuses 257 as too_large", function()
    local res, err, detail = http.get(base .. "/fields-256")
    assert.is_nil(err, detail)
    for i = 1, 255 do assert.equal("v" .. i, res.headers["x-" .. i]) end
    assert.equal("2", res.headers["content-length"])
    res, err, detail = http.get(base .. "/fields-257")
    assert.is_nil(res)
    assert.equal("too_large", err)
    assert.truthy(detail:find("too many response header fields", 1, true), detail)
  end)
end)
