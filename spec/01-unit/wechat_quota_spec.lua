-- wxd.wechat's outbound quotas against the fake WeChat API server: calls
-- over the quota are held back here (WeChat sees nothing of them), wait
-- for their turn within quota.wait, or fail fast with "quota".
local H = require "helpers"
local wechat = require "wxd.wechat"
local http = require "wxd.http"
local cjson = require "cjson"
local store = require "wxd.store"

local APPID, SECRET = "wxfake0000000001", "fake-secret-0123456789"

describe("wxd.wechat quotas", function()
  local fake, base
  local n = 0

  local function ctl(method, path)
    local res = assert(http.request({ method = method, url = base .. path }))
    assert.equal(200, res.status, res.body)
    return cjson.decode(res.body)
  end

  -- A client of its own each time (check_ms makes it distinct), with its
  -- quotas reset: they are per appid and live as long as the process.
  local function client(quota)
    n = n + 1
    for _, k in ipairs({ "access_token", "access_token:bad", "ticket:jsapi", "ticket:wx_card", "force_gap" }) do
      store.delete("wxd:wechat:" .. APPID .. ":" .. k)
    end
    local c = wechat.client({ appid = APPID, secret = SECRET, api_base = base, background = false, quota = quota,
      check_ms = 2000 + n })
    if c.quota then
      c.quota.appid_limiter:reset(APPID)
      for _, path in ipairs({ "/cgi-bin/get_api_domain_ip", "/cgi-bin/ticket/getticket" }) do
        c.quota.api_limiter:reset(path)
      end
    end
    return c
  end

  setup(function()
    fake = H.start(H.app("fakewx"), { workers = 1 })
    base = "http://127.0.0.1:" .. fake.port
  end)
  teardown(function()
    fake:stop()
    fake:cleanup()
  end)
  before_each(function() ctl("POST", "/_ctl/reset") end)

  it("fails fast over the per-API quota without calling WeChat", function()
    local c = client({ api = { rate = 0.5, burst = 2 }, wait = 0 })
    assert(c:access_token())
    assert(c:get("/cgi-bin/get_api_domain_ip"))
    assert(c:get("/cgi-bin/get_api_domain_ip"))
    local data, err, info = c:get("/cgi-bin/get_api_domain_ip")
    assert.is_nil(data)
    assert.equal("quota", err)
    assert.equal("api", info.scope)
    assert.truthy(info.retry_after > 1 and info.retry_after <= 2, tostring(info.retry_after))
    assert.equal(2, tonumber(ctl("GET", "/_ctl/counts").api))
    assert.equal(1, c:stats().quota_refusals)
    -- another API has its own quota
    assert(c:call("GET", "/cgi-bin/ticket/getticket", { query = { type = "jsapi" } }))
  end)

  it("the per-appid quota covers every API of the appid", function()
    local c = client({ appid = { rate = 0.5, burst = 2 }, wait = 0 })
    assert(c:access_token())
    assert(c:get("/cgi-bin/get_api_domain_ip"))
    assert(c:call("GET", "/cgi-bin/ticket/getticket", { query = { type = "jsapi" } }))
    local _, err, info = c:call("GET", "/cgi-bin/other")
    assert.equal("quota", err)
    assert.equal("appid", info.scope)
  end)

  it("queues a call briefly when its turn comes within quota.wait", function()
    local c = client({ api = { rate = 20, burst = 1 }, wait = 1 })
    assert(c:access_token())
    for _ = 1, 3 do assert(c:get("/cgi-bin/get_api_domain_ip")) end
    assert.equal(2, c:stats().quota_waits)
    assert.equal(3, tonumber(ctl("GET", "/_ctl/counts").api))
  end)

  it("quota = false: no limiter; a bad quota raises", function()
    local c = client(false)
    assert.is_nil(c.quota)
    assert.has_error(function() client({ api = { rate = "x" } }) end)
    assert.has_error(function() client(5) end)
  end)
end)
