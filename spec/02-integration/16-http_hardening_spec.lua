-- HTTP hardening: which requests keep a connection alive, memory under
-- pipelining, and the shapes nginx refuses that reached apps (Host,
-- absolute-form targets, control bytes in the target, huge chunk sizes,
-- TRACE). Raw sockets throughout; the app is spec/fixtures/apps/hardening.
local H = require "helpers"
local cjson = require "cjson"
local socket = require "socket"
local wxd = require "wxd"

local function calls(srv) return tonumber(srv:get("/calls").body) end

local SMUGGLED = "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
-- A second request that ends the connection, so a kept-alive one closes.
local SECOND = "GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

describe("keep-alive decisions", function()
  local srv
  setup(function() srv = H.start(H.app("hardening")) end)
  teardown(function() srv:stop(); srv:cleanup() end)

  -- Heads of a first request that must end the connection: whatever
  -- follows is discarded unparsed.
  local CLOSE = {
    ["HTTP/1.0, Connection: close and Proxy-Connection: keep-alive (nginx's proxy_http_version 1.0)"] =
      "GET /hello HTTP/1.0\r\nConnection: close\r\nProxy-Connection: keep-alive\r\n\r\n",
    ["HTTP/1.0, Proxy-Connection: keep-alive alone"] =
      "GET /hello HTTP/1.0\r\nProxy-Connection: keep-alive\r\n\r\n",
    ["HTTP/1.0, Connection: close then Connection: keep-alive"] =
      "GET /hello HTTP/1.0\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n",
    ["HTTP/1.0, Connection: keep-alive then Connection: close"] =
      "GET /hello HTTP/1.0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n",
    ["HTTP/1.0, Connection: close, keep-alive"] =
      "GET /hello HTTP/1.0\r\nConnection: close, keep-alive\r\n\r\n",
    ["HTTP/1.0, Connection: Keep-Alive ,CLOSE"] =
      "GET /hello HTTP/1.0\r\nConnection: Keep-Alive ,CLOSE\r\n\r\n",
    ["HTTP/1.1, Connection: keep-alive then Connection: close"] =
      "GET /hello HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n",
    ["HTTP/1.1, Connection: keep-alive, close"] =
      "GET /hello HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, close\r\n\r\n",
    ["HTTP/1.1, Connection: te,\tClose "] =
      "GET /hello HTTP/1.1\r\nHost: x\r\nConnection: te,\tClose \r\n\r\n",
  }
  -- Heads of a first request that keeps the connection: the next request
  -- is answered too.
  local KEEP = {
    ["HTTP/1.0, Connection: keep-alive"] =
      "GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    ["HTTP/1.0, Connection: x-foo, KEEP-ALIVE"] =
      "GET /hello HTTP/1.0\r\nConnection: x-foo, KEEP-ALIVE\r\n\r\n",
    ["HTTP/1.0, Connection: keep-alive and Proxy-Connection: close"] =
      "GET /hello HTTP/1.0\r\nConnection: keep-alive\r\nProxy-Connection: close\r\n\r\n",
    ["HTTP/1.1 and Proxy-Connection: close"] =
      "GET /hello HTTP/1.1\r\nHost: x\r\nProxy-Connection: close\r\n\r\n",
    ["HTTP/1.1, Connection: closed (not the token close)"] =
      "GET /hello HTTP/1.1\r\nHost: x\r\nConnection: closed\r\n\r\n",
  }

  local function sorted(t)
    local names = {}
    for name in pairs(t) do names[#names + 1] = name end
    table.sort(names)
    return names
  end

  for _, name in ipairs(sorted(CLOSE)) do
    for _, split in ipairs({ false, true }) do
      it("closes after " .. name .. (split and ", one byte per write" or ""), function()
        local before = calls(srv)
        local out, closed = srv:raw(CLOSE[name] .. SMUGGLED, { split = split })
        local rs = H.parse_responses(out)
        assert.equal(1, #rs, "one response: " .. out:sub(1, 300))
        assert.equal("hello\n", rs[1].body)
        assert.equal("close", rs[1].headers["connection"])
        assert.is_true(closed, "connection closed")
        assert.equal(before + 1, calls(srv), "the bytes after it reached no handler")
      end)
    end
  end

  for _, name in ipairs(sorted(KEEP)) do
    for _, split in ipairs({ false, true }) do
      it("keeps the connection after " .. name .. (split and ", one byte per write" or ""), function()
        local out, closed = srv:raw(KEEP[name] .. SECOND, { split = split })
        local rs = H.parse_responses(out)
        assert.equal(2, #rs, "two responses: " .. out:sub(1, 300))
        assert.equal("keep-alive", rs[1].headers["connection"])
        assert.equal(200, rs[2].status)
        assert.equal("close", rs[2].headers["connection"])
        assert.is_true(closed)
      end)
    end
  end
end)

describe("request shapes nginx refuses", function()
  local srv
  setup(function() srv = H.start(H.app("hardening")) end)
  teardown(function() srv:stop(); srv:cleanup() end)

  local function expect_refused(raw, status, split)
    local before = calls(srv)
    local out, closed = srv:raw(raw, { split = split })
    local rs = H.parse_responses(out)
    assert.equal(1, #rs, "one response: " .. out:sub(1, 300))
    assert.equal(status, rs[1].status, rs[1].body)
    assert.equal("close", rs[1].headers["connection"])
    assert.is_true(closed, "connection closed")
    assert.equal(before, calls(srv), "no handler ran")
  end

  local BAD_HOSTS = {
    ["empty"] = "", ["only spaces"] = "   ", ["a slash"] = "a/b", ["a backslash"] = "a\\b",
    ["a space"] = "a b", ["a tab"] = "a\tb", ["two dots"] = "a..b", ["only dots"] = "..",
    ["a port without a host"] = ":8080", ["a control byte"] = "a\1b", ["DEL"] = "a\127b",
  }
  local names = {}
  for name in pairs(BAD_HOSTS) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do
    for _, version in ipairs({ "1.1", "1.0" }) do
      it("400 for a Host with " .. name .. " (HTTP/" .. version .. ")", function()
        expect_refused("GET /hello HTTP/" .. version .. "\r\nHost: " .. BAD_HOSTS[name] .. "\r\n\r\n", 400)
      end)
    end
  end

  it("accepts ordinary Hosts, and HTTP/1.0 without one", function()
    for _, host in ipairs({ "example.com", "Example.COM:8080", "127.0.0.1", "[::1]:8080", "example.com.",
                            "xn--fiqs8s.example", "under_score.example" }) do
      local out = srv:raw("GET /seen HTTP/1.1\r\nHost: " .. host .. "\r\nConnection: close\r\n\r\n")
      local r = H.parse_responses(out)[1]
      assert.equal(200, r.status, host)
      assert.equal(host, cjson.decode(r.body).host)
    end
    -- Whitespace around the value is not part of the host.
    local out = srv:raw("GET /seen HTTP/1.1\r\nHost: \t example.com  \r\nConnection: close\r\n\r\n")
    assert.equal("example.com", cjson.decode(H.parse_responses(out)[1].body).host)
    local r = H.parse_responses((srv:raw("GET /seen HTTP/1.0\r\n\r\n")))[1]
    assert.equal(200, r.status)
    assert.is_nil(cjson.decode(r.body).host)
  end)

  it("400 for HTTP/1.1 without Host, also with an absolute-form target", function()
    expect_refused("GET /hello HTTP/1.1\r\n\r\n", 400)
    expect_refused("GET http://example.com/hello HTTP/1.1\r\n\r\n", 400)
  end)

  for _, target in ipairs({ "http://user@example.com/hello", "http://user:secret@example.com/hello",
                            "https://u:p@example.com", "http://@example.com/hello",
                            "http:///hello", "http://a..b/hello", "http://:80/hello", "http://a\\b/hello" }) do
    it("400 for the absolute-form target " .. target, function()
      expect_refused("GET " .. target .. " HTTP/1.1\r\nHost: example.com\r\n\r\n", 400)
    end)
  end

  it("lets an absolute-form target's authority replace Host (RFC 9112 3.2.2)", function()
    local out = srv:raw("GET http://Real.Example:8080/seen?x=1 HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n")
    local seen = cjson.decode(H.parse_responses(out)[1].body)
    assert.same({ path = "/seen", host = "Real.Example:8080" }, seen)
    -- HTTP/1.0 may omit Host: the authority becomes it.
    out = srv:raw("GET https://real.example/seen HTTP/1.0\r\n\r\n")
    seen = cjson.decode(H.parse_responses(out)[1].body)
    assert.same({ path = "/seen", host = "real.example" }, seen)
    -- Pipelined after it, an origin-form request keeps its own Host.
    out = srv:raw("GET http://a.example/seen HTTP/1.1\r\nHost: b.example\r\n\r\n"
      .. "GET /seen HTTP/1.1\r\nHost: c.example\r\nConnection: close\r\n\r\n")
    local rs = H.parse_responses(out)
    assert.equal("a.example", cjson.decode(rs[1].body).host)
    assert.equal("c.example", cjson.decode(rs[2].body).host)
  end)

  for _, case in ipairs({ { "a tab", "/hel\tlo" }, { "a control byte", "/hel\1lo" },
                          { "an escape byte", "/hel\27lo" }, { "DEL", "/hel\127lo" },
                          { "a tab in the query", "/hello?a=\tb" } }) do
    for _, split in ipairs({ false, true }) do
      it("400 for a request target with " .. case[1] .. (split and ", one byte per write" or ""), function()
        expect_refused("GET " .. case[2] .. " HTTP/1.1\r\nHost: x\r\n\r\n", 400, split)
      end)
    end
  end

  for _, split in ipairs({ false, true }) do
    it("413 at once for a chunk size over the body limit" .. (split and ", one byte per write" or ""), function()
      -- No chunk data follows: the unfixed server waited for it until the
      -- body timeout (60 s), far past the 5 s this read waits.
      expect_refused("POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1001\r\n", 413, split)
    end)
  end

  it("413 at once when the chunk sizes add up to more than the body limit", function()
    expect_refused("POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
      .. "800\r\n" .. string.rep("a", 2048) .. "\r\n801\r\n", 413)
  end)

  it("accepts chunks that add up to exactly the body limit", function()
    local out = srv:raw("POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
      .. "800\r\n" .. string.rep("a", 2048) .. "\r\n800\r\n" .. string.rep("b", 2048) .. "\r\n0\r\n\r\n")
    local r = H.parse_responses(out)[1]
    assert.equal(200, r.status)
    assert.equal(4096, #r.body)
  end)

  local function trace(path)
    local out = srv:raw("TRACE " .. path .. " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    return H.parse_responses(out)[1]
  end

  it("405 for TRACE on an app:any() route", function()
    local r = trace("/any")
    assert.equal(405, r.status)
    assert.equal("any GET\n", srv:get("/any").body)
  end)

  it("405 for TRACE where no route names it, with the methods that are allowed", function()
    local r = trace("/hello")
    assert.equal(405, r.status)
    assert.equal("GET, HEAD", r.headers["allow"])
    assert.equal(405, trace("/nowhere").status)
  end)

  it("routes TRACE to a route that names it", function()
    local r = trace("/traced")
    assert.equal(200, r.status)
    assert.equal("traced TRACE\n", r.body)
  end)
end)
