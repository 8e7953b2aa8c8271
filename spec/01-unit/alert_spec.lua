-- wxd.alert's parts that need no server: the config section's checks, the
-- markdown it writes (fields in order, one line each, cut to WeCom's 4096
-- bytes at a character boundary), and send() without a config.
local alert = require "wxd.alert"

local URL = "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=693a91f6-7xxx"

describe("wxd.alert", function()
  it("completes a config section with the defaults", function()
    local s = assert(alert.settings({ webhook = URL }))
    assert.equal(60, s.window)
    assert.equal(10, s.wait)
    assert.equal(20, s.rate)
    assert.equal(60, s.rate_period)
    assert.is_false(s.on_breaker_open)
    assert.is_false(s.on_upstream_failure)
    -- The robot's id in the store is a hash: the key is a secret.
    assert.equal(16, #s.robot)
    assert.is_nil(s.robot:find("693a91f6", 1, true))
  end)

  it("refuses a bad section, naming the key", function()
    local cases = {
      { { window = 60 }, "config.alert.webhook" },
      { { webhook = "ftp://x" }, "config.alert.webhook" },
      { { webhook = URL, window = 0 }, "config.alert.window" },
      { { webhook = URL, rate = "20" }, "config.alert.rate" },
      { { webhook = URL, on_breaker_open = "yes" }, "config.alert.on_breaker_open" },
      { { webhook = URL, windw = 60 }, "config.alert.windw: unknown key" },
    }
    for _, c in ipairs(cases) do
      local s, err = alert.settings(c[1])
      assert.is_nil(s)
      assert.truthy(err:find(c[2], 1, true), err)
    end
  end)

  it("writes the fields in a fixed order, one line each", function()
    local c = alert.content("upstream:api.example.com:443", 1000, {
      at = 1796342400, title = "upstream failing", text = "see **the runbook**",
      fields = { zone = "sh", trace_id = "4bf92f3577b34da6a3ce929d0e0e4736", url = "https://api.example.com/x",
        errcode = -1, status = 503, error = "line one\nline two", count = 5 },
    }, "node-1")
    assert.equal(table.concat({
      '## <font color="warning">upstream failing</font>',
      "> count: **1000** since 2026-12-04 00:00:00 UTC",
      "> key: upstream:api.example.com:443",
      "> url: https://api.example.com/x",
      "> errcode: -1",
      "> status: 503",
      "> error: line one line two",
      "> trace_id: 4bf92f3577b34da6a3ce929d0e0e4736",
      "> zone: sh",
      "> source: node-1",
      "",
      "see **the runbook**",
    }, "\n"), c)
  end)

  it("cuts at a character boundary within 4096 bytes, and cleans invalid UTF-8", function()
    for pad = 0, 3 do
      local c = alert.content("k", 1, { at = 0, text = string.rep("x", pad) .. string.rep("告", 2000) }, "n")
      assert.is_true(#c <= 4096, #c)
      assert.is_true(#c >= 4090)
      assert.truthy(c:find("…(truncated)", 1, true))
      -- Every 告 whole: the bytes before the mark are whole characters.
      local body = c:sub(1, c:find("\n…(truncated)", 1, true) - 1)
      local tail = body:match("x*([^x]*)$")
      assert.equal(0, #tail:match("告*$") % 3)
    end
    local c = alert.content("k", 1, { at = 0, text = "bad \255 byte" }, "n")
    assert.truthy(c:find("bad \239\191\189 byte", 1, true)) -- U+FFFD
  end)

  it("has the breaker hook called once per opening, with the failing results", function()
    local retry, breaker = require "wxd.retry", require "wxd.breaker"
    local b = breaker.new("alert_unit_" .. os.time(), { failures = 2, cooldown = 0.05 })
    local seen = {}
    retry.on_breaker_open = function(c, url, res, err) seen[#seen + 1] = { c:stats().name, url, res, err } end
    local function fails() return nil, "timeout" end
    for _ = 1, 4 do b:call(fails) end -- opens on the 2nd; the 3rd and 4th are refused
    assert.equal(1, #seen)
    assert.same({ b.name, nil, nil, "timeout" }, seen[1])
    require("wxd").sleep(60)
    b:call(fails) -- the probe fails: open again
    assert.equal(2, #seen)
    -- By hand: report returns the state only.
    assert.equal("closed", (b:reset()) and b:state())
    local ok, probe = b:allow()
    assert.is_true(ok)
    assert.equal("closed", b:report(false, probe))
    retry.on_breaker_open = nil
  end)

  it("says not configured without an alert section", function()
    assert.same({ nil, "not configured" }, { alert.send{ key = "x" } })
    assert.has_error(function() alert.send{ key = "" } end, "wxd.alert: key must be a string of 1..200 bytes")
    assert.has_error(function() alert.send("x") end, "wxd.alert: send needs a table")
  end)
end)
