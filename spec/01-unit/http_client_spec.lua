-- wxd.http without a peer: argument checks, URL parsing, errors that need
-- no server (refused connections, unknown names, unusable TLS settings),
-- where it may wait, and the pool's limits. Real peers: 10-http_client_spec.
local H = require "helpers"
local wxd = require "wxd"
local http = require "wxd.http"
local timer = require "wxd.timer"

describe("wxd.http", function()
  it("is wxd.http", function()
    assert.equal(http, wxd.http)
  end)

  it("parses http and https URLs", function()
    assert.same({ "http", "example.com", 80, "/" }, { http.parse_url("http://Example.COM") })
    assert.same({ "https", "api.weixin.qq.com", 443, "/cgi-bin/token?a=1" },
      { http.parse_url("https://api.weixin.qq.com/cgi-bin/token?a=1#frag") })
    assert.same({ "http", "127.0.0.1", 8080, "/?q" }, { http.parse_url("http://127.0.0.1:8080?q") })
    assert.same({ "https", "::1", 8443, "/x" }, { http.parse_url("https://[::1]:8443/x") })
  end)

  it("raises on malformed URLs and options", function()
    local function raises(pattern, opts)
      local ok, err = pcall(http.request, opts)
      assert.is_false(ok)
      assert.truthy(tostring(err):find(pattern, 1, true), tostring(err))
    end
    raises("options must be a table", nil)
    raises("url must be a string", {})
    raises("http:// or https://", { url = "ftp://x/" })
    raises("http:// or https://", { url = "example.com/path" })
    raises("no valid host", { url = "http:///path" })
    raises("no valid host", { url = "http://exa mple.com/" })
    raises("bad port", { url = "http://x:0/" })
    raises("bad port", { url = "http://x:70000/" })
    raises("user:password@", { url = "http://u:p@x/" })
    raises("spaces or control characters", { url = "http://x/a b" })
    raises("spaces or control characters", { url = "http://x/a\r\nX: y" })
    raises("method must be a token", { url = "http://x/", method = "GET /" })
    raises("not a token", { url = "http://x/", headers = { ["X Y"] = "1" } })
    raises("CR, LF or NUL", { url = "http://x/", headers = { ["X-A"] = "1\r\nX-B: 2" } })
    raises("must be a string, a number or a list", { url = "http://x/", headers = { ["X-A"] = true } })
    raises("body must be a string", { url = "http://x/", body = 42 })
    raises("timeout.read must be", { url = "http://x/", timeout = { read = 0 } })
    raises("timeout must be seconds", { url = "http://x/", timeout = "5" })
    raises("max_body", { url = "http://x/", max_body = -1 })
    raises("verify must be a boolean", { url = "https://x/", verify = "no" })
    raises("client_cert must be", { url = "https://x/", client_cert = { cert = "pem only" } })
    raises("follow_redirects must be a boolean", { url = "http://127.0.0.1:1/", follow_redirects = 1 })
    local ok, err = pcall(http.configure, { max_conns_per_host = 0 })
    assert.is_false(ok)
    assert.truthy(err:find("max_conns_per_host", 1, true))
    ok, err = pcall(http.configure, { pool_size = 3 })
    assert.is_false(ok)
    assert.truthy(err:find("unknown limit", 1, true))
  end)

  it("waits only where a wxd coroutine can yield", function()
    local ok, err = pcall(coroutine.wrap(function() return http.get("http://127.0.0.1:1/") end))
    assert.is_false(ok)
    assert.truthy(err:find("wxd.http: cannot wait here", 1, true), err)
    ok, err = pcall(string.gsub, "x", "x", function() http.get("http://127.0.0.1:1/") end)
    assert.is_false(ok)
    assert.truthy(err:find("cannot wait here", 1, true), err)
  end)

  it("returns connect for a refused connection and dns for an unknown name", function()
    local res, err, detail = http.get("http://127.0.0.1:" .. H.free_port() .. "/")
    assert.is_nil(res)
    assert.equal("connect", err)
    assert.truthy(detail:find("connection refused", 1, true), detail)
    res, err, detail = http.get("http://no-such-host.invalid/secret-path?token=abc")
    assert.is_nil(res)
    assert.equal("dns", err)
    assert.truthy(detail:find("no-such-host.invalid", 1, true), detail)
    assert.is_nil(detail:find("token", 1, true), "no path or query in errors")
  end)

  it("returns tls for unusable TLS settings, without a secret in the detail", function()
    local _, err, detail = http.get("https://127.0.0.1:1/", { ca_file = "/nonexistent/ca.pem" })
    assert.equal("tls", err)
    assert.truthy(detail:find("cannot read ca_file /nonexistent/ca.pem", 1, true), detail)
    _, err, detail = http.get("https://127.0.0.1:1/", { client_cert = { pkcs12 = "not a bundle", passphrase = "s3cret" } })
    assert.equal("tls", err)
    assert.truthy(detail:find("PKCS#12", 1, true), detail)
    assert.is_nil(detail:find("s3cret", 1, true))
    _, err, detail = http.get("https://127.0.0.1:1/", { client_cert = { cert = "x", key = "-----BEGIN PRIVATE KEY-----" } })
    assert.equal("tls", err)
    assert.truthy(detail:find("client certificate", 1, true), detail)
  end)

  it("works in timers: their runs are wxd coroutines", function()
    local got
    timer.after(0, function() got = { http.get("http://127.0.0.1:1/") } end)
    H.wait_until(function() return got end, 5, "the timer's request")
    assert.equal("connect", got[2])
  end)

  it("reports its pool and takes new limits", function()
    local s = http.stats()
    for _, k in ipairs { "requests", "queued", "connections", "idle", "opened", "reused" } do
      assert.equal("number", type(s[k]), k)
    end
    http.configure { max_idle_per_host = 4, max_conns_per_host = 8, idle_timeout = 1.5, dns_ttl = 2 }
    s = http.stats()
    assert.equal(4, s.max_idle_per_host)
    assert.equal(8, s.max_conns_per_host)
    assert.equal(1500, s.idle_timeout_ms)
    assert.equal(2000, s.dns_ttl_ms)
    http.configure { max_idle_per_host = 16, max_conns_per_host = 256, idle_timeout = 60, dns_ttl = 30 }
    assert.equal(0, http.stats().requests)
  end)
end)
