-- Size limits and timeouts (spec/fixtures/apps/basic/config.lua sets them
-- small): each gets its status and a closed connection, never a handler call.
local H = require "helpers"

local function calls(srv) return tonumber(srv:get("/calls").body) end

describe("limits", function()
  local srv
  setup(function() srv = H.start(H.app("basic")) end)
  teardown(function() srv:stop(); srv:cleanup() end)

  local function expect_refused(raw, status, opts)
    local before = calls(srv)
    local out, closed = srv:raw(raw, opts)
    local rs = H.parse_responses(out)
    assert.equal(1, #rs, "exactly one response")
    assert.equal(status, rs[1].status)
    assert.equal("close", rs[1].headers["connection"])
    assert.is_true(closed, "connection closed")
    assert.equal(before, calls(srv), "no handler ran")
  end

  it("431 for too many header bytes", function()
    expect_refused("GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: " .. string.rep("a", 3000) .. "\r\n\r\n", 431)
  end)

  it("431 for too many header fields", function()
    local t = { "GET /hello HTTP/1.1\r\nHost: x\r\n" }
    for i = 1, 120 do t[#t + 1] = "X" .. i .. ": 1\r\n" end
    expect_refused(table.concat(t) .. "\r\n", 431)
  end)

  it("414 for a request target over the limit", function()
    expect_refused("GET /" .. string.rep("a", 600) .. " HTTP/1.1\r\nHost: x\r\n\r\n", 414)
  end)

  it("413 for a declared Content-Length over the limit, before the body is read", function()
    expect_refused("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n", 413)
  end)

  it("413 instead of 100 Continue when the announced body is too large", function()
    expect_refused("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n", 413)
  end)

  it("413 for a chunked body that grows over the limit", function()
    local chunk = string.format("%x\r\n%s\r\n", 3000, string.rep("b", 3000))
    expect_refused("POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" .. chunk .. chunk .. "0\r\n\r\n", 413)
  end)

  it("accepts a body exactly at the limit", function()
    local r = srv:request("POST", "/echo", nil, string.rep("c", 4096))
    assert.equal(200, r.status)
    assert.equal(4096, #r.body)
  end)

  it("408 when headers arrive too slowly (slowloris), then close", function()
    local c = srv:connect()
    c:send("GET /hello HTTP/1.1\r\nHost: x\r\n")
    local t0 = require("socket").gettime()
    local out, closed = H.read_all(c, 5)
    c:close()
    assert.equal(408, H.parse_responses(out)[1].status)
    assert.is_true(closed)
    assert.is_true(require("socket").gettime() - t0 < 4)
  end)

  it("closes a silent new connection after the header timeout, without an answer", function()
    local c = srv:connect()
    local out, closed = H.read_all(c, 5)
    c:close()
    assert.equal("", out)
    assert.is_true(closed)
  end)

  it("408 when the body arrives too slowly, then close", function()
    local before = calls(srv)
    local c = srv:connect()
    c:send("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly part")
    local out, closed = H.read_all(c, 5)
    c:close()
    assert.equal(408, H.parse_responses(out)[1].status)
    assert.is_true(closed)
    assert.equal(before, calls(srv))
  end)

  it("closes an idle keep-alive connection after the idle timeout, silently", function()
    local c = srv:connect()
    c:send("GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    local out, closed = H.read_all(c, 5)
    c:close()
    local rs = H.parse_responses(out)
    assert.equal(1, #rs)
    assert.equal(200, rs[1].status)
    assert.is_true(closed)
  end)

  it("closes after max_requests_per_connection requests", function()
    local reqs = string.rep("GET /hello HTTP/1.1\r\nHost: x\r\n\r\n", 7)
    local out, closed = srv:raw(reqs)
    local rs = H.parse_responses(out)
    assert.equal(5, #rs)
    assert.equal("keep-alive", rs[4].headers["connection"])
    assert.equal("close", rs[5].headers["connection"])
    assert.is_true(closed)
  end)

  it("closes the connection of a client that stops reading (send timeout)", function()
    local c = srv:connect()
    c:send("GET /big?n=30000000 HTTP/1.1\r\nHost: x\r\n\r\n")
    require("wxd").sleep(2500) -- send_timeout_ms is 1000 in the fixture
    local out, closed = H.read_all(c, 5)
    c:close()
    assert.is_true(closed)
    assert.is_true(#out < 30000000, "the response was cut: " .. #out .. " bytes")
  end)

  it("does not cut a slow but steady download at the keep-alive timeout", function()
    local socket = require "socket"
    local c = srv:connect()
    c:send("GET /big?n=4000000 HTTP/1.1\r\nHost: x\r\n\r\n")
    local parts, got, t0 = {}, 0, socket.gettime()
    while got < 4000000 + 100 do
      local data, err, partial = c:receive(65536)
      local piece = data or partial or ""
      parts[#parts + 1] = piece
      got = got + #piece
      if err == "closed" then break end
      if err ~= "timeout" then socket.sleep(0.02) end
      local s = table.concat(parts)
      local head_end = s:find("\r\n\r\n", 1, true)
      if head_end and #s - head_end - 3 >= 4000000 then break end
    end
    c:close()
    local elapsed = socket.gettime() - t0
    local r = H.parse_responses(table.concat(parts))[1]
    assert.equal(4000000, #r.body)
    assert.is_true(elapsed > 1.0, "the download outlasted keepalive_timeout_ms (" .. elapsed .. " s)")
  end)

  it("still serves after all of the above", function()
    assert.equal("hello world\n", srv:get("/hello").body)
  end)
end)
