-- shdict rewrites a value in place when the entry's memory charge does not
-- change. The charge is rounded up to 16 bytes, so a value a few bytes
-- longer can have the same charge as the one it replaces while its entry's
-- allocation is exact: the rewrite wrote past the end of it (found by make
-- asan through wxd.pay's specs, which replace JSON records of varying size).
local shdict = require "wxd.shdict"

describe("shdict set over a value of the same charge", function()
  it("keeps every length right when a value grows or shrinks by a few bytes", function()
    local d = shdict.declare("inplace_spec", "1m")
    for len = 0, 64 do
      for grow = -15, 15 do
        if len + grow >= 0 then
          local a, b = ("a"):rep(len), ("b"):rep(len + grow)
          assert.is_true(d:set("k", a))
          assert.is_true(d:set("k", b))
          assert.equal(b, d:get("k"))
          assert.is_true(d:set("k" .. len, a, 60)) -- and with a TTL
          assert.is_true(d:set("k" .. len, b, 60))
          assert.equal(b, d:get("k" .. len))
        end
      end
    end
  end)
end)
