-- The incremental UTF-8 validator of core/ws.c (through wxd.ws.utf8_valid):
-- the boundaries of RFC 3629's table, compared with an independent decoder.
local ws = require "wxd.ws"

-- An independent check: decode by the RFC 3629 rules, code point by code point.
local function reference(s)
  local i, n = 1, #s
  while i <= n do
    local b = s:byte(i)
    local len, cp, min
    if b < 0x80 then len, cp, min = 1, b, 0
    elseif b >= 0xC0 and b < 0xE0 then len, cp, min = 2, b - 0xC0, 0x80
    elseif b >= 0xE0 and b < 0xF0 then len, cp, min = 3, b - 0xE0, 0x800
    elseif b >= 0xF0 and b < 0xF8 then len, cp, min = 4, b - 0xF0, 0x10000
    else return false end
    if i + len - 1 > n then return false end
    for k = 1, len - 1 do
      local c = s:byte(i + k)
      if c < 0x80 or c > 0xBF then return false end
      cp = cp * 64 + (c - 0x80)
    end
    if cp < min or cp > 0x10FFFF or (cp >= 0xD800 and cp <= 0xDFFF) then return false end
    i = i + len
  end
  return true
end

describe("websocket utf-8 validation", function()
  it("agrees with a reference decoder on every 1- and 2-byte string and the 3- and 4-byte lead bytes", function()
    for a = 0, 255 do
      local s = string.char(a)
      assert.equal(reference(s), ws.utf8_valid(s), string.format("%02x", a))
      for b = 0, 255 do
        local t = string.char(a, b)
        assert.equal(reference(t), ws.utf8_valid(t), string.format("%02x %02x", a, b))
      end
    end
    for _, first in ipairs({ 0xE0, 0xE1, 0xEC, 0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5 }) do
      for second = 0x70, 0xC0 do
        for _, third in ipairs({ 0x7F, 0x80, 0xBF, 0xC0 }) do
          local s3 = string.char(first, second, third)
          assert.equal(reference(s3), ws.utf8_valid(s3), string.format("%02x %02x %02x", first, second, third))
          local s4 = s3 .. "\x80"
          assert.equal(reference(s4), ws.utf8_valid(s4), string.format("%02x %02x %02x 80", first, second, third))
        end
      end
    end
  end)

  it("refuses a code point cut at the end", function()
    assert.is_false(ws.utf8_valid("ok\xf0\x9f\x98"))
    assert.is_true(ws.utf8_valid("ok\xf0\x9f\x98\x80"))
  end)
end)
