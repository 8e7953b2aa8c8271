-- HTTP/1.1 behaviour of the core, over raw sockets against a real wxd.
local H = require "helpers"
local cjson = require "cjson"

describe("http server", function()
  local srv
  setup(function() srv = H.start(H.app("basic")) end)
  teardown(function() srv:stop(); srv:cleanup() end)

  it("serves GET with Server, Date, Content-Length and Connection headers", function()
    local r = srv:get("/hello")
    assert.equal(200, r.status)
    assert.equal("hello world\n", r.body)
    assert.equal("wxd", r.headers["server"])
    assert.truthy(r.headers["date"]:match("^%a%a%a, %d%d %a%a%a %d%d%d%d %d%d:%d%d:%d%d GMT$"))
    assert.equal("12", r.headers["content-length"])
    assert.equal("close", r.headers["connection"])
    assert.equal("text/plain; charset=utf-8", r.headers["content-type"])
  end)

  it("encodes a returned table as JSON", function()
    local r = srv:get("/json")
    assert.equal("application/json", r.headers["content-type"])
    assert.same({ message = "hello world" }, cjson.decode(r.body))
  end)

  it("routes params, 404 and 405 with Allow", function()
    assert.same({ id = "a b" }, cjson.decode(srv:get("/orders/a%20b").body))
    assert.equal(404, srv:get("/nope").status)
    local r = srv:request("DELETE", "/hello")
    assert.equal(405, r.status)
    assert.equal("GET, HEAD", r.headers["allow"])
  end)

  it("answers HEAD with the headers of GET and no body", function()
    local r, raw = srv:request("HEAD", "/hello")
    assert.equal(200, r.status)
    assert.equal("12", r.headers["content-length"])
    assert.equal("", r.body)
    assert.truthy(raw:match("\r\n\r\n$"))
  end)

  it("gives headers case-insensitively, joins repeated ones, and tells the remote address", function()
    local out = srv:raw("GET /headers HTTP/1.1\r\nHost: x\r\nUser-Agent: spec\r\nX-Multi: a\r\n"
      .. "x-multi: b\r\nConnection: close\r\n\r\n")
    local body = cjson.decode(H.parse_responses(out)[1].body)
    assert.equal("spec", body.ua)
    assert.equal("a, b", body.multi)
    assert.equal("127.0.0.1", body.remote)
    assert.equal(18, #body.id)
  end)

  it("keeps a connection alive across requests", function()
    local c = srv:connect()
    for i = 1, 3 do
      c:send("GET /orders/" .. i .. " HTTP/1.1\r\nHost: x\r\n\r\n")
      local head = {}
      while true do
        local line = assert(c:receive("*l"))
        if line == "" then break end
        head[#head + 1] = line
      end
      local len = tonumber(table.concat(head, "\n"):match("Content%-Length: (%d+)"))
      assert.equal(string.format('{"id":"%d"}', i), c:receive(len))
      assert.truthy(table.concat(head, "\n"):match("Connection: keep%-alive"))
    end
    c:close()
  end)

  it("answers pipelined requests in order, also when an earlier one waits", function()
    local out = srv:raw("GET /sleep?ms=100 HTTP/1.1\r\nHost: x\r\n\r\n"
      .. "GET /orders/2 HTTP/1.1\r\nHost: x\r\n\r\n"
      .. "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
      .. "GET /orders/4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    local rs = H.parse_responses(out)
    assert.equal(4, #rs)
    assert.equal("slept 100\n", rs[1].body)
    assert.equal('{"id":"2"}', rs[2].body)
    assert.equal("hello", rs[3].body)
    assert.equal('{"id":"4"}', rs[4].body)
  end)

  it("reads Content-Length and chunked request bodies", function()
    local r = srv:request("POST", "/echo", nil, "abc")
    assert.equal("abc", r.body)
    local out = srv:raw("POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
      .. "Connection: close\r\n\r\n3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nTrailer: x\r\n\r\n")
    assert.equal("abcdefg", H.parse_responses(out)[1].body)
  end)

  it("never turns chunked trailers into request headers", function()
    local out = srv:raw("GET /headers HTTP/1.1\r\nHost: x\r\nUser-Agent: real\r\nTransfer-Encoding: chunked\r\n"
      .. "Connection: close\r\n\r\n0\r\nX-Multi: from-trailer\r\nUser-Agent: spoofed\r\nHost: evil\r\n\r\n")
    local body = cjson.decode(H.parse_responses(out)[1].body)
    assert.equal("real", body.ua)
    assert.is_nil(body.multi)
  end)

  it("sends 100 Continue before reading an expected body", function()
    local c = srv:connect()
    c:send("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
    assert.equal("HTTP/1.1 100 Continue", c:receive("*l"))
    assert.equal("", c:receive("*l"))
    c:send("data")
    local rest = H.read_all(c)
    c:close()
    assert.equal("data", H.parse_responses(rest)[1].body)
  end)

  it("refuses an unknown expectation with 417", function()
    local out = srv:raw("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: magic\r\n\r\ndata")
    assert.equal(417, H.parse_responses(out)[1].status)
  end)

  it("streams a chunked response", function()
    local out = srv:raw("GET /stream?n=3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert.truthy(out:match("Transfer%-Encoding: chunked"))
    assert.equal("chunk 1\nchunk 2\nchunk 3\n", H.parse_responses(out)[1].body)
  end)

  it("streams close-delimited to an HTTP/1.0 client", function()
    local out, closed = srv:raw("GET /stream?n=2 HTTP/1.0\r\n\r\n")
    assert.is_true(closed)
    assert.falsy(out:match("chunked"))
    assert.equal("chunk 1\nchunk 2\n", H.parse_responses(out)[1].body)
  end)

  it("answers HEAD to a streaming handler with headers only, and the next pipelined response stays intact", function()
    local out = srv:raw("HEAD /stream?n=2 HTTP/1.1\r\nHost: x\r\n\r\n"
      .. "GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    local head_end = out:find("\r\n\r\n", 1, true)
    assert.truthy(out:sub(1, head_end):match("^HTTP/1.1 200"))
    local rest = out:sub(head_end + 4)
    assert.truthy(rest:match("^HTTP/1.1 200 OK\r\n"), "no chunk data after the HEAD response: " .. rest:sub(1, 40))
    assert.equal("hello world\n", H.parse_responses(rest)[1].body)
  end)

  it("cuts a streamed response short when the handler fails after writing", function()
    local out, closed = srv:raw("GET /stream/fail HTTP/1.1\r\nHost: x\r\n\r\n")
    assert.is_true(closed)
    assert.truthy(out:find("partial\n", 1, true))
    assert.falsy(out:find("\r\n0\r\n\r\n", 1, true), "no clean end of the chunked body")
    assert.falsy(out:find("internal server error", 1, true))
  end)

  it("refuses an interim (1xx) status as a handler's answer", function()
    assert.equal(500, srv:get("/status/100").status)
    assert.equal(500, srv:get("/status/199").status)
    assert.equal(200, srv:get("/status/200").status)
  end)

  it("logs a very long handler error with its request id (truncated, still one JSON line)", function()
    local r = srv:get("/error/long")
    local id = r.body:match("request id (%x+)")
    local line = H.wait_until(function()
      for l in srv:log_text():gmatch("[^\n]+") do
        if l:find('"msg":"handler error"', 1, true) and l:find(id, 1, true) then return l end
      end
    end, 3, "error line")
    local e = cjson.decode(line)
    assert.equal(id, e.id)
    assert.truthy(e.error:find("(truncated)", 1, true))
  end)

  it("sends large bodies whole", function()
    local r = srv:get("/big?n=3000000")
    assert.equal(3000000, #r.body)
  end)

  it("answers 204 and 304 without a body", function()
    local out = srv:raw("GET /status/204 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert.truthy(out:match("^HTTP/1.1 204 No Content\r\n"))
    assert.truthy(out:match("\r\n\r\n$"))
    assert.falsy(out:match("Content%-Length"))
  end)

  it("turns a handler error into a 500 with a request id, logs the traceback, and keeps serving", function()
    local r = srv:get("/error")
    assert.equal(500, r.status)
    local id = r.body:match("request id (%x+)")
    assert.truthy(id)
    H.wait_until(function() return srv:log_text():find(id, 1, true) end, 3, "error log line")
    local line
    for l in srv:log_text():gmatch("[^\n]+") do
      if l:find('"msg":"handler error"', 1, true) and l:find(id, 1, true) then line = l end
    end
    assert.truthy(line, "an error log line with the request id")
    local entry = cjson.decode(line)
    assert.equal("error", entry.level)
    assert.truthy(entry.error:find("boom from the handler", 1, true))
    assert.truthy(entry.error:find("stack traceback", 1, true))
    assert.equal(200, srv:get("/hello").status)
  end)

  it("ends a handler that yields with nothing to resume it with a 500", function()
    assert.equal(500, srv:get("/yield").status)
    assert.equal(200, srv:get("/hello").status)
  end)

  it("writes a JSON access log line per request", function()
    local r = srv:get("/orders/77?openid=secret")
    assert.equal(200, r.status)
    local line = H.wait_until(function()
      for l in srv:log_text():gmatch("[^\n]+") do
        if l:find('"path":"/orders/77"', 1, true) then return l end
      end
    end, 3, "access line")
    local e = cjson.decode(line)
    assert.equal("access", e.msg)
    assert.equal(200, e.status)
    assert.equal("GET", e.method)
    assert.equal("number", type(e.ms))
    assert.equal(18, #e.id)
    assert.falsy(line:find("openid", 1, true), "query strings are not logged")
  end)

  it("survives clients that leave while their handler waits (FIN and RST)", function()
    for _, rst in ipairs({ false, true }) do
      for _ = 1, 5 do
        local c = srv:connect()
        c:send("GET /sleep?ms=50 HTTP/1.1\r\nHost: x\r\n\r\n")
        if rst then c:setoption("linger", { on = true, timeout = 0 }) end
        c:close()
      end
    end
    require("wxd").sleep(150)
    assert.equal("hello world\n", srv:get("/hello").body)
  end)

  it("pauses a streaming handler for a slow reader and tells it when the client left", function()
    local c = srv:connect()
    c:send("GET /firehose HTTP/1.1\r\nHost: x\r\n\r\n")
    local got = 0
    while got < 300000 do
      local data, err, partial = c:receive(8192)
      got = got + #(data or partial or "")
      if err == "closed" then break end
      require("socket").sleep(0.001)
    end
    assert.equal("running", srv:get("/firehose/result").body, "the handler waits for the reader")
    c:close()
    H.wait_until(function()
      return srv:get("/firehose/result").body == "stopped: closed"
    end, 5, "the handler to see the close")
  end)

  it("answers every complete pipelined request of a client that half-closed", function()
    local c = srv:connect()
    c:send("GET /sleep?ms=50 HTTP/1.1\r\nHost: x\r\n\r\nGET /orders/2 HTTP/1.1\r\nHost: x\r\n\r\n"
      .. "GET /orders/3 HTTP/1.1\r\nHost: x\r\n\r\n")
    c:shutdown("send")
    local out, closed = H.read_all(c, 5)
    c:close()
    local rs = H.parse_responses(out)
    assert.equal(3, #rs)
    assert.equal('{"id":"3"}', rs[3].body)
    assert.is_true(closed)
  end)

  it("finishes writing a large response to a client that half-closed", function()
    local c = srv:connect()
    c:send("GET /big?n=5000000 HTTP/1.1\r\nHost: x\r\n\r\n")
    c:shutdown("send")
    require("wxd").sleep(100) -- the EOF arrives while the response is still being written
    local out, closed = H.read_all(c, 10)
    c:close()
    assert.equal(5000000, #H.parse_responses(out)[1].body)
    assert.is_true(closed)
  end)

  it("accepts absolute-form targets, also without a path", function()
    local out = srv:raw("GET http://example.com/hello HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
    assert.equal("hello world\n", H.parse_responses(out)[1].body)
    out = srv:raw("GET http://example.com HTTP/1.1\r\nHost: example.com\r\nX-Empty:\r\nConnection: close\r\n\r\n")
    assert.equal(404, H.parse_responses(out)[1].status) -- "/" has no route in the fixture
    out = srv:raw("GET https://example.com?x=1 HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
    assert.equal(404, H.parse_responses(out)[1].status)
  end)
end)
