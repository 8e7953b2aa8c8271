-- The library's own metrics, read from wxd.metrics.render() in wxd script
-- (the same registry GET /metrics shows): Official Account messages by type
-- and outcome, Redis commands and errors, and the "other" fallback that
-- bounds labels fed from data.
local mp = require "wxd.mp"
local testing = require "wxd.testing"
local metrics = require "wxd.metrics"
local C = require "fixtures.mp.conf"
local H = require "helpers"

-- The value of the sample whose line starts with `prefix` (name and labels).
local function sample(prefix)
  for line in metrics.render():gmatch("[^\n]+") do
    if line:sub(1, #prefix) == prefix then return tonumber(line:sub(#prefix + 2)) end
  end
  return nil
end

describe("library metrics", function()
  it("count Official Account messages: handled, duplicate, no_handler, refused by reason", function()
    local appid = "wxobsmetrics"
    local app = require("wxd.app").new()
    app:mp("/wx", { token = C.token, appid = appid }, { text = function() return mp.reply.text("hi") end })
    local wx = testing.wechat({ token = C.token, appid = appid, mode = "plaintext" })
    local function count(t, outcome, reason)
      return sample('wxd_mp_messages_total{type="' .. t .. '",outcome="' .. outcome .. '",reason="'
        .. (reason or "") .. '"}') or 0
    end
    local h0, d0, n0 = count("text", "handled"), count("text", "duplicate"), count("image", "no_handler")
    local r0 = count("", "refused", "bad signature")
    local req = wx:request({ MsgType = "text", Content = "x" })
    for _ = 1, 3 do assert.equal(200, (app:handle(req))) end
    assert.equal(200, (app:handle(wx:request({ MsgType = "image", PicUrl = "http://x/1.jpg", MediaId = "m" }))))
    local bad = wx:request({ MsgType = "text", Content = "y" })
    bad.query_string = bad.query_string:gsub("signature=%x+", "signature=00")
    assert.equal(403, (app:handle(bad)))
    assert.equal(h0 + 1, count("text", "handled"))
    assert.equal(d0 + 2, count("text", "duplicate"))
    assert.equal(n0 + 1, count("image", "no_handler"))
    assert.equal(r0 + 1, count("", "refused", "bad signature"))
  end)

  it("count Redis commands, pipelined ones each, and errors by kind", function()
    local r = require("wxd.redis").new(H.redis_url())
    local function n(name) return sample(name) or 0 end
    local set0, get0, incr0 = n('wxd_redis_commands_total{command="set"}'), n('wxd_redis_commands_total{command="get"}'),
      n('wxd_redis_commands_total{command="incr"}')
    local reply0 = n('wxd_redis_errors_total{command="incr",kind="reply"}')
    assert.truthy(r:call("SET", "obs:metrics:k", "text"))
    assert.truthy(r:call("GET", "obs:metrics:k"))
    assert.is_nil((r:call("INCR", "obs:metrics:k"))) -- not an integer: an error reply
    assert.truthy(r:pipeline({ { "GET", "obs:metrics:k" }, { "SET", "obs:metrics:k", "1" }, { "INCR", "obs:metrics:k" } }))
    assert.equal(set0 + 2, n('wxd_redis_commands_total{command="set"}'))
    assert.equal(get0 + 2, n('wxd_redis_commands_total{command="get"}'))
    assert.equal(incr0 + 2, n('wxd_redis_commands_total{command="incr"}'))
    assert.equal(reply0 + 1, n('wxd_redis_errors_total{command="incr",kind="reply"}'))
    r:call("DEL", "obs:metrics:k")
  end)

  it("count a data-fed label past its limit under \"other\" instead of raising", function()
    local m = metrics.builtin("counter", "obs_unit_hosts_total", "test", { "host" }, { max_series = 3 })
    for _, h in ipairs({ "a", "b", "c", "d", "e" }) do metrics.count(m, { h }) end
    -- "other" is declared first: it, a and b are the 3 label sets.
    assert.equal(1, sample('obs_unit_hosts_total{host="a"}'))
    assert.equal(1, sample('obs_unit_hosts_total{host="b"}'))
    assert.is_nil(sample('obs_unit_hosts_total{host="c"}'))
    assert.equal(3, sample('obs_unit_hosts_total{host="other"}'))
  end)

  it("resolve a series once for a hot path (series, add), \"other\" past the limit", function()
    local m = metrics.builtin("counter", "obs_unit_paths_total", "test", { "path" }, { max_series = 2 })
    local a, a_other = metrics.series(m, { "/a" })
    assert.is_false(a_other)
    metrics.add(a)
    metrics.add(a, 2)
    assert.equal(3, sample('obs_unit_paths_total{path="/a"}'))
    local b, b_other = metrics.series(m, { "/b" }) -- "other" and "/a" fill the 2
    assert.is_true(b_other)
    metrics.add(b)
    assert.is_nil(sample('obs_unit_paths_total{path="/b"}'))
    assert.equal(1, sample('obs_unit_paths_total{path="other"}'))
  end)

  it("count Official Account messages past the metric's 500 label sets as \"other\"", function()
    local app = require("wxd.app").new()
    local appid = "wxobsmany000001"
    app:mp("/wx", { token = C.token, appid = appid }, { default = function() return nil end })
    local wx = testing.wechat({ token = C.token, appid = appid, mode = "plaintext" })
    for i = 1, 520 do
      assert.equal(200, (app:handle(wx:request({ MsgType = "t" .. i, Content = "x" }))))
    end
    assert.equal(1, sample('wxd_mp_messages_total{type="t1",outcome="handled",reason=""}'))
    assert.is_nil(sample('wxd_mp_messages_total{type="t520",outcome="handled",reason=""}'))
    assert.is_true(sample('wxd_mp_messages_total{type="other",outcome="other",reason="other"}') >= 20)
  end)
end)

describe("WeChat API metrics", function()
  local wechat = require "wxd.wechat"
  local http = require "wxd.http"
  local cjson = require "cjson"
  local fake

  setup(function() fake = H.start(H.app("fakewx"), { workers = 1 }) end)
  teardown(function()
    fake:stop()
    fake:cleanup()
  end)

  it("count calls by API, outcome and errcode, and token refreshes", function()
    local base = "http://127.0.0.1:" .. fake.port
    local c = wechat.client({ appid = "wxfake0000000001", secret = "fake-secret-0123456789", api_base = base,
      background = false })
    local function n(s) return sample(s) or 0 end
    local api = "/cgi-bin/get_api_domain_ip"
    local ok0 = n('wxd_wechat_api_calls_total{api="' .. api .. '",outcome="ok",errcode="0"}')
    local e0 = n('wxd_wechat_api_calls_total{api="' .. api .. '",outcome="wechat",errcode="45009"}')
    local r0 = n('wxd_wechat_token_refreshes_total{credential="access_token",trigger="blocking",result="ok"}')
    assert.truthy(c:get(api))
    assert.truthy(c:get(api))
    local res = http.request({ method = "POST", url = base .. "/_ctl/config",
      body = cjson.encode({ fail = { errcode = 45009, errmsg = "limit", times = 1 } }) })
    assert.equal(200, res.status)
    local data, err, info = c:get(api)
    assert.is_nil(data)
    assert.equal("wechat", err)
    assert.equal(45009, info.errcode)
    assert.equal(ok0 + 2, n('wxd_wechat_api_calls_total{api="' .. api .. '",outcome="ok",errcode="0"}'))
    assert.equal(e0 + 1, n('wxd_wechat_api_calls_total{api="' .. api .. '",outcome="wechat",errcode="45009"}'))
    assert.equal(r0 + 1, n('wxd_wechat_token_refreshes_total{credential="access_token",trigger="blocking",result="ok"}'))
  end)
end)
