-- Malformed requests and request-smuggling shapes: 400 and a closed
-- connection, never a handler call. Each is sent whole and again one byte
-- per write, and must give the same outcome both ways.
local H = require "helpers"

local function calls(srv) return tonumber(srv:get("/calls").body) end

-- The five shapes llhttp 8.1 lets through that we refuse ourselves, then
-- classic smuggling and garbage shapes llhttp refuses.
local BAD = {
  ["obs-fold continuation line"] =
    "GET /hello HTTP/1.1\r\nHost: x\r\nX-A: one\r\n two\r\n\r\n",
  ["obs-fold with a tab"] =
    "GET /hello HTTP/1.1\r\nHost: x\r\nX-A: one\r\n\ttwo\r\n\r\n",
  ["request line ended by a bare LF"] =
    "GET /hello HTTP/1.1\nHost: x\r\n\r\n",
  ["header line ended by a bare LF"] =
    "GET /hello HTTP/1.1\r\nHost: x\nX-A: 1\r\n\r\n",
  ["space inside a header name"] =
    "GET /hello HTTP/1.1\r\nHost: x\r\nX A: 1\r\n\r\n",
  ["space before the colon"] =
    "GET /hello HTTP/1.1\r\nHost: x\r\nX-A : 1\r\n\r\n",
  ["Transfer-Encoding on HTTP/1.0"] =
    "POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
  ["Content-Length and Transfer-Encoding together"] =
    "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
  ["two different Content-Lengths"] =
    "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
  ["Transfer-Encoding that does not end in chunked"] =
    "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
  ["bad chunk size"] =
    "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
  ["chunk size line ended by a bare LF"] =
    "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n",
  ["negative Content-Length"] =
    "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
  ["missing Host on HTTP/1.1"] =
    "GET /hello HTTP/1.1\r\n\r\n",
  ["two Host headers"] =
    "GET /hello HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
  ["CR without LF"] =
    "GET /hello HTTP/1.1\r\nHost: x\rX-A: 1\r\n\r\n",
  ["NUL in a header value"] =
    "GET /hello HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n",
  ["garbage request line"] =
    "\1\2\3 nonsense\r\n\r\n",
  ["unsupported HTTP version"] =
    "GET /hello HTTP/2.0\r\nHost: x\r\n\r\n",
  ["request target that is not a path"] =
    "GET hello HTTP/1.1\r\nHost: x\r\n\r\n",
  ["empty header name"] =
    "GET /hello HTTP/1.1\r\nHost: x\r\n: a\r\n\r\n",
  ["two Transfer-Encoding fields"] =
    "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
  ["bytes other than CRLF after chunk data"] =
    "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
  ["chunk data ended by a bare LF"] =
    "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n",
  ["trailers ended by a bare LF"] =
    "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\nGET /orders/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
  ["obs-fold in a trailer"] =
    "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: a\r\n b\r\n\r\n",
  ["space in a trailer name"] =
    "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX T: a\r\n\r\n",
  ["space inside a chunk size"] =
    "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n",
  ["a chunk size of 16 hex digits"] =
    "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0000000000000005\r\nhello\r\n0\r\n\r\n",
}

-- Refused with another status than 400, for the reason given.
local REFUSED = {
  ["a transfer coding other than chunked (501)"] = { 501,
    "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n" },
  ["a chunk extension longer than 4 KiB (413)"] = { 413,
    "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;x=" .. string.rep("a", 5000)
      .. "\r\nhello\r\n0\r\n\r\n" },
  ["whitespace padding the headers past the limit (431)"] = { 431,
    "GET /hello HTTP/1.1\r\nHost: x\r\nX-A:" .. string.rep(" ", 6000) .. "a\r\n\r\n" },
}

describe("malformed requests", function()
  local srv
  setup(function() srv = H.start(H.app("basic")) end)
  teardown(function() srv:stop(); srv:cleanup() end)

  local names = {}
  for name in pairs(BAD) do names[#names + 1] = name end
  table.sort(names)

  for _, name in ipairs(names) do
    for _, split in ipairs({ false, true }) do
      it(name .. (split and ", one byte per write" or ", sent whole"), function()
        local before = calls(srv)
        local out, closed = srv:raw(BAD[name], { split = split })
        local rs = H.parse_responses(out)
        assert.equal(1, #rs, "one response: " .. out)
        assert.equal(400, rs[1].status)
        assert.equal("close", rs[1].headers["connection"])
        assert.is_true(closed, "connection closed")
        assert.equal(before, calls(srv), "no handler ran")
      end)
    end
  end

  local refused = {}
  for name in pairs(REFUSED) do refused[#refused + 1] = name end
  table.sort(refused)
  for _, name in ipairs(refused) do
    for _, split in ipairs({ false, true }) do
      it("refuses " .. name .. (split and ", one byte per write" or ", sent whole"), function()
        local before = calls(srv)
        local out, closed = srv:raw(REFUSED[name][2], { split = split })
        local rs = H.parse_responses(out)
        assert.equal(1, #rs, "one response: " .. out:sub(1, 200))
        assert.equal(REFUSED[name][1], rs[1].status)
        assert.is_true(closed, "connection closed")
        assert.equal(before, calls(srv), "no handler ran")
      end)
    end
  end

  for _, split in ipairs({ false, true }) do
    it("ignores bytes after a Connection: close request" .. (split and ", one byte per write" or ""), function()
      local before = calls(srv)
      local out, closed = srv:raw("GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        .. "GET /orders/smuggled HTTP/1.1\r\nHost: x\r\n\r\n", { split = split })
      local rs = H.parse_responses(out)
      assert.equal(1, #rs)
      assert.equal("hello world\n", rs[1].body)
      assert.equal("close", rs[1].headers["connection"])
      assert.is_true(closed)
      assert.equal(before + 1, calls(srv), "only the first request reached a handler")
    end)

    it("ignores bytes after an HTTP/1.0 request without keep-alive" .. (split and ", one byte per write" or ""), function()
      local before = calls(srv)
      local out, closed = srv:raw("GET /hello HTTP/1.0\r\n\r\nGET /orders/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        { split = split })
      local rs = H.parse_responses(out)
      assert.equal(1, #rs)
      assert.is_true(closed)
      assert.equal(before + 1, calls(srv))
    end)
  end

  it("still serves after all of the above", function()
    assert.equal("hello world\n", srv:get("/hello").body)
  end)
end)
